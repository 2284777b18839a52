"""The scoring check of paper A Fig. 4 (docs/algorithms.md §4): for k = 1…K, the share of tokens of aligned
text vs unaligned text on which at least one of the top-k scored latents fires.

:func:`topk_check` is pure: it takes per-token sets of firing latents (arrays of latent
indices). :func:`token_latent_sets` makes them with a model and an SAE; :func:`firing_sets` makes
them from a dense activation matrix.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ops.errors import SaealignError
from ops.models.lm import LanguageModel
from ops.steering.activations import iter_batches, run_to_hook


@dataclass(frozen=True)
class TopkCheck:
    """Shares per k of tokens firing at least one top-k latent."""

    ks: list[int]
    aligned: list[float]
    unaligned: list[float]
    n_aligned_tokens: int
    n_unaligned_tokens: int
    top_latents: list[int]

    @property
    def passed(self) -> bool:
        """Aligned text fires the top latents more often than unaligned text, for every k."""
        return all(a > u for a, u in zip(self.aligned, self.unaligned, strict=True))

    def table(self) -> str:
        lines = [f"{'k':>4}  {'aligned':>8}  {'unaligned':>9}  {'ratio':>6}", "-" * 34]
        for k, a, u in zip(self.ks, self.aligned, self.unaligned, strict=True):
            ratio = f"{a / u:6.2f}" if u > 0 else "   inf"
            lines.append(f"{k:>4}  {a:8.3f}  {u:9.3f}  {ratio}")
        n_a, n_u = self.n_aligned_tokens, self.n_unaligned_tokens
        lines.append(f"tokens: aligned {n_a}, unaligned {n_u}; aligned above unaligned for every k: {self.passed}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def score_ranks(scores: np.ndarray) -> np.ndarray:
    """rank [d_sae]: 0 for the highest score; unscored (NaN) latents rank last (d_sae). Ties
    are broken by latent index."""
    scores = np.asarray(scores, dtype=np.float64)
    valid = ~np.isnan(scores)
    order = np.flatnonzero(valid)[np.argsort(-scores[valid], kind="stable")]
    ranks = np.full(len(scores), len(scores), dtype=np.int64)
    ranks[order] = np.arange(len(order))
    return ranks


def min_ranks(ranks: np.ndarray, token_latents: Sequence[np.ndarray]) -> np.ndarray:
    """Per token, the best (lowest) rank among its firing latents; d_sae when none fires."""
    lengths = np.array([len(t) for t in token_latents], dtype=np.int64)
    out = np.full(len(token_latents), len(ranks), dtype=np.int64)
    if lengths.sum() == 0:
        return out
    flat = ranks[np.concatenate([np.asarray(t, dtype=np.int64) for t in token_latents])]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    nonempty = lengths > 0
    out[nonempty] = np.minimum.reduceat(flat, starts[nonempty])
    return out


def topk_check(
    scores: np.ndarray,
    aligned_token_latents: Sequence[np.ndarray],
    unaligned_token_latents: Sequence[np.ndarray],
    ks: Sequence[int],
) -> TopkCheck:
    """For each k, the share of tokens whose firing set meets the k highest-scored latents."""
    if not aligned_token_latents or not unaligned_token_latents:
        raise SaealignError("the top-k check needs tokens of aligned and of unaligned text; fix: pass non-empty texts")
    ranks = score_ranks(scores)
    best_a = min_ranks(ranks, aligned_token_latents)
    best_u = min_ranks(ranks, unaligned_token_latents)
    ks = [int(k) for k in ks]
    top = [int(i) for i in np.argsort(ranks, kind="stable")[: max(ks, default=0)] if ranks[i] < len(ranks)]
    return TopkCheck(
        ks=ks,
        aligned=[float((best_a < k).mean()) for k in ks],
        unaligned=[float((best_u < k).mean()) for k in ks],
        n_aligned_tokens=len(best_a),
        n_unaligned_tokens=len(best_u),
        top_latents=top,
    )


def firing_sets(acts: np.ndarray | torch.Tensor) -> list[np.ndarray]:
    """Per row of a dense activation matrix [n_tokens, d_sae], the indices of latents > 0."""
    dense = acts.detach().cpu().numpy() if isinstance(acts, torch.Tensor) else np.asarray(acts)
    rows, cols = np.nonzero(dense > 0)
    return np.split(cols.astype(np.int32), np.searchsorted(rows, np.arange(1, len(dense))))


@torch.no_grad()
def token_latent_sets(
    model: LanguageModel,
    sae: Any,
    hook: str,
    texts: Sequence[str],
    context: int = 256,
    max_tokens: int = 4096,
) -> list[np.ndarray]:
    """Firing latents of every counted token (position 0 and special tokens excluded) of ``texts``."""
    out: list[np.ndarray] = []
    device = next(sae.parameters()).device
    for batch in tqdm(list(iter_batches(model, texts, max_tokens, context)), desc="tokens", leave=False):
        acts = run_to_hook(model, batch, hook)
        x = acts[batch.keep.to(acts.device)]
        out.extend(firing_sets(sae.encode(x.to(device=device, dtype=torch.float32))))
    return out


def save_check(result: TopkCheck, out_dir: Path, title: str) -> dict[str, Path]:
    """Write ``topk_check.json`` and ``topk_check.png`` (shares vs k) to ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "topk_check.json", "png": out_dir / "topk_check.png"}
    paths["json"].write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result.ks, result.aligned, marker="o", markersize=3, label="aligned text")
    ax.plot(result.ks, result.unaligned, marker="o", markersize=3, label="unaligned text")
    ax.set(xlabel="k (top-k scored latents)", ylabel="share of tokens firing ≥ 1 top-k latent")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=120)
    plt.close(fig)
    return paths
