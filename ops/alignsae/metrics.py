"""AlignSAE metrics (docs/algorithms.md §6): concept alignment AUC, vanilla best-latent baseline,
reconstruction MSE / explained variance, entanglement index, concept-swap success.

Conventions:

* A text's activation of a latent is the latent's activation on the text's pooled hook vector
  (mean over counted positions, or the last one); arrays are ``[n_texts, n_latents]``.
* AUC is the Mann–Whitney statistic with ties counted half (a latent silent on a positive and
  a negative text scores 0.5 for that pair), so an always-zero latent has AUC 0.5.
* Mutual information is in nats, from a joint histogram of discretised activations: one bin for
  "inactive" (≤ 0) and ``n_bins - 1`` equal-frequency bins over the active values.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch


def _average_ranks(scores: torch.Tensor) -> torch.Tensor:
    """1-based ranks down each column of ``scores`` [n, m], ties given their average rank."""
    cols = scores.T.contiguous()
    ordered, _ = cols.sort(dim=1)
    below = torch.searchsorted(ordered, cols, right=False)
    at_most = torch.searchsorted(ordered, cols, right=True)
    return ((below + at_most + 1).to(torch.float64) / 2).T


def auc_matrix(scores: np.ndarray | torch.Tensor, labels: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """AUC of every column of ``scores`` [n, m] for every column of bool ``labels`` [n, C]:
    returns [m, C]. A label column without positives or negatives gets NaN."""
    x = torch.as_tensor(np.asarray(scores, dtype=np.float32))
    y = torch.as_tensor(np.asarray(labels, dtype=bool)).to(torch.float64)
    n_pos = y.sum(0)
    n_neg = len(y) - n_pos
    out = []
    for start in range(0, x.shape[1], chunk):
        rank_sums = _average_ranks(x[:, start : start + chunk]).T @ y
        out.append((rank_sums - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return torch.cat(out).numpy()


def concept_auc(slot_acts: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUC per concept of its own slot: ``slot_acts`` [n, C] (column j = slot of concept j)."""
    return np.diagonal(auc_matrix(slot_acts, labels)).copy()


def best_latents(latent_acts: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vanilla baseline: for each concept, the single latent with the highest AUC on these
    (training) texts. Returns (latent index [C], its AUC [C])."""
    aucs = np.nan_to_num(auc_matrix(latent_acts, labels), nan=0.0)
    best = aucs.argmax(0)
    return best, aucs[best, np.arange(labels.shape[1])]


@dataclass
class ReconTally:
    """Streaming reconstruction error over batches of [tokens, d] activations.

    ``mse`` is the mean squared error per element; explained variance is
    1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² over all tokens added."""

    sse: float = 0.0
    sum_sq: float = 0.0
    n: int = 0
    d: int = 0
    total: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))

    def add(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        x, x_hat = x.detach().double().cpu(), x_hat.detach().double().cpu()
        if self.total.numel() == 0:
            self.total = torch.zeros(x.shape[-1], dtype=torch.float64)
        self.sse += float((x - x_hat).pow(2).sum())
        self.sum_sq += float(x.pow(2).sum())
        self.total += x.sum(0)
        self.n += len(x)
        self.d = x.shape[-1]

    @property
    def mse(self) -> float:
        return self.sse / max(self.n * self.d, 1)

    @property
    def explained_variance(self) -> float:
        variance = self.sum_sq - float(self.total.pow(2).sum()) / max(self.n, 1)
        return 1.0 - self.sse / variance if variance > 0 else float("nan")


def discretise(values: np.ndarray, n_bins: int = 4) -> np.ndarray:
    """Integer codes: 0 for inactive (≤ 0), 1..n_bins-1 for equal-frequency bins of active values."""
    values = np.asarray(values, dtype=np.float64)
    codes = np.zeros(len(values), dtype=np.int64)
    active = values > 0
    if n_bins < 2 or not active.any():
        return codes
    edges = np.quantile(values[active], np.linspace(0, 1, n_bins)[1:-1])
    codes[active] = 1 + np.searchsorted(edges, values[active], side="right")
    return codes


def mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    """Mutual information (nats) between two integer code arrays of equal length."""
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    ka, kb = int(a.max(initial=0)) + 1, int(b.max(initial=0)) + 1
    joint = np.bincount(a * kb + b, minlength=ka * kb).reshape(ka, kb).astype(np.float64)
    joint /= joint.sum()
    outer = joint.sum(1, keepdims=True) @ joint.sum(0, keepdims=True)
    nz = joint > 0
    return float(max(0.0, (joint[nz] * np.log(joint[nz] / outer[nz])).sum()))


def entanglement_index(slot_acts: np.ndarray, n_bins: int = 4) -> tuple[float, np.ndarray]:
    """Mean pairwise mutual information between the columns of ``slot_acts`` [n, C]
    (discretised with :func:`discretise`); returns (mean over pairs, the [C, C] MI matrix)."""
    codes = [discretise(col, n_bins) for col in np.asarray(slot_acts).T]
    mi = np.zeros((len(codes), len(codes)))
    for i, j in itertools.combinations(range(len(codes)), 2):
        mi[i, j] = mi[j, i] = mutual_information(codes[i], codes[j])
    pairs = list(itertools.combinations(range(len(codes)), 2))
    return (float(np.mean([mi[i, j] for i, j in pairs])) if pairs else 0.0), mi


def binding_accuracy(slot_acts: np.ndarray, labels: np.ndarray, families: Sequence[str]) -> float:
    """Diagonal binding accuracy: the share of texts whose own concept's slot is the most active
    (``slot_acts`` [n, C], normalised by the caller) among the slots of its concept's family."""
    acts, y = np.asarray(slot_acts, dtype=np.float64), np.asarray(labels, dtype=bool)
    if not len(acts):
        return float("nan")
    fams = np.asarray(families)
    hits = []
    for row, truth in zip(acts, y.argmax(1), strict=True):
        members = np.flatnonzero(fams == fams[truth])
        hits.append(members[int(np.argmax(row[members]))] == truth)
    return float(np.mean(hits))


def swap_success(predicted: Sequence[str], targets: Sequence[str]) -> float:
    """Share of swaps whose continuation is classified as the target concept."""
    if not targets:
        return float("nan")
    return float(np.mean([p == t for p, t in zip(predicted, targets, strict=True)]))


def best_alpha(
    rows: Sequence[tuple[float, float, float]], max_increase: float = 0.30
) -> tuple[float, float, float] | None:
    """The (α, success, perplexity ratio) row with the highest success among those whose
    perplexity ratio (steered over unsteered, geometric means over the same prompts) is at most
    ``1 + max_increase``; the smaller α on ties. None when no α keeps perplexity within the bound.

    The bound applies to the α, not to each continuation: one sampled continuation's perplexity
    varies far more than steering moves it (on concepts.jsonl a third of the *unsteered*
    continuations were above 1.3x the unsteered mean), so a per-continuation bound mostly
    measures sampling noise."""
    ok = [r for r in rows if np.isfinite(r[2]) and r[2] <= 1.0 + max_increase]
    return max(ok, key=lambda r: (r[1], -r[0])) if ok else None


def geometric_mean(values: Sequence[float]) -> float:
    """Geometric mean (the right average for perplexities); NaN for no values."""
    arr = np.asarray(values, dtype=np.float64)
    return float(np.exp(np.log(arr).mean())) if len(arr) else float("nan")
