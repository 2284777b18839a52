"""AlignSAE end to end on the embedded model: a tiny TopK SAE, 3 embedded concepts, CPU."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from ops.errors import SaealignError, SAEMismatchError

pytestmark = pytest.mark.integration

HOOK = "blocks.3.hook_resid_post"
CONCEPTS = ("sentiment:positive", "sentiment:negative", "topic:sports")


@pytest.fixture(scope="module")
def model() -> Any:
    from ops.models.lm import load_model

    return load_model()


@pytest.fixture(scope="module")
def tiny_base(model: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny TopK SAE (d_sae 256, k 16) trained for a moment on embedded pool text."""
    from ops.saes.training import collect_activations, make_training_sae, train_sae
    from ops.texts import read_texts

    out = tmp_path_factory.mktemp("tiny_base")
    torch.manual_seed(0)
    texts = read_texts("embedded:pool#:300").texts
    shards = collect_activations(model, texts, HOOK, out / "acts", context=64)
    meta = {"model_name": "smollm2-135m", "hook_name": HOOK, "context_size": 64, "prepend_bos": False}
    sae = make_training_sae("topk", model.d_model, 256, 16, 0.0, meta, "cpu")
    train_sae(sae, shards.batches(512, 0), 2 * shards.n_tokens(), 512, 1e-3, "cpu")
    sae.save_inference_model(out / "sae")
    return out / "sae"


def _config(base: Path, out: Path, **overrides: Any) -> Any:
    from ops.alignsae.protocol import SwapSweep
    from ops.alignsae.training import AlignTrainConfig
    from workflows.align_sae import AlignSAEConfig

    defaults: dict[str, Any] = dict(
        out=str(out),
        sae=str(base),
        concepts=CONCEPTS,
        generic_sources=("embedded:pool#300:",),
        generic_texts=100,
        generic_eval_texts=40,
        context=64,
        train=AlignTrainConfig(stage1_steps=10, stage2_steps=100, batch_tokens=256, batch_texts=128),
        swaps=SwapSweep(swap_alphas=(1.0, 5.0), swap_prompts=4, swap_max_new_tokens=8),
        device="cpu",
    )
    return AlignSAEConfig(**{**defaults, **overrides})


def test_align_three_embedded_concepts(tiny_base: Path, model: Any, tmp_path: Path) -> None:
    from ops.alignsae.training import load_aligned_sae
    from workflows.align_sae import build, format_report

    cpu = time.process_time()
    report = build(_config(tiny_base, tmp_path / "aligned"))
    cpu = time.process_time() - cpu
    print(format_report(report), report["timings"], f"cpu {cpu:.0f}s")
    # the alignment itself (activations + post-training); the evaluation's swaps come on top.
    # CPU time of this process, not wall time: the test machines are shared and often loaded.
    align_wall = report["timings"]["activations_s"] + report["timings"]["train_s"]
    assert min(align_wall, cpu / 2) < 120, f"aligning took {align_wall:.0f}s wall, {cpu:.0f}s CPU"

    assert report["aligned"]["auc_mean"] > report["vanilla"]["auc_mean"]
    assert report["concept_slots"] == {c: 256 + j for j, c in enumerate(CONCEPTS)}
    assert report["swap"]["n_trials"] == 4 and len(report["swap"]["by_alpha"]) == 2

    aligned = load_aligned_sae(tmp_path / "aligned")
    assert aligned.concepts == list(CONCEPTS) and aligned.d_sae == 256 + 3
    manifest = json.loads((tmp_path / "aligned" / "manifest.json").read_text())
    assert manifest["concept_slots"]["topic:sports"] == 258
    lines = (tmp_path / "aligned" / "swaps.jsonl").read_text().splitlines()
    assert len(lines) == 4 * (1 + 2 * 2)


def test_unknown_concept_is_a_clear_error(tiny_base: Path, tmp_path: Path) -> None:
    from workflows.align_sae import build

    with pytest.raises(SaealignError, match=r"unknown concept.*topic:cars"):
        build(_config(tiny_base, tmp_path / "x", concepts=("topic:sports", "topic:cars")))


def test_sae_not_matching_the_model_is_a_clear_error(tmp_path: Path) -> None:
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    from workflows.align_sae import build

    meta = SAEMetadata(hook_name=HOOK, model_name="other")
    TopKSAE(TopKSAEConfig(d_in=64, d_sae=128, k=8, metadata=meta)).save_model(tmp_path / "wrong")
    with pytest.raises(SAEMismatchError, match="d_in=64 does not match"):
        build(_config(tmp_path / "wrong", tmp_path / "x"))


def test_slot_swap_generation_on_the_embedded_model(tiny_base: Path, model: Any, tmp_path: Path) -> None:
    from ops.alignsae.swaps import generate_ids, slot_spec
    from ops.alignsae.training import AlignedSAE, init_concept_slots, set_typical
    from ops.saes.registry import load_sae

    base = load_sae(str(tiny_base))
    aligned = AlignedSAE(base, ["a", "b"], {"a": "f", "b": "f"})
    x = torch.randn(40, model.d_model)
    labels = torch.zeros(40, 2, dtype=torch.bool)
    labels[:20, 0] = labels[20:, 1] = True
    init_concept_slots(aligned, x, labels.numpy())
    set_typical(aligned, x, labels.numpy())
    spec = slot_spec(aligned, {"b": 1.0}, ["a"])
    out = generate_ids(model, model.tokenize(["The match"]), 5, 0, hook=HOOK, sae=aligned, specs=[spec])[0]
    assert 0 < len(out) <= 5
    with pytest.raises(SaealignError, match="unknown concept"):
        slot_spec(aligned, {"c": 1.0})
