"""``saealign evaluate``: steering methods side by side on prompts, with a JSON + HTML report.

One topic (``--topic``): generate ``max_new_tokens`` tokens (top-k sampling, fixed seeds) per
prompt under orig, sae, clamp, swap, weight (each with keep_error off and on), the prompting
baseline and a DiffMean steering vector; measure docs/algorithms.md §4's metrics; add the cost table, coverage
(Fig. 3), the top-k check (Fig. 4) and the histograms of latents changed and contamination
(Figs. 5–6); recommend a default setting from the numbers.

Several topics (``--topics a b ...``): the protocol of :mod:`ops.evals.topic_suite` (knobs and the best
SAE setting chosen on a dev half of the prompts, the test half reported per topic and pooled with
bootstrap intervals, an independent judge LM beside the model's own perplexity)::

    saealign evaluate --lake out/demo/lake --topics sport cooking finance --seeds 0 1
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ops.errors import SaealignError
from ops.evals import topic_suite
from ops.evals.judges import load_judge
from ops.evals.methods import (
    Evaluated,
    diffmean_vector,
    recommend,
    reference_moments,
    run_method,
    score_results,
    standard_runs,
    summarise_method,
    swap_vs_orig,
)
from ops.lake.contract import DatasetKey, Lake
from ops.models.embedders import embed
from ops.models.lm import load_model
from ops.saes.registry import load_sae
from ops.scoring.coverage import dataset_coverage
from ops.scoring.scores import (
    dataset_key,
    lake_embedder,
    prompt_distances,
    resolve_dataset,
    score_latents,
    topic_align_texts,
    topic_scores,
)
from ops.scoring.topk_check import token_latent_sets, topk_check
from ops.steering.generation import SamplingParams
from ops.texts import read_texts
from workflows import _evaluate_report
from workflows._config import parse_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateConfig:
    """Evaluate steering methods for a scored topic on prompts; writes report.json and report.html."""

    lake: str = "out/lake"
    """Lake root with the topic's scores."""
    topic: str = "medical"
    """Scored topic to steer toward."""
    dataset: str | None = None
    """Lake dataset; default: the lake's only dataset."""
    prompts_file: str = ""
    """Prompt source (a file with a text column or embedded:...); empty = embedded:demo-prompts for
    one topic, embedded:neutral-prompts with --topics."""
    topics: tuple[str, ...] = ()
    """Several scored topics: run the multi-topic protocol (dev/test halves, bootstrap intervals)
    instead of the single-topic report; --topic is then ignored."""
    settings: tuple[str, ...] = ()
    """--topics: settings to run (default: ops.evals.topic_suite.DEFAULT_SETTINGS)."""
    split_seed: int = 0
    """--topics: seed of the prompt shuffle that cuts the dev and test halves."""
    ppl_budget: float = 1.5
    """--topics: a knob value (or the best SAE setting) is chosen on the dev half only among those
    whose median perplexity stays within this many × orig's."""
    bootstrap: int = 1000
    """--topics: bootstrap resamples for the 95 % intervals."""
    judge: str = "gemma3-270m"
    """--topics: the perplexity judge: a second LM ('gemma3-270m', 'path:<HF model dir>') or 'own'
    (the steered model unsteered, which favours doing nothing)."""
    judge_tokens: int = 24
    """--topics: the judge scores the first this many tokens of each continuation (0 = all)."""
    n_prompts: int = 0
    """Use only the first n prompts (0 = all)."""
    seeds: tuple[int, ...] = (0,)
    """Sampling seeds; every prompt is generated once per seed and method."""
    max_new_tokens: int = 64
    """Tokens generated per prompt."""
    top_k: int = 5
    """Top-k sampling."""
    temperature: float = 1.0
    """Sampling temperature."""
    methods: tuple[str, ...] = ()
    """Settings to run (default: all of orig, sae, clamp, swap, weight, their +err variants, prompting, diffmean)."""
    diffmean_scale: float = 4.0
    """Scale of the DiffMean steering vector."""
    unaligned_file: str = "embedded:unaligned"
    """Unaligned text for the top-k check."""
    k_max: int = 50
    """Largest k of the top-k check."""
    batch_size: int = 16
    """Prompts per generation batch."""
    out: str = "out/evaluate"
    """Output directory."""
    setup_costs: str = ""
    """Internal: JSON of measured set-up costs to include (the demo passes its own)."""

    def __post_init__(self) -> None:
        if not self.seeds:
            raise SaealignError("--seeds needs at least one seed")
        if self.n_prompts < 0 or self.batch_size < 1:
            raise SaealignError("--n-prompts must be >= 0 and --batch-size >= 1")
        if self.bootstrap < 1 or self.judge_tokens < 0 or not self.ppl_budget > 0:
            raise SaealignError("--bootstrap must be >= 1, --judge-tokens >= 0 and --ppl-budget > 0")

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=self.max_new_tokens, top_k=self.top_k, temperature=self.temperature, stop_at_eos=False
        )

    @property
    def prompt_source(self) -> str:
        return self.prompts_file or ("embedded:neutral-prompts" if self.topics else "embedded:demo-prompts")


def _per_topic_cost(lake: Lake, key: DatasetKey, align: list[str], embedder: str) -> dict[str, float]:
    """Re-measure the per-topic steps (nothing is stored)."""
    t0 = time.perf_counter()
    vectors = embed(align, embedder)
    t1 = time.perf_counter()
    distances = prompt_distances(lake, key, vectors)
    t2 = time.perf_counter()
    score_latents(lake, key, distances)
    t3 = time.perf_counter()
    return {"align_embeddings_s": t1 - t0, "distances_s": t2 - t1, "scoring_s": t3 - t2, "total_s": t3 - t0}


def _dataset(cfg: EvaluateConfig) -> tuple[Lake, str, DatasetKey, dict[str, Any]]:
    lake = Lake(cfg.lake)
    name = resolve_dataset(lake, cfg.dataset)
    return lake, name, dataset_key(lake, name), lake.read_manifest(name)


def _prompts(cfg: EvaluateConfig) -> list[str]:
    prompts = read_texts(cfg.prompt_source).texts
    return prompts[: cfg.n_prompts] if cfg.n_prompts else prompts


def build(cfg: EvaluateConfig) -> dict[str, Any]:
    if cfg.topics:
        return build_suite(cfg)
    lake, name, key, manifest = _dataset(cfg)
    scores_np, meta = topic_scores(cfg.lake, cfg.topic, name)
    align = topic_align_texts(cfg.lake, cfg.topic, name)
    embedder = lake_embedder(lake, key)
    model = load_model(key.model)
    sae = load_sae(manifest["config"]["sae"])
    prompts = _prompts(cfg)
    params = cfg.sampling
    scores = torch.from_numpy(scores_np)
    runs = standard_runs(scores, cfg.topic, cfg.diffmean_scale)
    if cfg.methods:
        unknown = set(cfg.methods) - {r.label for r in runs}
        if unknown:
            raise SaealignError(f"unknown method(s) {sorted(unknown)}; choose from {[r.label for r in runs]}")
        runs = [r for r in runs if r.label in cfg.methods or r.label == "orig"]
    diffmean = (
        diffmean_vector(model, key.hook, align, reference_moments(model, key.hook, lake, key)[0])
        if any(r.diffmean_scale for r in runs)
        else None
    )
    align_emb = embed(align, embedder)
    evaluated: list[Evaluated] = []
    for run in tqdm(runs, desc="methods", unit="method"):
        results = run_method(model, sae, run, prompts, cfg.seeds, params, diffmean, cfg.batch_size)
        evaluated.append(Evaluated(run.label, score_results(model, results, prompts, align_emb, embedder)))
    orig = evaluated[0]
    summaries = [summarise_method(ev, orig) for ev in evaluated]
    check = topk_check(
        scores_np,
        token_latent_sets(model, sae, key.hook, align),
        token_latent_sets(model, sae, key.hook, read_texts(cfg.unaligned_file).texts),
        list(range(1, cfg.k_max + 1)),
    )
    report = {
        "config": asdict(cfg),
        "topic": meta,
        "dataset": name,
        "prompts": prompts,
        "summary": summaries,
        "recommendation": recommend(summaries),
        "swap_vs_orig": swap_vs_orig(summaries, evaluated, len(prompts)),
        "costs": {
            "set_up": json.loads(cfg.setup_costs) if cfg.setup_costs else {"lake_wall_s": manifest.get("wall_s")},
            "per_topic": _per_topic_cost(lake, key, align, embedder),
            "per_token": {s["method"]: s["s_per_token"] for s in summaries},
            "per_token_batch": min(cfg.batch_size, len(prompts) * len(cfg.seeds)),
        },
        "coverage": [asdict(p) for p in dataset_coverage(lake, key, int(sae.cfg.d_sae))],
        "topk_check": check.to_dict(),
        "generations": {ev.label: ev.rows for ev in evaluated},
    }
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=_json_default) + "\n")
    (out / "report.html").write_text(_evaluate_report.render(report))
    return report


def build_suite(cfg: EvaluateConfig) -> dict[str, Any]:
    """The multi-topic protocol of :mod:`ops.evals.topic_suite` over ``cfg.topics``."""
    lake, name, key, manifest = _dataset(cfg)
    embedder = lake_embedder(lake, key)
    settings = topic_suite.select_settings(cfg.settings)
    scored = {topic: topic_scores(cfg.lake, topic, name)[0] for topic in dict.fromkeys(cfg.topics)}  # fail fast
    model = load_model(key.model)
    sae = load_sae(manifest["config"]["sae"])
    reference, hook_norm = reference_moments(model, key.hook, lake, key)
    topics = []
    for topic, scores_np in scored.items():
        align = topic_align_texts(cfg.lake, topic, name)
        diffmean = diffmean_vector(model, key.hook, align, reference) if any(s.diffmean for s in settings) else None
        topics.append(topic_suite.SuiteTopic(topic, torch.from_numpy(scores_np), embed(align, embedder), diffmean))
    prompts = _prompts(cfg)
    params = cfg.sampling
    judge = partial(load_judge, cfg.judge, model)
    t0 = time.perf_counter()
    suite = topic_suite.Suite(model, sae, embedder, topics, prompts, params, cfg, judge, hook_norm)
    report = {"config": asdict(cfg), "dataset": name, "prompts": prompts} | suite.run()
    report["timings"]["suite_s"] = time.perf_counter() - t0
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=_json_default) + "\n")
    (out / "report.html").write_text(_evaluate_report.render_suite(report))
    return report


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def print_summary(report: dict[str, Any]) -> None:
    cols = (
        "method",
        "distance",
        "median_perplexity",
        "contamination",
        "latents_changed",
        "closer_than_orig",
        "s_per_token",
    )
    print("  ".join(f"{c:>17}" for c in cols))
    for s in report["summary"]:
        cells = [s.get(c) for c in cols]
        print("  ".join(f"{v:>17.4g}" if isinstance(v, float) else f"{v!s:>17}" for v in cells))
    rec = report["recommendation"]
    print(f"recommended: {rec['method'] or 'none'} ({rec['reason']})")
    for key, value in report["swap_vs_orig"].items():
        print(f"  {key}: {value}")


def print_suite(report: dict[str, Any]) -> None:
    def cell(stat: dict[str, float], fmt: str) -> str:
        return f"{stat['value']:{fmt}} [{stat['lo']:{fmt}}, {stat['hi']:{fmt}}]"

    print(f"test half: {len(report['protocol']['test_prompts'])} prompts x seeds {report['protocol']['seeds']}")
    print(f"{'pooled':<18}{'shift':>26}{'closer':>22}{'win vs prompting':>22}{'ppl x orig':>22}{'distinct-2':>11}")
    for row in report["pooled"]:
        win = cell(row["win_vs_prompting"], ".2f") if "win_vs_prompting" in row else "-"
        print(
            f"{row['setting']:<18}{cell(row['shift'], '+.3f'):>26}{cell(row['closer'], '.2f'):>22}{win:>22}"
            f"{cell(row['ppl_ratio'], '.2f'):>22}{row['distinct2']:>11.3f}"
        )
    print(f"perplexity judge: {report['judge']['name']} ({report['judge']['scope']})")
    print(f"best SAE setting (chosen on the dev half): {report['best_sae_setting']}")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(EvaluateConfig, argv, "saealign evaluate")
    report = build(cfg)
    if cfg.topics:
        print_suite(report)
        print(f"report: {Path(cfg.out).resolve() / 'report.html'}")
        return 0
    print_summary(report)
    print(f"report: {Path(cfg.out).resolve() / 'report.html'}")
    return 0
