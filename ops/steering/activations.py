"""Hook activations from a language model: batching, position masks, running to one hook.

One rule everywhere (``ops.steering.engine.protected_positions``): the first position and special
tokens (BOS, EOS, pad) are excluded from SAE training, prompt summaries and interventions. They
carry the attention-sink activation, an outlier the SAE reconstructs poorly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ops.batching import length_batches
from ops.errors import SaealignError
from ops.models.lm import LanguageModel
from ops.steering.engine import hook_activations, hook_layer, protected_positions, special_ids_of


def check_hook(model: LanguageModel, hook_name: str) -> int:
    """Validate ``hook_name`` against the model and return its block index."""
    layer = hook_layer(hook_name)
    if hook_name not in model.tl.hook_dict:
        examples = ", ".join(n for n in model.hook_names() if n.startswith("blocks.0."))[:200]
        raise SaealignError(
            f"model '{model.name}' has no hook '{hook_name}' ({model.tl.cfg.n_layers} blocks); "
            f"fix: pick a hook such as {examples}"
        )
    return layer


@dataclass
class TokenBatch:
    """A right-padded batch: ``tokens`` [batch, seq], ``attention_mask`` [batch, seq] (1 = real),
    ``keep`` [batch, seq] (True where a position counts: real, not special, not position 0)."""

    tokens: torch.Tensor
    attention_mask: torch.Tensor
    keep: torch.Tensor
    rows: list[int]


def pad_batch(model: LanguageModel, ids: Sequence[Sequence[int]], rows: list[int]) -> TokenBatch:
    """Right-pad token id lists and compute the counted-position mask."""
    pad_id = model.tokenizer.pad_token_id
    pad_id = 0 if pad_id is None else pad_id
    width = max(len(r) for r in ids)
    tokens = torch.full((len(ids), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention[i, : len(row)] = 1
    special = torch.tensor(special_ids_of(model.tokenizer), dtype=torch.long)
    real, protected = protected_positions(tokens, attention, 0, special, (len(ids), width))
    keep = real & ~protected
    return TokenBatch(tokens=tokens, attention_mask=attention, keep=keep, rows=rows)


def iter_batches(model: LanguageModel, texts: Sequence[str], max_tokens: int, context: int) -> Iterator[TokenBatch]:
    """Yield batches of at most ``max_tokens`` padded tokens, texts sorted by length inside
    a window so padding stays small. Texts are truncated to ``context`` tokens."""
    ids = model.tokenize(list(texts), max_length=context)
    for batch in length_batches([len(row) for row in ids], max_tokens):
        yield pad_batch(model, [ids[j] for j in batch], batch)


def run_to_hook(model: LanguageModel, batch: TokenBatch, hook_name: str) -> torch.Tensor:
    """Activations [batch, seq, d_model] at ``hook_name``, running only the blocks needed."""
    return hook_activations(model.tl, batch.tokens.to(model.device), batch.attention_mask.to(model.device), hook_name)
