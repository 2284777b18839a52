"""Generated-output evaluation (docs/algorithms.md §4): methods side by side on the same prompts and seeds.

Per generation: perplexity of the continuation under the unsteered model, distance from P_align
(min Euclidean distance of the continuation's embedding to the align texts' embeddings, lower =
more on topic), contamination and latents changed per token (steered methods), time per token.
Acceptability needs a CoLA classifier, which is not installed offline: it is reported as
unavailable, never estimated.

Baselines beside the SAE methods: ``prompting`` (the unsteered model given
"Write about <topic>: " before the prompt) and ``diffmean`` (the mean hook activation of the
align texts minus that of the reference pool, added at the hook with a scale: a steering-vector
spec of the one steering engine, so it leaves the first position, special tokens and padding alone).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ops.lake.contract import DatasetKey, Lake
from ops.models.embedders import embed
from ops.models.lm import LanguageModel
from ops.scoring.scores import min_distances
from ops.steering.activations import iter_batches, run_to_hook
from ops.steering.engine import METHODS, SteeringSpec
from ops.steering.generation import GenerationResult, SamplingParams, continuation_perplexities, generate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MethodRun:
    """One evaluated setting: a label, a steering spec (None = plain model) and options."""

    label: str
    spec: SteeringSpec | None = None
    prompt_prefix: str = ""
    diffmean_scale: float = 0.0


@dataclass
class Evaluated:
    """Per-method results: one row per (prompt, seed)."""

    label: str
    rows: list[dict[str, Any]] = field(default_factory=list)

    def column(self, key: str) -> np.ndarray:
        return np.array([r[key] for r in self.rows], dtype=np.float64)


def prompting_prefix(topic: str) -> str:
    """The prompting baseline's instruction, put before the prompt."""
    return f"Write about {topic}: "


def continuation_embeddings(results: Sequence[GenerationResult], embedder: str) -> np.ndarray:
    """Sentence embeddings of the continuations (an empty one embedded as '.')."""
    return embed([r.text if r.text.strip() else "." for r in results], embedder)


def standard_runs(scores: torch.Tensor, topic: str, diffmean_scale: float) -> list[MethodRun]:
    """The methods of the paper's Table 2 plus keep_error variants and the two baselines."""
    runs = [MethodRun("orig", SteeringSpec("orig", scores=scores, topic=topic))]
    for method in ("sae", "clamp", "swap", "weight"):
        runs.append(MethodRun(method, SteeringSpec(method, scores=scores, topic=topic)))  # type: ignore[arg-type]
        runs.append(MethodRun(f"{method}+err", SteeringSpec(method, scores=scores, topic=topic, keep_error=True)))  # type: ignore[arg-type]
    runs.append(MethodRun("prompting", None, prompt_prefix=prompting_prefix(topic)))
    runs.append(MethodRun("diffmean", None, diffmean_scale=diffmean_scale))
    return runs


@torch.no_grad()
def hook_moments(
    model: LanguageModel, texts: Sequence[str], hook: str, context: int = 256
) -> tuple[torch.Tensor, float]:
    """Mean activation at ``hook`` [d_model] and mean activation norm over the counted positions
    (first position and special tokens left out) of ``texts``."""
    total, norms, count = None, 0.0, 0
    for batch in iter_batches(model, texts, 4096, context):
        x = run_to_hook(model, batch, hook)[batch.keep.to(model.device)]
        total = x.sum(0) if total is None else total + x.sum(0)
        norms += float(x.norm(dim=-1).sum())
        count += len(x)
    assert total is not None
    return total / max(count, 1), norms / max(count, 1)


def mean_hook_activation(model: LanguageModel, texts: Sequence[str], hook: str, context: int = 256) -> torch.Tensor:
    """Mean activation at ``hook`` over counted positions of ``texts`` [d_model]."""
    return hook_moments(model, texts, hook, context)[0]


def reference_moments(model: LanguageModel, hook: str, lake: Lake, key: DatasetKey) -> tuple[torch.Tensor, float]:
    """Mean hook activation and mean activation norm of up to 512 reference prompts of a lake
    dataset, drawn at random (seeded): its shards are cut in length order, so the first rows would
    be the shortest prompts."""
    prompts = lake.dataset("prompts", key)
    texts = prompts.to_table(columns=["prompt_id", "text"]).sort_by("prompt_id").column("text").to_pylist()
    rows = np.random.default_rng(0).choice(len(texts), min(512, len(texts)), replace=False)
    return hook_moments(model, [texts[i] for i in sorted(rows)], hook)


def diffmean_vector(
    model: LanguageModel, hook: str, align: Sequence[str], reference_mean: torch.Tensor
) -> torch.Tensor:
    """DiffMean: the mean hook activation of the align texts minus the reference mean
    (:func:`reference_moments`), unscaled."""
    return mean_hook_activation(model, align, hook) - reference_mean


def run_method(
    model: LanguageModel,
    sae: Any,
    run: MethodRun,
    prompts: Sequence[str],
    seeds: Sequence[int],
    params: SamplingParams,
    diffmean: torch.Tensor | None,
    batch_size: int,
) -> list[GenerationResult]:
    """Generate every (prompt, seed) pair under one method."""
    rows = [(p, s) for s in seeds for p in prompts]
    texts = [run.prompt_prefix + p for p, _ in rows]
    row_seeds = [s for _, s in rows]
    hook = sae.cfg.metadata.hook_name
    if run.diffmean_scale and diffmean is not None:
        spec = SteeringSpec("orig", vector=run.diffmean_scale * diffmean)
        return generate(model, None, texts, spec, hook, params, batch_size, row_seeds)
    return generate(model, sae if run.spec else None, texts, run.spec, hook, params, batch_size, row_seeds)


def score_results(
    model: LanguageModel,
    results: list[GenerationResult],
    prompts: Sequence[str],
    align_embeddings: np.ndarray,
    embedder: str,
) -> list[dict[str, Any]]:
    """Metrics per generation; perplexity conditions on the original prompt (no prefix)."""
    distances = min_distances(continuation_embeddings(results, embedder), align_embeddings)
    prompt_ids = model.tokenize(list(prompts))
    row_prompts = [prompt_ids[i % len(prompts)] for i in range(len(results))]
    perplexities = continuation_perplexities(model, row_prompts, [r.token_ids for r in results])
    rows = []
    for i, (r, d, ppl) in enumerate(zip(results, distances, perplexities, strict=True)):
        prompt = prompts[i % len(prompts)]
        rows.append(
            {
                "prompt": prompt,
                "text": r.text,
                "tokens": r.tokens,
                "contamination_per_token": [None if math.isnan(c) else c for c in r.contamination],
                "latents_changed_per_token": [None if math.isnan(c) else c for c in r.latents_changed],
                "perplexity": ppl,
                "distance": float(d),
                "contamination": r.mean_contamination,
                "latents_changed": r.mean_latents_changed,
                "s_per_token": r.timings.get("s_per_token", math.nan),
                "acceptability": None,
            }
        )
    return rows


def summarise_method(ev: Evaluated, orig: Evaluated | None) -> dict[str, Any]:
    """Mean ± std of each metric, and the share of generations closer to the topic than orig's."""
    out: dict[str, Any] = {"method": ev.label, "n": len(ev.rows)}
    for key in ("perplexity", "distance", "contamination", "latents_changed", "s_per_token"):
        vals = ev.column(key)
        vals = vals[~np.isnan(vals)]
        out[key] = float(vals.mean()) if len(vals) else None
        out[f"{key}_std"] = float(vals.std()) if len(vals) else None
    out["median_perplexity"] = float(np.nanmedian(ev.column("perplexity")))
    if orig is not None:
        closer = ev.column("distance") < orig.column("distance")
        out["closer_than_orig"] = float(closer.mean())
    out["acceptability"] = "unavailable (no CoLA classifier installed)"
    return out


def recommend(summaries: list[dict[str, Any]], ppl_budget: float = 1.5) -> dict[str, Any]:
    """Among the SAE steering settings, the lowest mean distance whose median perplexity stays
    within ``ppl_budget`` × orig's; falls back to the lowest perplexity ratio. With no SAE
    steering setting evaluated, ``method`` is None and ``reason`` says so."""
    by = {s["method"]: s for s in summaries}
    base = by["orig"]["median_perplexity"]
    sae_methods = METHODS[1:]
    candidates = [s for s in summaries if s["method"].split("+")[0] in sae_methods]
    if not candidates:
        return {
            "method": None,
            "reason": f"no recommendation possible: no SAE steering setting ({', '.join(sae_methods)}) was evaluated",
            "distance": None,
            "perplexity_ratio": None,
        }
    ok = [s for s in candidates if s["median_perplexity"] <= ppl_budget * base]
    if ok:
        best = min(ok, key=lambda s: s["distance"])
        why = f"lowest mean distance among settings with median perplexity ≤ {ppl_budget}× orig"
    else:
        best = min(candidates, key=lambda s: s["median_perplexity"])
        why = f"no setting kept median perplexity within {ppl_budget}× orig; lowest perplexity chosen"
    return {
        "method": best["method"],
        "reason": why,
        "distance": best["distance"],
        "perplexity_ratio": best["median_perplexity"] / base,
    }


def swap_vs_orig(summaries: list[dict[str, Any]], evaluated: list[Evaluated], n_prompts: int) -> dict[str, Any]:
    """Swap beside orig and Clamp, measured (no thresholds): the share of prompts on which Swap's
    continuations are closer to the topic than orig's, its median perplexity over orig's, and the
    mean contamination of Swap and Clamp."""
    by = {s["method"]: s for s in summaries}
    ev = {e.label: e for e in evaluated}
    if "swap" not in ev or "clamp" not in by:
        return {}
    per_prompt = lambda e: e.column("distance").reshape(-1, n_prompts).mean(0)  # noqa: E731
    return {
        "swap_closer_than_orig_share": float((per_prompt(ev["swap"]) < per_prompt(ev["orig"])).mean()),
        "swap_perplexity_ratio": by["swap"]["median_perplexity"] / by["orig"]["median_perplexity"],
        "swap_contamination": by["swap"]["contamination"],
        "clamp_contamination": by["clamp"]["contamination"],
    }
