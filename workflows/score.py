"""``saealign score``: score every SAE latent of a lake dataset for a topic (docs/algorithms.md §2).

Embeds the align texts (P_align) with the lake's embedder, computes each reference prompt's
minimum distance to them, runs the DuckDB scoring query over the dataset's activations and stores
the scores in ``<lake>/scores.duckdb`` (one transaction) and ``<lake>/scores/topic=<t>/``::

    saealign score --lake out/lake --topic medical --align-file embedded:topic:medical
    saealign score --lake out/lake --topic shoes --align-text "running shoes" "leather boots"

``--check`` runs the paper's Fig. 4 validation instead: for k = 1…K, the share of tokens of
aligned vs unaligned text that fire at least one of the top-k latents (table, PNG and JSON)::

    saealign score --check --lake out/lake --topic medical --unaligned-file embedded:unaligned
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ops.errors import SaealignError
from ops.lake.contract import Lake
from ops.scoring.scores import (
    check_topic_name,
    dataset_key,
    score_topic,
    topic_align_texts,
    topic_scores,
)
from ops.texts import read_many
from workflows._config import parse_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreConfig:
    """Score every SAE latent of a lake dataset for a topic, or check a topic's scores (--check)."""

    lake: str = "out/lake"
    """Lake root (local path or pyarrow filesystem URI) written by `saealign build-lake`."""
    topic: str = ""
    """Topic name (letters, digits, '.', '_', '-'); it keys the scores in the lake."""
    dataset: str | None = None
    """Lake dataset (a manifest name); default: the lake's only dataset."""
    align_file: tuple[str, ...] = ()
    """Align-text sources: files with a text column (.jsonl/.csv/.parquet) or embedded:topic:<name>."""
    align_text: tuple[str, ...] = ()
    """Align texts given inline (added to those of --align-file)."""
    text_column: str = "text"
    """Name of the text column in file sources."""
    align_sample: int = 0
    """Score with a seeded random sample of this many align texts (0 = all of them)."""
    align_seed: int = 0
    """Seed of --align-sample."""
    distance_power: Literal[1, 2] = 1
    """Power of the distance in g (1 as in the paper's text, 2 as in its public code)."""
    min_support: int = 20
    """Latents firing on fewer reference prompts get no score (NULL)."""
    replace: bool = False
    """Re-score a topic that already has scores for this dataset (otherwise an error)."""
    check: bool = False
    """Run the top-k check (paper Fig. 4) on an already scored topic instead of scoring."""
    aligned_file: str = ""
    """--check: aligned text source; empty = the align texts the topic was scored with."""
    unaligned_file: str = "embedded:unaligned"
    """--check: unaligned text source."""
    k_max: int = 50
    """--check: largest k."""
    out: str = ""
    """--check: output directory for topk_check.json and .png; empty = out/score-check/<topic>."""
    context: int = 256
    """--check: tokens per text (longer texts are truncated)."""
    device: str = "auto"
    """--check: 'auto' (cuda when available), 'cpu' or 'cuda'."""

    def __post_init__(self) -> None:
        if not self.topic:
            raise SaealignError("pass --topic NAME")
        check_topic_name(self.topic)
        if self.align_sample < 0:
            raise SaealignError(f"--align-sample must be >= 0, got {self.align_sample}")
        if self.min_support < 0 or self.k_max < 1 or self.context < 2:
            raise SaealignError("--min-support must be >= 0, --k-max >= 1 and --context >= 2")
        if not self.check and not (self.align_file or self.align_text):
            raise SaealignError("the align set is empty; fix: pass --align-file F and/or --align-text TEXT ...")


def align_texts(cfg: ScoreConfig) -> tuple[list[str], str]:
    """The align texts and a description of where they came from."""
    texts = (
        [t for table in read_many(list(cfg.align_file), cfg.text_column) for t in table.texts] if cfg.align_file else []
    )
    texts += list(cfg.align_text)
    parts = [*cfg.align_file, *([f"{len(cfg.align_text)} inline text(s)"] if cfg.align_text else [])]
    if 0 < cfg.align_sample < len(texts):
        texts = random.Random(cfg.align_seed).sample(texts, cfg.align_sample)
        parts.append(f"a sample of {cfg.align_sample} (seed {cfg.align_seed})")
    return texts, "; ".join(parts)


def build(cfg: ScoreConfig) -> dict[str, Any]:
    """Score the topic (or run the check); returns the stored topic row or the check result."""
    if cfg.check:
        return run_check(cfg)
    texts, source = align_texts(cfg)
    return score_topic(
        cfg.lake,
        cfg.topic,
        texts,
        dataset=cfg.dataset,
        power=cfg.distance_power,
        min_support=cfg.min_support,
        replace=cfg.replace,
        align_source=source,
    )


def run_check(cfg: ScoreConfig) -> dict[str, Any]:
    """Top-k check: load the dataset's model and SAE, encode both texts per token, compare."""
    from ops.models.lm import load_model, resolve_device
    from ops.saes.registry import check_sae_fits, load_sae
    from ops.scoring.topk_check import save_check, token_latent_sets, topk_check

    scores, meta = topic_scores(cfg.lake, cfg.topic, cfg.dataset)
    lake = Lake(cfg.lake)
    key, manifest = dataset_key(lake, meta["dataset"]), lake.read_manifest(meta["dataset"])
    sae_spec = (manifest.get("config") or {}).get("sae")
    if not sae_spec:
        raise SaealignError(
            f"the manifest of {meta['dataset']} records no SAE spec (config.sae); fix: rebuild the lake"
        )
    aligned = _check_texts(cfg, cfg.aligned_file) or topic_align_texts(cfg.lake, cfg.topic, meta["dataset"])
    unaligned = _check_texts(cfg, cfg.unaligned_file)
    device = resolve_device(cfg.device)
    model, sae = load_model(key.model, device=device), load_sae(sae_spec, device=device)
    hook = check_sae_fits(sae, model, key.hook)
    result = topk_check(
        scores,
        token_latent_sets(model, sae, hook, aligned, cfg.context),
        token_latent_sets(model, sae, hook, unaligned, cfg.context),
        range(1, cfg.k_max + 1),
    )
    out = Path(cfg.out or f"out/score-check/{cfg.topic}")
    paths = save_check(result, out, f"top-k check: {cfg.topic}\n{meta['dataset']}")
    return {"check": result, "paths": paths, "topic": cfg.topic, "dataset": meta["dataset"]}


def _check_texts(cfg: ScoreConfig, source: str) -> list[str]:
    return [t for table in read_many([source], cfg.text_column) for t in table.texts if t.strip()] if source else []


def _print_scores(result: dict[str, Any]) -> None:
    t = result["timings"]
    print(
        f"topic {result['topic']} on {result['dataset']}: {result['n_scored']} latents scored "
        f"(support >= {result['min_support']}), {result['n_align']} align texts, {result['n_prompts']} prompts"
    )
    print("  " + ", ".join(f"{k} {v:.2f}" for k, v in t.items()))
    print(f"  {'latent':>7}  {'score':>6}  {'g':>8}  {'support':>7}")
    for row in result["top"]:
        print(f"  {row['latent']:>7}  {row['score']:6.3f}  {row['g']:8.4f}  {row['support']:>7}")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ScoreConfig, argv, "saealign score")
    result = build(cfg)
    if cfg.check:
        print(result["check"].table())
        print(f"written: {result['paths']['png']}, {result['paths']['json']}")
    else:
        _print_scores(result)
    return 0
