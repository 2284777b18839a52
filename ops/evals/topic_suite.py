"""Steering evaluated on several topics at once, with no per-topic tuning (paper A's C3).

Protocol (AxBench's split, applied to paper A's metrics):

1. The prompts are shuffled once (``split_seed``) and cut into a **dev** half and a **test** half.
2. Every *setting* (a steering method with fixed options, see :data:`SETTINGS`) that has a knob
   (a strength, a clamp value, a vector scale) is run on the dev half, first seed only, for each
   value of its grid on every topic. The value kept is the one with the largest pooled distance
   drop whose pooled median perplexity under the judge stays within ``ppl_budget`` × orig's; if
   none does, the one with the lowest perplexity. One value per setting, for all topics.
3. The *best SAE setting* is chosen the same way on the dev half, among the settings that use the
   SAE, at their chosen values.
4. Every setting is then run on the test half, every seed, and only the test half is reported:
   per topic and pooled, the mean distance shift against orig, the share of prompts closer to the
   topic than orig, the win rate against prompting and the perplexity ratio, each with a
   bootstrap 95 % interval over prompts (pooled: resampled within each topic), and distinct-2.

Fluency is judged by one perplexity judge (:mod:`ops.evals.judges`): by default a second LM, not the
steered model's own unsteered twin, which favours doing nothing. It scores the first
``judge_tokens`` tokens of every dev row and of the first seed's test rows.

A prompt's value is its mean over seeds. Distance is docs/algorithms.md §4's: the minimum Euclidean distance of
the continuation's embedding to the topic's align texts (lower = more on topic). Rows of every
setting, topic, prompt and seed share decode batches (a row's tokens do not depend on its batch).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from ops.errors import SaealignError
from ops.evals.judges import PerplexityJudge, distinct_n
from ops.evals.methods import continuation_embeddings, prompting_prefix
from ops.models.lm import LanguageModel
from ops.scoring.scores import min_distances
from ops.steering.engine import SteeringSpec
from ops.steering.generation import GenerationResult, SamplingParams, generate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Setting:
    """One evaluated setting: an SAE method with fixed options, optionally prompted or with the
    DiffMean vector, and at most one knob chosen on the dev half from ``grid``."""

    label: str
    what: str
    method: str = "orig"
    keep_error: bool = False
    clamp_mode: str = "multiply"
    prompted: bool = False
    diffmean: bool = False
    knob: str = ""
    """'clamp_norm' (clamp: the value added to each clamped latent, as a share of the mean
    activation norm at the hook, so one grid serves any model) or 'diffmean_scale'; empty = none."""
    grid: tuple[float, ...] = ()
    knob_from: str = ""
    """Take the knob value the dev half chose for this other setting instead of a grid of its own."""

    @property
    def topic_free(self) -> bool:
        """Whether the setting ignores the topic (one run serves every topic)."""
        return self.method in ("orig", "sae") and not self.prompted and not self.diffmean

    @property
    def uses_sae(self) -> bool:
        return self.method != "orig"

    @property
    def steers_with_sae(self) -> bool:
        """A candidate for the best SAE setting: it edits latents (plain ``sae`` does not steer)."""
        return self.uses_sae and self.method != "sae"

    @property
    def on_dev(self) -> bool:
        """Whether the dev half runs it: to choose its knob or to compare it with the other SAE settings."""
        return self.label == "orig" or bool(self.grid) or bool(self.knob_from) or self.steers_with_sae


SETTINGS: tuple[Setting, ...] = (
    Setting("orig", "the unsteered model"),
    Setting("sae", "the SAE reconstruction in place of the activation; no steering", "sae"),
    Setting("swap", "paper Swap: re-select the active latents by γ ⊙ s, keep their values", "swap"),
    Setting("swap+err", "Swap with the SAE error added back", "swap", keep_error=True),
    Setting("clamp", "paper Clamp: the 5 top-scored latents × 10", "clamp"),
    Setting(
        "clamp-add+err",
        "the 5 top-scored latents + f·‖x‖ (their decoder directions added), SAE error kept",
        "clamp",
        keep_error=True,
        clamp_mode="add",
        knob="clamp_norm",
        grid=(0.1, 0.15),
    ),
    Setting("prompting", "the unsteered model after 'Write about <topic>: '", prompted=True),
    Setting("swap+prompt", "paper Swap after the prompting prefix", "swap", prompted=True),
    Setting(
        "clamp-add+prompt",
        "clamp-add+err after the prompting prefix",
        "clamp",
        keep_error=True,
        clamp_mode="add",
        prompted=True,
        knob="clamp_norm",
        knob_from="clamp-add+err",
    ),
    Setting(
        "diffmean",
        "DiffMean: scale × (mean align-text activation − mean reference activation) added",
        diffmean=True,
        knob="diffmean_scale",
        grid=(2.0, 4.0),
    ),
)
SETTING_NAMES = tuple(s.label for s in SETTINGS)
DEFAULT_SETTINGS = tuple(name for name in SETTING_NAMES if name != "clamp")
"""Paper Clamp in multiply mode is left out by default: ×10 of a latent that is not active is
still 0, so on prompts about something else it changes almost nothing (--settings clamp runs it)."""


@dataclass
class SuiteTopic:
    """What the suite needs of one scored topic."""

    name: str
    scores: torch.Tensor
    align_embeddings: np.ndarray
    diffmean: torch.Tensor | None = None

    @property
    def prefix(self) -> str:
        return prompting_prefix(self.name)


class SuiteOptions(Protocol):
    """The protocol's options, declared once in the job config (``workflows.evaluate.EvaluateConfig``
    has every one of them); any object with these attributes serves."""

    @property
    def settings(self) -> tuple[str, ...]: ...
    @property
    def seeds(self) -> tuple[int, ...]: ...
    @property
    def split_seed(self) -> int: ...
    @property
    def ppl_budget(self) -> float: ...
    @property
    def bootstrap(self) -> int: ...
    @property
    def judge_tokens(self) -> int: ...
    @property
    def batch_size(self) -> int: ...


@dataclass(frozen=True)
class _Row:
    setting: Setting
    topic: SuiteTopic | None
    prompt: int
    seed: int
    value: float | None


@dataclass
class _Scored:
    """Per-row metrics of one phase; ``distance[t]`` holds each row's distance to topic t."""

    rows: list[_Row]
    results: list[GenerationResult]
    distance: dict[str, np.ndarray] = field(default_factory=dict)
    log_ppl: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """log perplexity under the judge (NaN on rows it does not score)."""
    distinct2: np.ndarray = field(default_factory=lambda: np.zeros(0))


def select_settings(names: Sequence[str]) -> list[Setting]:
    names = names or DEFAULT_SETTINGS
    unknown = sorted(set(names) - set(SETTING_NAMES))
    if unknown:
        raise SaealignError(f"unknown setting(s) {unknown}; fix: choose from {', '.join(SETTING_NAMES)}")
    return [s for s in SETTINGS if s.label == "orig" or s.label in names]


def split_prompts(n: int, seed: int) -> tuple[list[int], list[int]]:
    """Dev and test halves of ``n`` prompt indices (a seeded shuffle; test gets the odd one)."""
    if n < 4:
        raise SaealignError(f"the suite needs at least 4 prompts to split into dev and test halves, got {n}")
    order = np.random.default_rng(seed).permutation(n).tolist()
    return sorted(order[: n // 2]), sorted(order[n // 2 :])


def spec_for(setting: Setting, topic: SuiteTopic | None, value: float | None, hook_norm: float = 1.0) -> SteeringSpec:
    """The steering spec of one row (``orig`` with no scores = no edit at all); ``hook_norm`` is
    the mean activation norm at the hook that a ``clamp_norm`` knob is measured in."""
    options: dict[str, Any] = {"keep_error": setting.keep_error, "clamp_mode": setting.clamp_mode}
    if setting.knob == "clamp_norm" and value is not None:
        options["clamp_factor"] = value * hook_norm
    vector = None
    if setting.diffmean:
        assert topic is not None and topic.diffmean is not None and value is not None
        vector = value * topic.diffmean
    scores = topic.scores if topic is not None and setting.uses_sae else None
    name = topic.name if topic is not None else None
    return SteeringSpec(setting.method, scores=scores, vector=vector, topic=name, **options)  # type: ignore[arg-type]


class Suite:
    """Runs the protocol for one model, SAE and prompt set over several topics."""

    def __init__(
        self,
        model: LanguageModel,
        sae: Any,
        embedder: str,
        topics: Sequence[SuiteTopic],
        prompts: Sequence[str],
        params: SamplingParams,
        options: SuiteOptions,
        judge: Callable[[], PerplexityJudge],
        hook_norm: float = 1.0,
    ):
        if not topics:
            raise SaealignError("the suite needs at least one scored topic; fix: pass --topics NAME ...")
        self.model, self.sae, self.embedder = model, sae, embedder
        self.topics, self.prompts, self.params, self.options = list(topics), list(prompts), params, options
        self.settings = select_settings(options.settings)
        self.judge_factory = judge
        self.judge: PerplexityJudge | None = None
        self.hook_norm = hook_norm
        self.dev, self.test = split_prompts(len(self.prompts), options.split_seed)
        self.hook = sae.cfg.metadata.hook_name
        self.timings: dict[str, float] = {}

    # -- running rows ------------------------------------------------------------------------

    def _rows(
        self, settings: Sequence[tuple[Setting, float | None]], prompts: list[int], seeds: Sequence[int]
    ) -> list[_Row]:
        rows = []
        for setting, value in settings:
            for topic in [None] if setting.topic_free else self.topics:
                rows += [_Row(setting, topic, p, s, value) for s in seeds for p in prompts]
        return rows

    def _generate(self, rows: list[_Row], desc: str) -> list[GenerationResult]:
        texts = [(r.topic.prefix if r.setting.prompted and r.topic else "") + self.prompts[r.prompt] for r in rows]
        specs = [spec_for(r.setting, r.topic, r.value, self.hook_norm) for r in rows]
        seeds = [r.seed for r in rows]
        size = self.options.batch_size
        results: list[GenerationResult] = []
        for start in tqdm(range(0, len(rows), size), desc=desc, unit="batch"):
            stop = start + size
            results += generate(
                self.model,
                self.sae,
                texts[start:stop],
                specs[start:stop],
                self.hook,
                self.params,
                size,
                seeds[start:stop],
            )
        return results

    def _score(self, rows: list[_Row], results: list[GenerationResult]) -> _Scored:
        emb = continuation_embeddings(results, self.embedder)
        scored = _Scored(rows, results)
        for topic in self.topics:
            scored.distance[topic.name] = min_distances(emb, topic.align_embeddings)
        scored.distinct2 = np.array([distinct_n(x.token_ids, 2) for x in results])
        scored.log_ppl = np.full(len(rows), math.nan)
        judged = [i for i, r in enumerate(rows) if r.seed == self.options.seeds[0]]
        t0 = time.perf_counter()
        vals = self._judge().perplexities(
            [self.prompts[rows[i].prompt] for i in judged],
            [results[i].text for i in judged],
            max_tokens=self.options.judge_tokens,
        )
        self.timings["judge_s"] = self.timings.get("judge_s", 0.0) + time.perf_counter() - t0
        scored.log_ppl[judged] = np.log(np.array(vals, dtype=np.float64))
        return scored

    def _judge(self) -> PerplexityJudge:
        if self.judge is None:
            self.judge = self.judge_factory()
        return self.judge

    # -- the protocol ------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        dev = self._dev_phase()
        t1 = time.perf_counter()
        chosen = {label: info["chosen"] for label, info in dev["settings"].items() if info["chosen"] is not None}
        settings = [(s, chosen.get(s.label)) for s in self.settings]
        rows = self._rows(settings, self.test, self.options.seeds)
        test = self._score(rows, self._generate(rows, "test half"))
        t2 = time.perf_counter()
        self.timings.update({"dev_s": t1 - t0, "test_s": t2 - t1})
        tables = self._tables(test)
        return {
            "protocol": {
                "dev_prompts": self.dev,
                "test_prompts": self.test,
                "seeds": list(self.options.seeds),
                "dev_seed": self.options.seeds[0],
                "ppl_budget": self.options.ppl_budget,
                "bootstrap": self.options.bootstrap,
                "rule": (
                    "per setting, the grid value with the largest pooled distance drop on the dev half whose "
                    f"median perplexity stays within {self.options.ppl_budget}× orig's (else the lowest perplexity)"
                ),
            },
            "topics": [t.name for t in self.topics],
            "hook_norm": self.hook_norm,
            "settings": [
                {"label": s.label, "what": s.what, "uses_sae": s.uses_sae, "knob": s.knob, "grid": list(s.grid)}
                | {"knob_from": s.knob_from}
                | {"chosen": chosen.get(s.label)}
                for s in self.settings
            ],
            "dev": dev,
            "best_sae_setting": dev["best_sae_setting"],
            "best_sae_setting_unprompted": dev["best_sae_setting_unprompted"],
            "judge": {
                "name": self._judge().name,
                "scope": f"every dev row and the test rows of seed {self.options.seeds[0]}; the first "
                f"{self.options.judge_tokens or 'all'} judge tokens of each continuation",
            },
            "per_topic": tables["per_topic"],
            "pooled": tables["pooled"],
            "generations": self._examples(test),
            "timings": self.timings,
        }

    def _dev_phase(self) -> dict[str, Any]:
        """Two passes over the dev half: the settings with a grid (and orig), then the rest, those
        that borrow a knob running at the value chosen in the first pass."""
        seed = self.options.seeds[0]
        dev_settings = [s for s in self.settings if s.on_dev]
        first = [(s, v) for s in dev_settings if s.grid or s.label == "orig" for v in (s.grid or (None,))]
        rows = self._rows(first, self.dev, [seed])
        scored = self._score(rows, self._generate(rows, "dev half (knobs)"))
        base = self._per_prompt(scored, "orig", None)
        stats = self._dev_stats(scored, base, first)
        chosen = {s.label: self._choose([stats[(s.label, v)] for v in s.grid])["value"] for s in dev_settings if s.grid}
        second = []
        for s in dev_settings:
            if s.knob_from:
                if s.knob_from not in chosen:
                    raise SaealignError(
                        f"setting '{s.label}' takes its knob from '{s.knob_from}'; fix: run that one too"
                    )
                second.append((s, chosen[s.knob_from]))
            elif not s.grid and s.label != "orig":
                second.append((s, None))
        if second:
            rows2 = self._rows(second, self.dev, [seed])
            more = self._score(rows2, self._generate(rows2, "dev half (the rest)"))
            stats |= self._dev_stats(more, base, second)
        chosen |= {s.label: v for s, v in second}
        out: dict[str, Any] = {"settings": {}}
        for setting, value in [c for c in first if c[0].label != "orig"] + second:
            entry = out["settings"].setdefault(setting.label, {"tried": [], "chosen": chosen[setting.label]})
            entry["tried"].append(stats[(setting.label, value)])
        for key, pool in (
            ("best_sae_setting", [s for s in dev_settings if s.steers_with_sae]),
            ("best_sae_setting_unprompted", [s for s in dev_settings if s.steers_with_sae and not s.prompted]),
        ):
            tried = [stats[(s.label, out["settings"][s.label]["chosen"])] | {"label": s.label} for s in pool]
            out[key] = self._choose(tried)["label"] if tried else None
        return out

    def _dev_stats(
        self,
        scored: _Scored,
        base: dict[str, dict[str, np.ndarray]],
        candidates: Sequence[tuple[Setting, float | None]],
    ) -> dict[tuple[str, float | None], dict[str, Any]]:
        """Pooled distance shift and perplexity ratio of each candidate against orig's ``base``."""
        stats = {}
        for setting, value in candidates:
            if setting.label == "orig":
                continue
            cand = self._per_prompt(scored, setting.label, value)
            shift = float(np.mean([np.mean(cand[t]["distance"] - base[t]["distance"]) for t in cand]))
            ratio = _ppl_ratio(
                np.concatenate([cand[t]["log_ppl"] for t in cand]), np.concatenate([base[t]["log_ppl"] for t in base])
            )
            stats[(setting.label, value)] = {"value": value, "shift": shift, "ppl_ratio": ratio}
        return stats

    def _choose(self, tried: list[dict[str, Any]]) -> dict[str, Any]:
        ok = [t for t in tried if t["ppl_ratio"] <= self.options.ppl_budget]
        return min(ok, key=lambda t: t["shift"]) if ok else min(tried, key=lambda t: t["ppl_ratio"])

    def _per_prompt(self, scored: _Scored, label: str, value: float | None) -> dict[str, dict[str, np.ndarray]]:
        """For each topic: per-prompt means over seeds of the setting's metrics (prompt order)."""
        out = {}
        for topic in self.topics:
            idx = [
                i
                for i, r in enumerate(scored.rows)
                if r.setting.label == label
                and (value is None or r.value == value)
                and (r.topic is None or r.topic.name == topic.name)
            ]
            prompts = sorted({scored.rows[i].prompt for i in idx})
            pos = {p: k for k, p in enumerate(prompts)}
            cols = {
                "distance": scored.distance[topic.name][idx],
                "log_ppl": scored.log_ppl[idx],
                "distinct2": scored.distinct2[idx],
                "contamination": np.array([scored.results[i].mean_contamination for i in idx]),
                "latents_changed": np.array([scored.results[i].mean_latents_changed for i in idx]),
            }
            which = np.array([pos[scored.rows[i].prompt] for i in idx])
            out[topic.name] = {k: _group_mean(v, which, len(prompts)) for k, v in cols.items()}
        return out

    # -- the report --------------------------------------------------------------------------

    def _tables(self, test: _Scored) -> dict[str, Any]:
        per = {s.label: self._per_prompt(test, s.label, None) for s in self.settings}
        rng = np.random.default_rng(0)
        n = len(self.test)
        boot = {t.name: rng.integers(0, n, size=(self.options.bootstrap, n)) for t in self.topics}
        per_topic = {
            t.name: [_summary(s, {t.name: per[s.label][t.name]}, per, {t.name: boot[t.name]}) for s in self.settings]
            for t in self.topics
        }
        pooled = [_summary(s, per[s.label], per, boot) for s in self.settings]
        return {"per_topic": per_topic, "pooled": pooled}

    def _examples(self, test: _Scored, per_setting: int = 2) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        seen: dict[tuple[str, str | None], int] = {}
        for r, res in zip(test.rows, test.results, strict=True):
            key = (r.setting.label, r.topic.name if r.topic else None)
            if r.seed != self.options.seeds[0] or seen.get(key, 0) >= per_setting:
                continue
            seen[key] = seen.get(key, 0) + 1
            out.append({"setting": key[0], "topic": key[1], "prompt": self.prompts[r.prompt], "text": res.text})
        return out


def _group_mean(values: np.ndarray, which: np.ndarray, n: int) -> np.ndarray:
    out = np.full(n, math.nan)
    for k in range(n):
        v = values[which == k]
        v = v[~np.isnan(v)]
        if len(v):
            out[k] = v.mean()
    return out


def _ppl_ratio(log_ppl: np.ndarray, base_log_ppl: np.ndarray) -> float:
    a, b = log_ppl[~np.isnan(log_ppl)], base_log_ppl[~np.isnan(base_log_ppl)]
    return float(np.exp(np.median(a) - np.median(b))) if len(a) and len(b) else math.nan


def _interval(stat: Callable[[dict[str, np.ndarray] | None], float], boot: dict[str, np.ndarray]) -> dict[str, float]:
    """The statistic on the data and its bootstrap 95 % percentile interval."""
    value = stat(None)
    draws = np.array([stat({t: b[i] for t, b in boot.items()}) for i in range(len(next(iter(boot.values()))))])
    draws = draws[~np.isnan(draws)]
    lo, hi = np.percentile(draws, [2.5, 97.5]) if len(draws) else (math.nan, math.nan)
    return {"value": value, "lo": float(lo), "hi": float(hi)}


def _summary(
    setting: Setting,
    mine: dict[str, dict[str, np.ndarray]],
    per: dict[str, dict[str, dict[str, np.ndarray]]],
    boot: dict[str, np.ndarray],
) -> dict[str, Any]:
    topics = list(mine)
    orig = per["orig"]
    prompting = per.get("prompting")

    def pick(table: dict[str, dict[str, np.ndarray]], key: str, idx: dict[str, np.ndarray] | None) -> np.ndarray:
        return np.concatenate([table[t][key] if idx is None else table[t][key][idx[t]] for t in topics])

    def shift(idx: dict[str, np.ndarray] | None) -> float:
        return float(np.mean(pick(mine, "distance", idx) - pick(orig, "distance", idx)))

    def closer(idx: dict[str, np.ndarray] | None) -> float:
        return float(np.mean(pick(mine, "distance", idx) < pick(orig, "distance", idx)))

    def ratio(key: str) -> Callable[[dict[str, np.ndarray] | None], float]:
        return lambda idx: _ppl_ratio(pick(mine, key, idx), pick(orig, key, idx))

    out: dict[str, Any] = {
        "setting": setting.label,
        "distance": float(np.mean(pick(mine, "distance", None))),
        "shift": _interval(shift, boot),
        "closer": _interval(closer, boot),
        "ppl_ratio": _interval(ratio("log_ppl"), boot),
        "distinct2": float(np.nanmean(pick(mine, "distinct2", None))),
        "contamination": _nanmean(pick(mine, "contamination", None)),
        "latents_changed": _nanmean(pick(mine, "latents_changed", None)),
    }
    if prompting is not None:
        out["win_vs_prompting"] = _interval(
            lambda idx: float(np.mean(pick(mine, "distance", idx) < pick(prompting, "distance", idx))), boot
        )
    return out


def _nanmean(v: np.ndarray) -> float | None:
    v = v[~np.isnan(v)]
    return float(v.mean()) if len(v) else None
