"""Quality of an SAE on held-out text: explained variance, CE-loss recovered, L0, dead latents.

Definitions (counted positions only: no first position, no special tokens, no padding):

* explained variance = 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖², pooled over all counted tokens;
* CE-loss recovered (sae-lens ``ce_loss_score``) = (CE_zero − CE_sae) / (CE_zero − CE_clean), where
  the hook activation at counted positions is replaced by the reconstruction (CE_sae) or by
  zeros (CE_zero); the next-token loss is averaged over every real target token;
* mean L0 = active latents per counted token; dead fraction = share of latents that never fire.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ops.models.lm import LanguageModel
from ops.steering.activations import TokenBatch, iter_batches, run_to_hook
from ops.steering.engine import hook_layer


@dataclass(frozen=True)
class SAEEvalReport:
    explained_variance: float
    ce_loss_score: float
    ce_clean: float
    ce_with_sae: float
    ce_zero_ablation: float
    mean_l0: float
    dead_fraction: float
    n_texts: int
    n_tokens: int
    n_ce_texts: int
    n_ce_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _next_token_loss(model: LanguageModel, resid: torch.Tensor, batch: TokenBatch, start: int) -> torch.Tensor:
    logits = model.tl(resid, start_at_layer=start)
    targets = batch.tokens[:, 1:].to(logits.device)
    real = batch.attention_mask[:, 1:].bool().to(logits.device)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), reduction="none")
    return loss[real.flatten()].sum()


@torch.no_grad()
def _reconstruction(
    model: LanguageModel, sae: Any, hook: str, texts: Sequence[str], context: int, batch_tokens: int
) -> dict[str, Any]:
    sse = sum_sq = l0 = 0.0
    n = 0
    mean_acc = torch.zeros(sae.cfg.d_in, dtype=torch.float64)
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    for batch in tqdm(list(iter_batches(model, texts, batch_tokens, context)), desc="SAE reconstruction"):
        x = run_to_hook(model, batch, hook)
        flat = x[batch.keep.to(x.device)]
        acts = sae.encode(flat)
        sse += float((flat - sae.decode(acts)).pow(2).sum())
        sum_sq += float(flat.pow(2).sum())
        mean_acc += flat.double().sum(0).cpu()
        n += len(flat)
        l0 += float((acts > 0).sum())
        fired |= (acts > 0).any(0).cpu()
    total_var = sum_sq - float(mean_acc.pow(2).sum()) / max(n, 1)
    return {
        "explained_variance": 1.0 - sse / total_var,
        "mean_l0": l0 / max(n, 1),
        "dead_fraction": float((~fired).float().mean()),
        "n_tokens": n,
    }


@torch.no_grad()
def _ce(
    model: LanguageModel, sae: Any, hook: str, texts: Sequence[str], context: int, batch_tokens: int
) -> dict[str, Any]:
    start = hook_layer(hook) + 1
    totals = torch.zeros(3, dtype=torch.float64)
    n_tokens = 0
    for batch in tqdm(list(iter_batches(model, texts, batch_tokens, context)), desc="SAE CE loss"):
        x = run_to_hook(model, batch, hook)
        keep = batch.keep.to(x.device)
        patched, zeroed = x.clone(), x.clone()
        patched[keep] = sae.decode(sae.encode(x[keep]))
        zeroed[keep] = 0.0
        for i, resid in enumerate((x, patched, zeroed)):
            totals[i] += float(_next_token_loss(model, resid, batch, start))
        n_tokens += int(batch.attention_mask[:, 1:].sum())
    clean, with_sae, zero = (totals / max(n_tokens, 1)).tolist()
    return {
        "ce_loss_score": (zero - with_sae) / (zero - clean),
        "ce_clean": clean,
        "ce_with_sae": with_sae,
        "ce_zero_ablation": zero,
        "n_ce_tokens": n_tokens,
    }


def evaluate_sae(
    model: LanguageModel,
    sae: Any,
    hook_name: str,
    texts: Sequence[str],
    context: int,
    ce_texts: int = 500,
    batch_tokens: int = 4096,
) -> SAEEvalReport:
    """Measure ``sae`` at ``hook_name``: reconstruction on all ``texts``, CE loss on the first
    ``ce_texts`` of them (the CE needs three runs of the rest of the model per batch)."""
    ce_subset = list(texts[:ce_texts])
    return SAEEvalReport(
        **_reconstruction(model, sae, hook_name, texts, context, batch_tokens),
        **_ce(model, sae, hook_name, ce_subset, context, batch_tokens),
        n_texts=len(texts),
        n_ce_texts=len(ce_subset),
    )
