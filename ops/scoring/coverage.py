"""Coverage of SAE latents by a reference pool (paper Fig. 3).

For pool sizes n, draw ``samples`` random subsets of n prompts (with replacement, as in the
paper) and report the share of latents with support ≥ 1 and ≥ ``min_support`` (min/mean/max).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ops.lake.contract import DatasetKey, Lake

POOL_SIZES = (128, 256, 512, 1024, 2048, 4096, 8192)  # 2^7 … 2^13, as in the paper


@dataclass(frozen=True)
class CoveragePoint:
    size: int
    threshold: int
    mean: float
    low: float
    high: float


def coverage_curve(
    activations: pa.Table,
    d_sae: int,
    sizes: Sequence[int] = POOL_SIZES,
    samples: int = 5,
    thresholds: Sequence[int] = (1, 20),
    seed: int = 0,
) -> list[CoveragePoint]:
    """Coverage points from long-form activations (prompt_id, latent, value)."""
    ids = activations.column("prompt_id").to_numpy()
    latents = activations.column("latent").to_numpy().astype(np.int64)
    prompts, row_prompt = np.unique(ids, return_inverse=True)
    # prompt x latent incidence as sorted (prompt, latent) pairs
    rng = np.random.default_rng(seed)
    points: list[CoveragePoint] = []
    for size in sizes:
        shares: dict[int, list[float]] = {t: [] for t in thresholds}
        for _ in range(samples):
            draw = rng.integers(0, len(prompts), size=size)
            weight = np.bincount(draw, minlength=len(prompts))
            support = np.bincount(latents, weights=weight[row_prompt], minlength=d_sae)
            for t in thresholds:
                shares[t].append(float((support >= t).mean()))
        for t in thresholds:
            v = np.array(shares[t])
            points.append(CoveragePoint(size, t, float(v.mean()), float(v.min()), float(v.max())))
    return points


def dataset_coverage(lake: Lake, key: DatasetKey, d_sae: int) -> list[CoveragePoint]:
    """Coverage points of one lake dataset, for the pool sizes of the paper that it can fill
    (2^7 at least, whatever its size)."""
    acts = lake.dataset("activations", key).to_table(columns=["prompt_id", "latent"])
    n = len(np.unique(acts.column("prompt_id").to_numpy()))
    return coverage_curve(acts, d_sae, [s for s in POOL_SIZES if s <= max(n, POOL_SIZES[0])])
