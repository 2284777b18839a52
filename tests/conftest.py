"""Shared fixtures: tiny random models for unit tests; the embedded models for integration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def make_topk_sae(d_in: int, d_sae: int, k: int, hook: str, seed: int = 0) -> Any:
    """A random sae-lens TopK inference SAE (no training)."""
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    torch.manual_seed(seed)
    cfg = TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, metadata=SAEMetadata(hook_name=hook, model_name="test"))
    sae = TopKSAE(cfg)
    with torch.no_grad():
        sae.W_enc.normal_(0, 1 / d_in**0.5)
        sae.W_dec.copy_(sae.W_enc.T)
    return sae


@pytest.fixture(scope="session")
def embedded_model() -> Any:
    from ops.models.lm import load_model

    return load_model()


@pytest.fixture(scope="session")
def random_sae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random TopK SAE for the embedded model saved in sae-lens format."""
    path = tmp_path_factory.mktemp("random_sae")
    make_topk_sae(576, 256, 8, "blocks.6.hook_resid_post").save_model(path)
    return path
