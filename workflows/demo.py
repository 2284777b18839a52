"""``saealign demo`` (= ``make demo``): the main job on the embedded default, offline.

1. build the lake from the embedded pool with the shipped default SAE (reused when complete);
2. score the embedded medical topic (reused when scored);
3. evaluate every method on the embedded medical-metaphor prompts and write the report.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ops.errors import SaealignError
from ops.lake.contract import Lake
from ops.saes.registry import DEFAULT_SAE_DIR
from ops.scoring.scores import resolve_dataset
from workflows import build_lake, evaluate
from workflows._config import parse_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """Lake -> medical topic scores -> evaluation report, all on the embedded default."""

    out: str = "out/demo"
    """Output directory (lake/ and report/ inside)."""
    topic: str = "medical"
    """Embedded topic to score and steer toward."""
    n_prompts: int = 0
    """Demo prompts to evaluate: the first n of the 40 embedded ones (0 = all)."""
    seeds: tuple[int, ...] = (0,)
    """Sampling seeds per prompt."""
    max_new_tokens: int = 64
    """Tokens generated per prompt and method."""
    batch_size: int = 40
    """Prompts per generation batch (40: every demo prompt in one batch; larger batches cost less
    per row; tests/benchmarks/bench_generation.py measures it)."""
    workers: int = 0
    """LM/SAE actors for the lake (0 = auto, as in build-lake)."""


def _lake_step(cfg: DemoConfig, lake_dir: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    manifest = build_lake.build(build_lake.BuildLakeConfig(lake=lake_dir, workers=cfg.workers))
    return {"lake_build_s": time.perf_counter() - t0, "lake_first_build_s": manifest["wall_s"]}


def _score_step(cfg: DemoConfig, lake_dir: str) -> dict[str, Any]:
    from ops.scoring.scores import score_topic
    from ops.texts import read_texts

    lake = Lake(lake_dir)
    name = resolve_dataset(lake)
    if lake.exists(lake.scores_export_path(cfg.topic, name)):
        log.info("topic %s already scored; reusing it", cfg.topic)
        return {}
    texts = read_texts(f"embedded:topic:{cfg.topic}").texts
    row = score_topic(lake_dir, cfg.topic, texts, align_source=f"embedded:topic:{cfg.topic}")
    return {f"score_{k}": v for k, v in row["timings"].items()}


def build(cfg: DemoConfig) -> dict[str, Any]:
    if not (DEFAULT_SAE_DIR / "cfg.json").is_file():
        raise SaealignError(
            f"the default SAE is missing from {DEFAULT_SAE_DIR}; fix: train it with the command in the "
            "README (section 'Retraining the default SAE'), or reinstall a saealign that ships it"
        )
    wall = time.perf_counter()
    lake_dir = str(Path(cfg.out) / "lake")
    costs = _lake_step(cfg, lake_dir)
    costs.update(_score_step(cfg, lake_dir))
    ev_cfg = evaluate.EvaluateConfig(
        lake=lake_dir,
        topic=cfg.topic,
        n_prompts=cfg.n_prompts,
        seeds=cfg.seeds,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        out=str(Path(cfg.out) / "report"),
        setup_costs=json.dumps(costs),
    )
    report = evaluate.build(replace(ev_cfg))
    report["demo_wall_s"] = time.perf_counter() - wall
    return report


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(DemoConfig, argv, "saealign demo")
    report = build(cfg)
    evaluate.print_summary(report)
    print(f"demo finished in {report['demo_wall_s']:.0f}s")
    print(f"report: {(Path(cfg.out) / 'report' / 'report.html').resolve()}")
    return 0
