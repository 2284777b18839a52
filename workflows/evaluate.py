"""``saealign evaluate``: steering methods side by side on prompts, with a JSON + HTML report.

For a scored topic of a lake: generate ``max_new_tokens`` tokens (top-k sampling, fixed seeds)
per prompt under orig, sae, clamp, swap, weight (each with keep_error off and on), the prompting
baseline and a DiffMean steering vector; measure spec §4's metrics; add the cost table, coverage
(Fig. 3), the top-k check (Fig. 4) and the histograms of latents changed and contamination
(Figs. 5–6); recommend a default setting from the numbers.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as pads
import torch
from tqdm.auto import tqdm

from ops.coverage import coverage_curve
from ops.embedders import embed
from ops.errors import SaealignError
from ops.evaluation import (
    Evaluated,
    mean_hook_activation,
    recommend,
    run_method,
    score_results,
    standard_runs,
    summarise_method,
)
from ops.generation import SamplingParams
from ops.lake import DatasetKey, Lake
from ops.models import load_model
from ops.saes import load_sae
from ops.scoring import (
    dataset_key,
    lake_embedder,
    prompt_distances,
    read_manifest,
    resolve_dataset,
    score_latents,
    topic_align_texts,
    topic_scores,
)
from ops.texts import read_texts
from ops.topk_check import token_latent_sets, topk_check
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
    prompts_file: str = "embedded:demo-prompts"
    """Prompt source (a file with a text column or embedded:demo-prompts)."""
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


def _diffmean(model: Any, hook: str, align: list[str], lake: Lake, key: DatasetKey) -> torch.Tensor:
    """Mean hook activation of P_align minus that of up to 512 reference prompts, drawn at random
    (seeded) from the lake: its shards are cut in length order, so the first rows would be the
    shortest prompts."""
    prompts = pads.dataset(lake.table_glob("prompts", key).rsplit("/", 1)[0], filesystem=lake.fs, format="parquet")
    texts = prompts.to_table(columns=["prompt_id", "text"]).sort_by("prompt_id").column("text").to_pylist()
    rows = np.random.default_rng(0).choice(len(texts), min(512, len(texts)), replace=False)
    ref = [texts[i] for i in sorted(rows)]
    return mean_hook_activation(model, align, hook) - mean_hook_activation(model, ref, hook)


def _coverage(lake: Lake, key: DatasetKey, d_sae: int) -> list[dict[str, Any]]:
    acts = pads.dataset(
        lake.table_glob("activations", key).rsplit("/", 1)[0], filesystem=lake.fs, format="parquet"
    ).to_table(columns=["prompt_id", "latent"])
    n = len(np.unique(acts.column("prompt_id").to_numpy()))
    sizes = [2**e for e in range(7, 14) if 2**e <= max(n, 128)]
    return [asdict(p) for p in coverage_curve(acts, d_sae, sizes)]


def build(cfg: EvaluateConfig) -> dict[str, Any]:
    lake = Lake(cfg.lake)
    name = resolve_dataset(lake, cfg.dataset)
    key, manifest = dataset_key(lake, name), read_manifest(lake, name)
    scores_np, meta = topic_scores(cfg.lake, cfg.topic, name)
    align = topic_align_texts(cfg.lake, cfg.topic, name)
    embedder = lake_embedder(lake, key)
    model = load_model(key.model)
    sae = load_sae(manifest["config"]["sae"])
    prompts = read_texts(cfg.prompts_file).texts
    prompts = prompts[: cfg.n_prompts] if cfg.n_prompts else prompts
    params = SamplingParams(
        max_new_tokens=cfg.max_new_tokens, top_k=cfg.top_k, temperature=cfg.temperature, stop_at_eos=False
    )
    scores = torch.from_numpy(scores_np)
    runs = standard_runs(scores, cfg.topic, cfg.diffmean_scale)
    if cfg.methods:
        unknown = set(cfg.methods) - {r.label for r in runs}
        if unknown:
            raise SaealignError(f"unknown method(s) {sorted(unknown)}; choose from {[r.label for r in runs]}")
        runs = [r for r in runs if r.label in cfg.methods or r.label == "orig"]
    diffmean = _diffmean(model, key.hook, align, lake, key) if any(r.diffmean_scale for r in runs) else None
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
        "goals": _goals(summaries, evaluated, len(prompts)),
        "costs": {
            "set_up": json.loads(cfg.setup_costs) if cfg.setup_costs else {"lake_wall_s": manifest.get("wall_s")},
            "per_topic": _per_topic_cost(lake, key, align, embedder),
            "per_token": {s["method"]: s["s_per_token"] for s in summaries},
            "per_token_batch": min(cfg.batch_size, len(prompts) * len(cfg.seeds)),
        },
        "coverage": _coverage(lake, key, int(sae.cfg.d_sae)),
        "topk_check": check.to_dict(),
        "generations": {ev.label: ev.rows for ev in evaluated},
    }
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=_json_default) + "\n")
    (out / "report.html").write_text(_evaluate_report.render(report))
    return report


def _goals(summaries: list[dict[str, Any]], evaluated: list[Evaluated], n_prompts: int) -> dict[str, Any]:
    """Issue goals, stated plainly: swap closer than orig per prompt, perplexity, contamination."""
    by = {s["method"]: s for s in summaries}
    ev = {e.label: e for e in evaluated}
    if "swap" not in ev or "clamp" not in by:
        return {}
    per_prompt = lambda e: e.column("distance").reshape(-1, n_prompts).mean(0)  # noqa: E731
    closer = float((per_prompt(ev["swap"]) < per_prompt(ev["orig"])).mean())
    ppl_ratio = by["swap"]["median_perplexity"] / by["orig"]["median_perplexity"]
    return {
        "swap_closer_than_orig_share": closer,
        "swap_closer_goal_met": closer >= 0.7,
        "swap_perplexity_ratio": ppl_ratio,
        "swap_perplexity_goal_met": ppl_ratio <= 1.5,
        "swap_contamination_below_clamp": (by["swap"]["contamination"] or 1) < (by["clamp"]["contamination"] or 0),
    }


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
    for key, value in report["goals"].items():
        print(f"  {key}: {value}")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(EvaluateConfig, argv, "saealign evaluate")
    report = build(cfg)
    print_summary(report)
    print(f"report: {Path(cfg.out).resolve() / 'report.html'}")
    return 0
