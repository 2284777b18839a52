"""Prompt-level summaries of SAE activations (docs/algorithms.md §1) and their sparse long form.

For prompt p with counted tokens t (no first position, no special tokens):

* ``avg``:   s_i = Σ_t a_i(t) / Σ_j Σ_t a_j(t)          (sums to 1 over latents)
* ``max``:   s_i = max_t a_i(t), normalised to sum 1
* ``count``: s_i = #{t : a_i(t) > 0}, normalised to sum 1

A prompt with no counted token (or no firing latent) has no summary row.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch

from ops.errors import SaealignError
from ops.lake.contract import ACTIVATIONS


def summarise(acts: torch.Tensor, prompt_index: torch.Tensor, n_prompts: int, kind: str) -> torch.Tensor:
    """Per-prompt summaries [n_prompts, d_sae] from token activations ``acts`` [n_tokens, d_sae]
    whose prompt is ``prompt_index`` [n_tokens]; rows normalised to sum 1 (all-zero rows stay 0)."""
    out = torch.zeros((n_prompts, acts.shape[1]), dtype=torch.float32, device=acts.device)
    acts = acts.float()
    if kind == "avg":
        out.index_add_(0, prompt_index, acts)
    elif kind == "count":
        out.index_add_(0, prompt_index, (acts > 0).float())
    elif kind == "max":
        idx = prompt_index[:, None].expand_as(acts)
        out.scatter_reduce_(0, idx, acts, reduce="amax", include_self=True)
    else:
        raise SaealignError(f"unknown summary '{kind}'; use avg, max or count")
    total = out.sum(dim=1, keepdim=True)
    return torch.where(total > 0, out / total.clamp_min(1e-30), out)


def sparse_rows(summary: torch.Tensor, prompt_ids: Sequence[int]) -> pa.Table:
    """Long-form (prompt_id, latent, value) rows of the non-zero summary entries."""
    rows, latents = torch.nonzero(summary, as_tuple=True)
    values = summary[rows, latents].cpu().numpy().astype(np.float32)
    ids = np.asarray(prompt_ids, dtype=np.int64)[rows.cpu().numpy()]
    return pa.table(
        {"prompt_id": ids, "latent": latents.cpu().numpy().astype(np.int32), "value": values},
        schema=ACTIVATIONS,
    )
