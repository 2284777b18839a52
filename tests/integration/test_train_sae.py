from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sae_lens import SAE

from ops.errors import SaealignError
from workflows.train_sae import TrainSAEConfig, build


def test_tiny_sae_trains_saves_and_reloads(tmp_path: Path) -> None:
    cfg = TrainSAEConfig(
        out=str(tmp_path / "sae"),
        d_sae=128,
        k=8,
        sources=("embedded:pool#:60",),
        eval_holdout=10,
        ce_texts=10,
        batch_size=32,
        epochs=8,
        context=64,
    )
    result = build(cfg)
    losses = result["losses"]
    # per-batch MSE is noisy (a few high-norm tokens dominate a batch): compare 20-step means
    assert len(losses) >= 100
    assert sum(losses[-20:]) / 20 < 0.8 * sum(losses[:20]) / 20
    assert result["explained_variance"] > 0
    sae = SAE.load_from_disk(tmp_path / "sae")
    x = torch.randn(5, 576)
    acts = sae.encode(x)
    assert acts.shape == (5, 128) and sae.decode(acts).shape == (5, 576)
    assert ((acts > 0).sum(-1) <= 8).all()
    manifest = json.loads((tmp_path / "sae" / "manifest.json").read_text())
    assert manifest["tokens_collected"] > 0 and manifest["text_sources"][0]["rows"] == 60
    assert set(json.loads((tmp_path / "sae" / "eval.json").read_text())) >= {"explained_variance", "ce_loss_score"}
    assert not (tmp_path / "sae" / "activations").exists()


def test_bad_input(tmp_path: Path) -> None:
    with pytest.raises(SaealignError, match="d-sae must be positive"):
        TrainSAEConfig(d_sae=0)
    with pytest.raises(SaealignError, match=r"no hook .blocks\.99\.hook_resid_post."):
        build(
            TrainSAEConfig(
                out=str(tmp_path / "a"),
                hook="blocks.99.hook_resid_post",
                sources=("embedded:pool#:20",),
                eval_holdout=5,
            )
        )
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(SaealignError, match="has no rows"):
        build(TrainSAEConfig(out=str(tmp_path / "b"), sources=(str(tmp_path / "empty.jsonl"),)))
