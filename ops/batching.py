"""Length-grouped batching shared by the LM (``ops.steering.activations.iter_batches``) and the sentence
embedder (``ops.models.embedders.embed``): texts sorted by length, each batch capped in padded tokens."""

from __future__ import annotations

from collections.abc import Sequence


def length_batches(lengths: Sequence[int], max_tokens: int, max_rows: int | None = None) -> list[list[int]]:
    """Indices grouped by length (shortest first) into batches of at most ``max_tokens`` padded
    tokens (rows × longest) and, when given, ``max_rows`` rows; a row longer than the budget gets
    a batch of its own."""
    batches: list[list[int]] = []
    batch: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: lengths[j]):
        full = max_rows is not None and len(batch) >= max_rows
        if batch and (full or (len(batch) + 1) * lengths[i] > max_tokens):
            batches.append(batch)
            batch = []
        batch.append(i)
    if batch:
        batches.append(batch)
    return batches
