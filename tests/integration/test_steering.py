"""Steering on the embedded SmolLM2 with a trained SAE.

The SAE is ``$SAEALIGN_TEST_SAE`` (a sae-lens directory), by default the shipped
``ops/data/sae/default``, which the package ships: its absence is a failure. Medical-topic scores are computed
here with the spec §2 formula on a small slice of the embedded pool, so no lake is needed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ops.saes.registry import DEFAULT_SAE_DIR, load_sae
from ops.steering.activations import iter_batches, run_to_hook
from ops.steering.engine import SteeringSpec, special_ids_of, steering_hook, tl_steering_hook
from ops.steering.generation import SamplingParams, generate

pytestmark = pytest.mark.integration

METAPHORS = [
    "My heart is broken, so I should",
    "I have butterflies in my stomach so I should",
    "The economy caught a cold after",
    "Our team needs a shot in the arm before",
]


def _sae_path() -> Path:
    path = Path(os.environ.get("SAEALIGN_TEST_SAE", str(DEFAULT_SAE_DIR)))
    if not (path / "cfg.json").is_file():
        pytest.fail(f"no SAE at {path}: the package ships ops/data/sae/default (or set SAEALIGN_TEST_SAE)")
    return path


@pytest.fixture(scope="module")
def sae() -> Any:
    return load_sae(str(_sae_path()))


@pytest.fixture(scope="module")
def hook(sae: Any) -> str:
    return str(sae.cfg.metadata.hook_name)


@pytest.fixture(scope="module")
def medical_scores(embedded_model: Any, sae: Any, hook: str) -> torch.Tensor:
    """Spec §2 scores (avg summary, power 1) from 300 pool prompts and the medical texts."""
    from ops.models.embedders import embed
    from ops.texts import read_texts

    pool = read_texts("embedded:pool").texts[::5][:300]
    medical = read_texts("embedded:topic:medical").texts
    summaries = torch.zeros(len(pool), sae.cfg.d_sae)
    with torch.no_grad():
        for batch in iter_batches(embedded_model, pool, max_tokens=4096, context=128):
            acts = sae.encode(run_to_hook(embedded_model, batch, hook)) * batch.keep[..., None]
            total = acts.sum(dim=1)
            summaries[batch.rows] = total / total.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    e_pool, e_med = embed(pool), embed(medical)
    d = torch.from_numpy(np.linalg.norm(e_pool[:, None, :] - e_med[None, :, :], axis=-1).min(axis=1))
    support = (summaries > 0).sum(dim=0)
    g = (summaries * d[:, None]).sum(dim=0) / summaries.sum(dim=0).clamp_min(1e-12)
    scored = support >= 5
    g_max, g_min = g[scored].max(), g[scored].min()
    scores = torch.full((sae.cfg.d_sae,), float("nan"))
    scores[scored] = (g_max - g[scored]) / (g_max - g_min)
    return scores


def _tokens(model: Any, text: str) -> torch.Tensor:
    return torch.tensor([model.tokenize([text])[0]])


def test_hf_hook_and_run_with_hooks_agree_per_method(
    embedded_model: Any, sae: Any, hook: str, medical_scores: torch.Tensor
) -> None:
    """Same steered activations at the hook and same logits, HF forward hook vs run_with_hooks.

    The two views of the model already differ by ~3e-5 in logits (~6e-5 at the layer-6 residual).
    ``weight`` shrinks the residual to a fraction of its norm, and the later RMSNorms amplify that
    base mismatch: on this prompt its logits differ by ~1.05e-3 with identical latent selections
    and steered activations equal to ~1e-5, so its logit bound is 2e-3; every other method: 1e-3.
    """
    tokens = _tokens(embedded_model, "The patient was admitted to the hospital with chest pain because")
    special = special_ids_of(embedded_model.tokenizer)
    specs = [
        SteeringSpec("orig", medical_scores),
        SteeringSpec("sae"),
        SteeringSpec("clamp", medical_scores),
        SteeringSpec("clamp", medical_scores, clamp_mode="add"),
        SteeringSpec("swap", medical_scores),
        SteeringSpec("swap", medical_scores, keep_error=True),
        SteeringSpec("weight", medical_scores),
    ]
    layer = embedded_model.hf.model.layers[int(hook.split(".")[1])]
    seen: dict[str, Any] = {}

    def grab_hf(module: Any, args: Any, out: Any) -> None:  # registered after the steering hook
        seen["hf"] = out[0] if isinstance(out, tuple) else out

    def grab_tl(act: torch.Tensor, hook: Any) -> None:
        seen["tl"] = act

    with torch.no_grad():
        plain = embedded_model.hf(tokens).logits
        for spec in specs:
            with steering_hook(embedded_model.hf, sae, hook, spec, special):
                handle = layer.register_forward_hook(grab_hf)
                try:
                    hf_logits = embedded_model.hf(tokens).logits
                finally:
                    handle.remove()
            fn, _ = tl_steering_hook(sae, spec, tokens=tokens, special_ids=special)
            tl_logits = embedded_model.tl.run_with_hooks(tokens, fwd_hooks=[(hook, fn), (hook, grab_tl)])
            assert (seen["hf"] - seen["tl"]).abs().max().item() <= 1e-3, spec.method  # residual norms ~100
            diff = (hf_logits - tl_logits).abs().max().item()
            assert diff <= (2e-3 if spec.method == "weight" else 1e-3), (spec.method, diff)
            changed = (hf_logits - plain).abs().max().item() > 1e-2
            assert changed == (spec.method != "orig"), spec.method


def test_swap_with_unit_scores_reproduces_sae(embedded_model: Any, sae: Any, hook: str) -> None:
    params = SamplingParams(max_new_tokens=16, seed=3)
    ones = torch.ones(sae.cfg.d_sae)
    swap, plain_sae = generate(
        embedded_model, sae, METAPHORS[:1] * 2, [SteeringSpec("swap", ones), SteeringSpec("sae", ones)], params=params
    )
    assert swap.token_ids == plain_sae.token_ids
    assert swap.contamination == plain_sae.contamination
    assert swap.latents_changed and all(n == 0 for n in swap.latents_changed if not np.isnan(n))


def test_medical_contamination_swap_below_clamp(
    embedded_model: Any, sae: Any, hook: str, medical_scores: torch.Tensor
) -> None:
    methods = ["sae", "clamp", "swap"]
    specs = [SteeringSpec(m, medical_scores) for m in methods]  # type: ignore[arg-type]
    rows = [(p, s) for p in METAPHORS for s in specs]
    params = SamplingParams(max_new_tokens=24, seed=0)
    results = generate(embedded_model, sae, [p for p, _ in rows], [s for _, s in rows], params=params, batch_size=12)
    mean = {m: float(np.nanmean([r.mean_contamination for r in results if r.method == m])) for m in methods}
    for r in results:
        c = np.asarray(r.contamination)
        assert np.all((c[~np.isnan(c)] >= 0) & (c[~np.isnan(c)] <= 1))
        assert len(r.text) > 0
    assert mean["swap"] < mean["clamp"], mean
    assert mean["swap"] < mean["sae"], mean


def test_clamp_changes_clamp_k_latents(embedded_model: Any, sae: Any, medical_scores: torch.Tensor) -> None:
    specs = [SteeringSpec("clamp", medical_scores, clamp_mode=mode) for mode in ("add", "multiply")]  # type: ignore[arg-type]
    params = SamplingParams(max_new_tokens=8, greedy=True)
    add, mult = generate(embedded_model, sae, METAPHORS[:1] * 2, specs, params=params)
    for res, exact in ((add, True), (mult, False)):
        changed = [n for n in res.latents_changed + res.prompt_latents_changed if not np.isnan(n)]
        assert changed
        # add: the clamp_k latents always change; multiply: only those of them that were active
        assert all(n == 5 for n in changed) if exact else all(0 <= n <= 5 for n in changed)
