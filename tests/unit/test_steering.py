"""Steering and steered generation on a tiny random Llama (HF + TransformerLens views) and tiny
sae-lens SAEs built from config. No network."""

from __future__ import annotations

import contextlib
import math
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ops.errors import SaealignError, SAEMismatchError
from ops.models.lm import LanguageModel, hooked_from_hf
from ops.steering.engine import (
    BatchSteerer,
    SAEView,
    SteeringSpec,
    check_scores_sae,
    check_steerable,
    contamination,
    decoder_layer_of,
    hf_hook_modules,
    latent_view,
    latents_changed,
    steering_hook,
    swap_acts,
    tl_steering_hook,
)
from ops.steering.generation import (
    MAX_NEW_TOKENS_LIMIT,
    SamplingParams,
    TokenEvent,
    cache_keyword,
    continuation_perplexities,
    generate,
)

D_MODEL, D_SAE, VOCAB, LAYER = 32, 64, 64, 1
HOOK = f"blocks.{LAYER}.hook_resid_post"
SPECIAL = [0, 1, 2]


class CharTokenizer:
    """A character tokenizer: ids 3..62, BOS 1, EOS = pad 2."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 2
    all_special_ids = SPECIAL

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict[str, list[list[int]]]:
        return {"input_ids": [[3 + ord(c) % 60 for c in t] for t in texts]}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join("" if skip_special_tokens and i in SPECIAL else chr(97 + (i - 3) % 26) for i in ids)


@pytest.fixture(scope="module")
def model() -> LanguageModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=D_MODEL,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.15,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    hf = LlamaForCausalLM(cfg).eval()
    for p in hf.parameters():
        p.requires_grad_(False)
    tl = hooked_from_hf(hf, None, 256, "cpu", "tiny").eval()
    return LanguageModel(
        name="tiny", tokenizer=CharTokenizer(), device="cpu", prepend_bos=True, n_ctx=256, _hf=hf, _tl=tl
    )


def _sae(kind: str, rescale: bool = False) -> Any:
    from sae_lens import (
        GatedSAE,
        GatedSAEConfig,
        JumpReLUSAE,
        JumpReLUSAEConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
    )

    torch.manual_seed(1)
    if kind == "topk":
        sae: Any = TopKSAE(TopKSAEConfig(d_in=D_MODEL, d_sae=D_SAE, k=6, rescale_acts_by_decoder_norm=rescale))
    elif kind == "relu":
        sae = StandardSAE(StandardSAEConfig(d_in=D_MODEL, d_sae=D_SAE))
    elif kind == "gated":
        sae = GatedSAE(GatedSAEConfig(d_in=D_MODEL, d_sae=D_SAE))
    else:
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=D_MODEL, d_sae=D_SAE))
    with torch.no_grad():
        sae.W_enc.normal_(0, 1.0 / D_MODEL**0.5)
        sae.W_dec.copy_(sae.W_enc.T * 0.5)
        sae.b_dec.normal_(0, 0.05)
        if kind == "gated":  # gate and magnitude biases differ: the gate threshold is not 0
            sae.b_gate.normal_(0, 0.1)
            sae.b_mag.normal_(0, 0.1)
            sae.r_mag.normal_(0, 0.3)
        else:
            sae.b_enc.normal_(0, 0.1)
        if kind == "jumprelu":
            sae.threshold.uniform_(0.0, 0.3)
    sae.cfg.metadata.hook_name = HOOK
    for p in sae.parameters():
        p.requires_grad_(False)
    return sae.eval()


@pytest.fixture(scope="module")
def sae() -> Any:
    return _sae("topk", rescale=True)


@pytest.fixture(scope="module")
def scores() -> torch.Tensor:
    s = torch.rand(D_SAE, generator=torch.Generator().manual_seed(3))
    s[::7] = float("nan")
    return s


def _acts(model: LanguageModel, n: int = 40) -> torch.Tensor:
    tokens = torch.randint(3, VOCAB, (2, n), generator=torch.Generator().manual_seed(5))
    _, cache = model.tl.run_with_cache(tokens, names_filter=HOOK)
    return cache[HOOK]


# ---------------------------------------------------------------------------------------------
# Pure interventions


@pytest.mark.parametrize(
    ("kind", "rescale"), [("topk", False), ("topk", True), ("relu", False), ("jumprelu", False), ("gated", False)]
)
def test_view_matches_sae_encode_decode(model: LanguageModel, kind: str, rescale: bool) -> None:
    sae = _sae(kind, rescale)
    view, x = SAEView.of(sae), _acts(model)
    acts = view.act(view.pre(x))
    torch.testing.assert_close(acts, sae.encode(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(view.decode(acts), sae.decode(sae.encode(x)), rtol=0, atol=1e-6)
    assert (acts > 0).sum(-1).float().mean() > 1  # the SAE is not dead


@pytest.mark.parametrize(
    ("kind", "rescale"), [("topk", False), ("topk", True), ("relu", False), ("jumprelu", False), ("gated", False)]
)
def test_swap_with_unit_scores_is_sae_exactly(model: LanguageModel, kind: str, rescale: bool) -> None:
    sae = _sae(kind, rescale)
    view, x = SAEView.of(sae), _acts(model)
    gamma = view.pre(x)
    acts = view.act(gamma)
    swapped = swap_acts(view, gamma, acts, torch.ones(D_SAE))
    assert torch.equal(swapped, acts)
    steerer_swap = BatchSteerer(view, [SteeringSpec("swap", torch.ones(D_SAE))])
    steerer_sae = BatchSteerer(view, [SteeringSpec("sae")])
    real = torch.ones(x.shape[:2], dtype=torch.bool)
    protected = torch.zeros_like(real)
    out_swap, stats = steerer_swap.apply(x, real, protected)
    out_sae, _ = steerer_sae.apply(x, real, protected)
    assert torch.equal(out_swap, out_sae)
    assert stats is not None and torch.all(stats.latents_changed == 0)
    assert torch.all(stats.contamination == 0)  # all scores 1


@pytest.mark.parametrize("kind", ["relu", "jumprelu", "gated"])
def test_swap_keeps_active_set_size_for_relu_saes(model: LanguageModel, kind: str, scores: torch.Tensor) -> None:
    view, x = SAEView.of(_sae(kind)), _acts(model)
    gamma = view.pre(x)
    acts = view.act(gamma)
    swapped = swap_acts(view, gamma, acts, torch.nan_to_num(scores, nan=0.0))
    k_t = (acts > 0).sum(-1)
    candidates = (gamma * torch.nan_to_num(scores, nan=0.0) > 0).sum(-1)
    # k_t preserved up to the number of candidates (for ReLU every candidate is already active,
    # so Swap drops the unscored latents; JumpReLU and gated SAEs can bring in latents below
    # their threshold: a gated SAE's gate is a JumpReLU threshold on its magnitude path)
    assert torch.equal((swapped > 0).sum(-1), torch.minimum(k_t, candidates))
    assert latents_changed(swapped, acts).sum() > 0


@pytest.mark.parametrize("kind", ["topk", "relu", "jumprelu", "gated"])
def test_clamp_changes_exactly_clamp_k_latents(model: LanguageModel, kind: str, scores: torch.Tensor) -> None:
    view, x = SAEView.of(_sae(kind)), _acts(model)
    real = torch.ones(x.shape[:2], dtype=torch.bool)
    real[:, :3] = False  # padding: not steered, no stats
    protected = torch.zeros_like(real)
    for k in (1, 5):
        add = BatchSteerer(view, [SteeringSpec("clamp", scores, clamp_k=k, clamp_mode="add")])
        _, stats = add.apply(x, real, protected)
        assert stats is not None
        assert torch.all(stats.latents_changed[real] == k)
        assert torch.isnan(stats.latents_changed[~real]).all()
        mult = BatchSteerer(view, [SteeringSpec("clamp", scores, clamp_k=k)])
        _, stats = mult.apply(x, real, protected)
        assert stats is not None and torch.all(stats.latents_changed[real] <= k)


def test_architectures_steering_cannot_run_name_themselves_and_the_fix(tmp_path: Path) -> None:
    from ops.saes.registry import load_sae
    from tests.conftest import make_sae, save_sae

    with pytest.raises(SAEMismatchError, match=r"cannot use a 'transcoder' SAE.*fix: use a standard, jumprelu"):
        latent_view(make_sae("transcoder", D_MODEL, D_SAE, HOOK))
    # a BatchTopK SAE as sae-lens saves it for inference is a JumpReLU SAE
    saved = load_sae(str(save_sae("batchtopk", tmp_path / "btk", D_MODEL, D_SAE, HOOK)))
    assert saved.cfg.architecture() == "jumprelu" and SAEView.of(saved).kind == "jumprelu"


@pytest.mark.parametrize(
    ("hook", "layer"),
    [("blocks.0.hook_resid_post", 0), ("blocks.2.hook_resid_pre", 1), ("blocks.2.hook_resid_post", 2)],
)
def test_residual_hooks_map_to_decoder_layer_outputs(model: LanguageModel, hook: str, layer: int) -> None:
    assert decoder_layer_of(hook) == layer
    base, module = hf_hook_modules(model.hf, hook)
    assert base is model.hf.model and module is model.hf.model.layers[layer]


@pytest.mark.parametrize(
    ("hook", "fix"),
    [
        ("blocks.1.attn.hook_z", "blocks.1.hook_resid_post or blocks.2.hook_resid_pre"),
        ("blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"),
        ("blocks.1.hook_resid_mid", "blocks.1.hook_resid_post"),
        ("blocks.0.hook_resid_pre", "blocks.0.hook_resid_post or blocks.1.hook_resid_pre"),
    ],
)
def test_hooks_steering_cannot_serve_are_refused_with_the_fix(model: LanguageModel, hook: str, fix: str) -> None:
    with pytest.raises(SAEMismatchError, match=f"not '{re.escape(hook)}'; fix: .*{re.escape(fix)}"):
        check_steerable(_sae("relu"), hook)
    with pytest.raises(SAEMismatchError, match=re.escape(hook)), steering_hook(model.hf, None, hook, SteeringSpec()):
        pass


def test_contamination_bounds_and_zero_over_zero(model: LanguageModel, sae: Any, scores: torch.Tensor) -> None:
    view, x = SAEView.of(sae), _acts(model)
    real = torch.ones(x.shape[:2], dtype=torch.bool)
    for method in ("sae", "clamp", "swap", "weight"):
        _, stats = BatchSteerer(view, [SteeringSpec(method, scores)]).apply(x, real, torch.zeros_like(real))  # type: ignore[arg-type]
        assert stats is not None
        c = stats.contamination
        assert torch.all((c >= 0) & (c <= 1)), method
    assert contamination(torch.zeros(3, D_SAE), scores).eq(0).all()
    # NaN scores count as 0: one active unscored latent is fully contaminating
    acts = torch.zeros(D_SAE)
    acts[0] = 2.0
    assert float(contamination(acts, scores)) == 1.0  # scores[0] is NaN


def test_swap_contaminates_less_than_clamp_on_random_scores(model: LanguageModel, sae: Any) -> None:
    view, x = SAEView.of(sae), _acts(model)
    s = torch.rand(D_SAE, generator=torch.Generator().manual_seed(9))
    real = torch.ones(x.shape[:2], dtype=torch.bool)
    means = {}
    for method in ("clamp", "swap"):
        _, stats = BatchSteerer(view, [SteeringSpec(method, s)]).apply(x, real, torch.zeros_like(real))  # type: ignore[arg-type]
        assert stats is not None
        means[method] = float(stats.contamination.nanmean())
    assert means["swap"] < means["clamp"]


# ---------------------------------------------------------------------------------------------
# Hooks: HF forward hook == TransformerLens run_with_hooks


def _specs(scores: torch.Tensor) -> list[SteeringSpec]:
    return [
        SteeringSpec("sae"),
        SteeringSpec("sae", keep_error=True),
        SteeringSpec("clamp", scores),
        SteeringSpec("clamp", scores, clamp_mode="add", clamp_factor=3.0),
        SteeringSpec("swap", scores),
        SteeringSpec("swap", scores, keep_error=True),
        SteeringSpec("swap", scores, strength=0.5),
        SteeringSpec("weight", scores),
        SteeringSpec("swap", scores, include_first=True),
    ]


def test_hf_hook_matches_transformer_lens(model: LanguageModel, sae: Any, scores: torch.Tensor) -> None:
    tokens = torch.tensor([[1, *range(5, 40)]])  # BOS first
    plain = model.hf(tokens).logits
    for spec in _specs(scores):
        with steering_hook(model.hf, sae, HOOK, spec, SPECIAL) as record:
            hf_logits = model.hf(tokens).logits
        fn, tl_record = tl_steering_hook(sae, spec, tokens=tokens, special_ids=SPECIAL)
        tl_logits = model.tl.run_with_hooks(tokens, fwd_hooks=[(HOOK, fn)])
        assert (hf_logits - tl_logits).abs().max() < 1e-4, spec
        identity = spec.method == "sae" and spec.keep_error  # x' + (x - x') = x
        assert ((hf_logits - plain).abs().max() > 1e-3) != identity, spec
        torch.testing.assert_close(record.steps[0].contamination, tl_record.steps[0].contamination, equal_nan=True)
        first_same = torch.allclose(hf_logits[0, 0], plain[0, 0], atol=1e-6)
        assert first_same != spec.include_first  # BOS/position 0 untouched unless asked
    assert not model.hf.model.layers[LAYER]._forward_hooks  # removed on exit
    assert not model.hf.model._forward_pre_hooks


def test_special_tokens_inside_the_prompt_are_untouched(model: LanguageModel, sae: Any, scores: torch.Tensor) -> None:
    tokens = torch.tensor([[5, 6, 7, 1, 8, 9]])
    with steering_hook(model.hf, sae, HOOK, SteeringSpec("swap", scores), SPECIAL) as record:
        model.hf(tokens)
    steered = record.steps[0].steered[0].tolist()
    assert steered == [False, True, True, False, True, True]
    assert torch.isnan(record.steps[0].contamination[0, [0, 3]]).all()


# ---------------------------------------------------------------------------------------------
# Generation: KV-cached decode steps are steered


def _full_steered_argmax(
    model: LanguageModel, sae: Any, spec: SteeringSpec, ids: list[int], banned: int | None = None
) -> list[int]:
    with steering_hook(model.hf, sae, HOOK, spec, SPECIAL):
        logits = model.hf(torch.tensor([ids])).logits[0]
    if banned is not None:
        logits[:, banned] = -torch.inf
    return logits.argmax(-1).tolist()


def test_decode_steps_are_steered(model: LanguageModel, sae: Any, scores: torch.Tensor) -> None:
    spec = SteeringSpec("clamp", scores, clamp_mode="add", clamp_factor=4.0)
    params = SamplingParams(max_new_tokens=24, greedy=True, stop_at_eos=False)
    prompt = "the patient was"
    res = generate(model, sae, [prompt], spec, params=params)[0]
    plain = generate(model, None, [prompt], None, params=params)[0]
    assert res.token_ids != plain.token_ids
    prompt_ids = res.prompt_token_ids
    full = prompt_ids + res.token_ids
    # Greedy consistency: a full (uncached) steered forward predicts every generated token.
    argmax = _full_steered_argmax(model, sae, spec, full)
    assert argmax[len(prompt_ids) - 1 : -1] == res.token_ids
    assert all(n == spec.clamp_k for n in res.latents_changed)
    # Negative control: a hook that steers only the prefill fails the same check.
    prefill_only = _prefill_only_greedy(model, sae, spec, prompt_ids, 24)
    assert _full_steered_argmax(model, sae, spec, prompt_ids + prefill_only)[len(prompt_ids) - 1 : -1] != prefill_only


def _prefill_only_greedy(model: LanguageModel, sae: Any, spec: SteeringSpec, ids: list[int], n: int) -> list[int]:
    from transformers import DynamicCache

    cached = {cache_keyword(model.hf): DynamicCache(config=model.hf.config), "use_cache": True}
    with steering_hook(model.hf, sae, HOOK, spec, SPECIAL):
        out = model.hf(torch.tensor([ids]), **cached)
    tokens = [int(out.logits[0, -1].argmax())]
    for _ in range(n - 1):
        out = model.hf(torch.tensor([[tokens[-1]]]), **cached)
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def test_hf_generate_is_steered_too(model: LanguageModel, sae: Any, scores: torch.Tensor) -> None:
    spec = SteeringSpec("weight", scores)
    ids = torch.tensor([[1, 10, 11, 12]])
    with steering_hook(model.hf, sae, HOOK, spec, SPECIAL) as record:
        out = model.hf.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert len(record.steps) == 6  # prefill + 5 cached steps
    assert all(bool(s.steered.all()) for s in record.steps[1:])
    gen = out[0, 4:].tolist()
    # min_new_tokens bans EOS during generation: ban it in the reference too
    assert _full_steered_argmax(model, sae, spec, out[0].tolist(), banned=2)[3:-1] == gen


def test_transformer_lens_generate_with_position_counting_hook(
    model: LanguageModel, sae: Any, scores: torch.Tensor
) -> None:
    spec = SteeringSpec("swap", scores)
    params = SamplingParams(max_new_tokens=10, greedy=True, stop_at_eos=False)
    ours = generate(model, sae, ["the heart"], spec, params=params)[0]
    fn, record = tl_steering_hook(sae, spec)  # no tokens: counts positions across cached calls
    tokens = torch.tensor([ours.prompt_token_ids])
    with model.tl.hooks(fwd_hooks=[(HOOK, fn)]):
        out = model.tl.generate(tokens, max_new_tokens=10, do_sample=False, stop_at_eos=False, verbose=False)
    gen = out[0, tokens.shape[1] :].tolist()
    # the counting hook cannot see special tokens: compare up to the first one generated
    first_special = next((i for i, t in enumerate(ours.token_ids) if t in SPECIAL), len(gen) - 1)
    assert gen[: first_special + 1] == ours.token_ids[: first_special + 1]
    assert len(record.steps) == 10 and bool(record.steps[1].steered.all())


def test_batch_with_left_padding_and_per_row_specs(model: LanguageModel, sae: Any, scores: torch.Tensor) -> None:
    prompts = ["a long prompt about the heart", "short", "a mid prompt", "the lungs"]
    specs = [
        SteeringSpec("orig"),
        SteeringSpec("swap", scores),
        SteeringSpec("clamp", scores, clamp_mode="add"),
        SteeringSpec("orig", scores),
    ]
    params = SamplingParams(max_new_tokens=12, seed=7)
    batched = generate(model, sae, prompts, specs, params=params, batch_size=4)
    for prompt, spec, row in zip(prompts, specs, batched, strict=True):
        alone = generate(model, sae, [prompt], spec, params=params)[0]
        assert row.token_ids == alone.token_ids
        np.testing.assert_allclose(row.contamination, alone.contamination, atol=1e-4)
        assert row.method == spec.method
    assert np.isnan(batched[0].contamination).all()  # orig without scores: not measured
    assert not np.isnan(batched[3].contamination).any()  # orig with scores: measured
    assert batched[3].latents_changed == [0.0] * len(batched[3].token_ids)
    assert np.isnan(batched[1].prompt_contamination[0])  # BOS untouched


def test_vector_edits_join_a_batch_with_sae_edits(model: LanguageModel, sae: Any, scores: torch.Tensor) -> None:
    vector = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(3))
    prompts = ["a long prompt about the heart", "short", "a mid prompt", "the lungs"]
    specs = [
        SteeringSpec("orig", vector=vector),
        SteeringSpec("swap", scores),
        SteeringSpec("swap", scores, vector=0.5 * vector),
        SteeringSpec("orig"),
    ]
    params = SamplingParams(max_new_tokens=12, seed=5)
    batched = generate(model, sae, prompts, specs, params=params, batch_size=4)
    for prompt, spec, row in zip(prompts, specs, batched, strict=True):
        assert row.token_ids == generate(model, sae, [prompt], spec, params=params)[0].token_ids
    plain = generate(model, None, prompts[:1], None, params=params)[0]
    assert batched[0].token_ids != plain.token_ids and batched[2].token_ids != batched[1].token_ids


def test_vector_is_added_only_at_steered_positions(model: LanguageModel) -> None:
    vector = torch.ones(D_MODEL)
    steerer = BatchSteerer(None, [SteeringSpec("orig", vector=vector), SteeringSpec("orig")])
    x = torch.zeros(2, 4, D_MODEL)
    real = torch.tensor([[False, True, True, True], [True, True, True, True]])  # row 0 left-padded
    protected = torch.tensor([[False, True, False, False], [True, False, False, False]])  # first real position
    out, stats = steerer.apply(x, real, protected)
    assert out[0, :, 0].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert bool((out[1] == 0).all())
    assert stats is not None and stats.steered.tolist() == [[False, False, True, True], [False] * 4]
    with pytest.raises(SAEMismatchError, match="dims"):
        BatchSteerer(None, [SteeringSpec("orig", vector=torch.ones(D_MODEL + 1))]).apply(x, real, protected)
    with pytest.raises(SaealignError, match="finite"):
        SteeringSpec("orig", vector=torch.tensor([math.inf]))


def test_on_token_reports_every_step_as_the_result_has_it(model: LanguageModel, sae: Any, scores: torch.Tensor) -> None:
    prompts = ["a long prompt about the heart", "short", "the lungs"]
    specs = [SteeringSpec("swap", scores), SteeringSpec("clamp", scores), SteeringSpec("orig")]
    events: list[TokenEvent] = []
    params = SamplingParams(max_new_tokens=9, seed=3, stop_at_eos=False)
    results = generate(model, sae, prompts, specs, params=params, batch_size=2, on_token=events.append)
    by_row: dict[int, list[TokenEvent]] = {}
    for event in events:
        by_row.setdefault(event.row, []).append(event)
    assert sorted(by_row) == [0, 1, 2]
    for row, row_events in by_row.items():
        res = results[row]
        assert [e.step for e in row_events] == list(range(9))
        assert [e.token_id for e in row_events] == res.token_ids
        np.testing.assert_allclose([e.contamination for e in row_events], res.contamination, atol=1e-6)
        np.testing.assert_allclose([e.latents_changed for e in row_events], res.latents_changed, atol=1e-6)
    # rows 0 and 1 decode together; row 2 joins when a place is free, after they finish
    assert events.index(by_row[2][0]) > events.index(by_row[0][-1])


def test_an_error_in_on_token_stops_generation(model: LanguageModel) -> None:
    seen: list[int] = []

    def stop_after_three(event: TokenEvent) -> None:
        seen.append(event.step)
        if event.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate(model, None, ["hello"], params=SamplingParams(max_new_tokens=20), on_token=stop_after_three)
    assert seen == [0, 1, 2]


def test_sampling_is_seeded(model: LanguageModel) -> None:
    a = generate(model, None, ["hello"], params=SamplingParams(max_new_tokens=16, seed=1))[0]
    b = generate(model, None, ["hello"], params=SamplingParams(max_new_tokens=16, seed=1))[0]
    c = generate(model, None, ["hello"], params=SamplingParams(max_new_tokens=16, seed=2))[0]
    assert a.token_ids == b.token_ids != c.token_ids
    assert len(a.token_ids) <= 16 and a.timings["s_per_token"] > 0
    rows = generate(model, None, ["hello"] * 2, params=SamplingParams(max_new_tokens=16), seeds=[1, 2])
    assert [r.token_ids for r in rows] == [a.token_ids, c.token_ids]  # per-row seeds, batch-independent


def test_batched_perplexity_matches_one_row_at_a_time(model: LanguageModel) -> None:
    prompts = [[1, 5, 6, 7, 8, 9], [1, 10], [1, 11, 12]]
    conts = [[13, 14], [15, 16, 17, 18, 19, 20, 21], []]

    def alone(p: list[int], c: list[int]) -> float:
        ids = torch.tensor([p + c])
        logits = model.hf(input_ids=ids).logits[0].float()
        logp = torch.log_softmax(logits[len(p) - 1 : -1], -1).gather(1, ids[0, len(p) :, None])
        return float(torch.exp(-logp.mean()))

    batched = continuation_perplexities(model, prompts, conts, batch_size=2)
    assert batched[:2] == pytest.approx([alone(p, c) for p, c in zip(prompts[:2], conts[:2], strict=True)], rel=1e-5)
    assert math.isnan(batched[2])  # an empty continuation has no perplexity
    assert batched[:2] == pytest.approx(continuation_perplexities(model, prompts, conts, batch_size=1)[:2], rel=1e-5)
    with pytest.raises(SaealignError, match="continuations"):
        continuation_perplexities(model, prompts, conts[:2])
    with pytest.raises(SaealignError, match="empty"):
        continuation_perplexities(model, [[]], [[3]])


def test_concurrent_generations_do_not_leak(model: LanguageModel, sae: Any, scores: torch.Tensor) -> None:
    params = SamplingParams(max_new_tokens=20, greedy=True, stop_at_eos=False)
    specs = [SteeringSpec("orig"), SteeringSpec("clamp", scores, clamp_mode="add", clamp_factor=4.0)]
    expected = [generate(model, sae, ["the heart"], s, params=params)[0].token_ids for s in specs]
    assert expected[0] != expected[1]
    got: dict[int, list[list[int]]] = {0: [], 1: []}
    barrier = threading.Barrier(2)

    def run(i: int) -> None:
        barrier.wait()
        for _ in range(3):
            got[i].append(generate(model, sae, ["the heart"], specs[i], params=params)[0].token_ids)

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got[0] == [expected[0]] * 3
    assert got[1] == [expected[1]] * 3
    assert not model.hf.model.layers[LAYER]._forward_hooks


def _every_edit_kind(scores: torch.Tensor) -> list[SteeringSpec]:
    """One spec of every edit the engine applies: SAE methods, keep_error, a vector, a slot set."""
    vector = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(9))
    return [
        *_specs(scores),
        SteeringSpec("orig"),
        SteeringSpec("orig", vector=vector),  # DiffMean-style activation addition
        SteeringSpec("swap", scores, vector=vector * 0.5),
        SteeringSpec("set", latents={3: 4.0, 5: 0.0}, keep_error=True),  # a concept-slot edit
    ]


def test_every_edit_kind_concurrently_equals_its_solo_run(model: LanguageModel, sae: Any, scores: torch.Tensor) -> None:
    params = SamplingParams(max_new_tokens=6, greedy=True, stop_at_eos=False)
    specs = _every_edit_kind(scores)
    solo = [generate(model, sae, ["the heart"], s, params=params)[0].token_ids for s in specs]
    assert len({tuple(t) for t in solo}) > len(specs) // 2  # the edits differ from one another
    got: dict[int, list[int]] = {}
    barrier = threading.Barrier(len(specs))

    def run(i: int) -> None:
        barrier.wait()
        got[i] = generate(model, sae, ["the heart"], specs[i], params=params)[0].token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(specs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(len(specs))] == solo
    batched = generate(model, sae, ["the heart"] * len(specs), specs, params=params)
    assert [r.token_ids for r in batched] == solo  # and in one batch, one spec per row
    assert not model.hf.model.layers[LAYER]._forward_hooks


def test_sessions_compose_at_one_layer_and_across_layers(model: LanguageModel) -> None:
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    v1, v2 = torch.randn(2, D_MODEL, generator=torch.Generator().manual_seed(4))

    def logits(*edits: tuple[str, torch.Tensor]) -> torch.Tensor:
        with contextlib.ExitStack() as stack:
            for hook, v in edits:
                stack.enter_context(steering_hook(model.hf, None, hook, SteeringSpec("orig", vector=v)))
            return model.hf(ids).logits

    torch.testing.assert_close(logits((HOOK, v1), (HOOK, v2)), logits((HOOK, v1 + v2)), rtol=1e-5, atol=1e-5)
    two_layers = logits(("blocks.0.hook_resid_post", v1), (HOOK, v2))
    assert not torch.allclose(two_layers, logits((HOOK, v2)))
    assert not torch.allclose(two_layers, logits(("blocks.0.hook_resid_post", v1)))
    assert not model.hf.model.layers[0]._forward_hooks and not model.hf.model.layers[LAYER]._forward_hooks


def test_set_latents_must_fit_the_sae(sae: Any) -> None:
    with pytest.raises(SAEMismatchError, match="past the SAE"):
        BatchSteerer(SAEView.of(sae), [SteeringSpec("set", latents={D_SAE: 1.0})])
    with pytest.raises(SaealignError, match="latents"):
        SteeringSpec("set")
    with pytest.raises(SaealignError, match="latents"):
        SteeringSpec("sae", latents={1: 1.0})


def test_orig_only_batch_never_encodes() -> None:
    steerer = BatchSteerer(None, [SteeringSpec("orig"), SteeringSpec("orig")])
    x = torch.randn(2, 3, D_MODEL)
    out, stats = steerer.apply(x, torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, 3, dtype=torch.bool))
    assert out is x and stats is None


# ---------------------------------------------------------------------------------------------
# Bad input


def test_spec_validation(scores: torch.Tensor) -> None:
    with pytest.raises(SaealignError, match="unknown steering method"):
        SteeringSpec("steer")  # type: ignore[arg-type]
    with pytest.raises(SaealignError, match="needs topic scores"):
        SteeringSpec("swap")
    with pytest.raises(SaealignError, match=r"\[0, 1\]"):
        SteeringSpec("swap", torch.full((D_SAE,), 1.5))
    with pytest.raises(SaealignError, match="clamp_k"):
        SteeringSpec("clamp", scores, clamp_k=0)
    with pytest.raises(SaealignError, match="strength applies"):
        SteeringSpec("clamp", scores, strength=0.5)
    with pytest.raises(SAEMismatchError, match="scores have 10 latents"):
        SteeringSpec("swap", torch.zeros(10)).check_fits(D_SAE)
    with pytest.raises(SAEMismatchError, match="scored with SAE 'other'"):
        check_scores_sae("other", "default")


def test_generation_errors(model: LanguageModel, sae: Any, scores: torch.Tensor) -> None:
    with pytest.raises(SaealignError, match="prompt 1 is empty"):
        generate(model, sae, ["ok", "  "], SteeringSpec("swap", scores))
    with pytest.raises(SaealignError, match="no prompts"):
        generate(model, sae, [], SteeringSpec("swap", scores))
    for n in (0, -3, MAX_NEW_TOKENS_LIMIT + 1):
        with pytest.raises(SaealignError, match="max_new_tokens"):
            SamplingParams(max_new_tokens=n)
    with pytest.raises(SaealignError, match="allows"):
        generate(model, sae, ["x" * 250], params=SamplingParams(max_new_tokens=10))
    with pytest.raises(SAEMismatchError, match="latents but the SAE has"):
        generate(model, sae, ["ok"], SteeringSpec("swap", torch.zeros(D_SAE + 1)))
    with pytest.raises(SaealignError, match="2 steering specs for 1 prompts"):
        generate(model, sae, ["ok"], [SteeringSpec("sae"), SteeringSpec("sae")])
    with pytest.raises(SaealignError, match="need an SAE"):
        generate(model, None, ["ok"], SteeringSpec("sae"), hook_name=HOOK)


# ---------------------------------------------------------------------------------------------
# The CLI job's config and score loading (no model needed)


def test_generate_config_validation() -> None:
    from workflows._config import parse_config
    from workflows.generate import GenerateConfig

    cfg = parse_config(GenerateConfig, ["--prompt", "a", "b", "--topic", "medical", "--compare"], "t")
    assert cfg.prompt == ("a", "b") and cfg.methods() == ["orig", "swap"]
    assert cfg.spec("orig", None).method == "orig"
    for argv, match in (
        (["--method", "nope"], "unknown --method"),
        (["--method", "clamp"], "needs topic scores"),
        (["--method", "orig", "--max-new-tokens", "0"], "max_new_tokens"),
        (["--method", "orig", "--max-new-tokens", "100000"], "max_new_tokens"),
        (["--topic", "medical", "--scores-file", "x.npy"], "either --topic or --scores-file"),
    ):
        with pytest.raises(SaealignError, match=match):
            parse_config(GenerateConfig, argv, "t")


def test_generate_rejects_topic_scored_with_another_sae(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    import ops.scoring.scores
    from workflows.generate import GenerateConfig, load_scores, read_prompts

    (tmp_path / "cfg.json").write_text("{}")
    meta = {"sae": "some_other_sae", "model": "smollm2-135m", "hook": HOOK}
    monkeypatch.setattr(ops.scoring.scores, "topic_scores", lambda lake, topic, dataset=None: (np.zeros(D_SAE), meta))
    cfg = GenerateConfig(prompt=("hi",), topic="medical", sae=str(tmp_path))
    with pytest.raises(SAEMismatchError, match="scored with SAE 'some_other_sae'"):
        load_scores(cfg, None)
    with pytest.raises(SaealignError, match="prompt 0 is empty"):
        read_prompts(GenerateConfig(prompt=("",), method=("orig",)))
    with pytest.raises(SaealignError, match="no prompts"):
        read_prompts(GenerateConfig(method=("orig",)))


def test_spec_for_method_drops_the_settings_a_method_does_not_use() -> None:
    from types import SimpleNamespace

    settings = SimpleNamespace(
        clamp_k=3, clamp_factor=2.0, clamp_mode="add", strength=0.5, keep_error=True, include_first=False
    )
    scores = torch.rand(D_SAE)
    swap = SteeringSpec.for_method("swap", scores, settings, "medical")
    assert (swap.strength, swap.keep_error, swap.clamp_k, swap.clamp_mode, swap.topic) == (
        0.5,
        True,
        3,
        "add",
        "medical",
    )
    clamp = SteeringSpec.for_method("clamp", scores, settings)
    assert (clamp.strength, clamp.keep_error, clamp.clamp_factor) == (1.0, True, 2.0)  # strength is swap/weight's
    orig = SteeringSpec.for_method("orig", None, settings)
    assert (orig.strength, orig.keep_error) == (1.0, False)
    with pytest.raises(SaealignError, match="needs topic scores"):
        SteeringSpec.for_method("swap", None, settings)


def _alone(model: LanguageModel, sae: Any, prompt: str, spec: SteeringSpec, params: SamplingParams, seed: int) -> Any:
    return generate(model, sae, [prompt], spec, hook_name=HOOK, params=params, seeds=[seed])[0]


def test_rows_joining_a_running_batch_get_the_tokens_they_get_alone(
    model: LanguageModel, sae: Any, scores: torch.Tensor
) -> None:
    """Iteration-level scheduling: rows join between decode steps (their prompts prefilled, their
    caches merged by left padding) and leave when done, each with its own spec, sampling and seed."""
    from ops.steering.generation import DecodeRequest, RunningBatch

    rows = [
        (
            "a long prompt about the heart and the lungs",
            SteeringSpec("swap", scores),
            SamplingParams(max_new_tokens=14),
        ),
        ("short", SteeringSpec("orig"), SamplingParams(max_new_tokens=3, greedy=True)),
        ("a mid prompt", SteeringSpec("clamp", scores), SamplingParams(max_new_tokens=9, top_k=0, temperature=0.7)),
        ("the lungs", SteeringSpec("sae"), SamplingParams(max_new_tokens=6, stop_at_eos=False)),
    ]
    requests = [
        DecodeRequest(p, model.tokenize([p], max_length=10**9)[0], spec, params, seed=10 + i, row=i)
        for i, (p, spec, params) in enumerate(rows)
    ]
    batch = RunningBatch(model, sae, HOOK)
    finished: dict[int, Any] = {}
    order: list[int] = []
    for step in range(40):
        joining = [requests[step // 2]] if step % 2 == 0 and step // 2 < len(requests) else []
        for req, res in batch.add(joining) + batch.step():
            assert not isinstance(res, Exception)
            finished[req.row] = res
            order.append(req.row)
        if len(finished) == len(requests):
            break
    assert len(batch) == 0 and sorted(finished) == [0, 1, 2, 3]
    assert order.index(1) < order.index(0)  # the short request left before the long one ended
    for i, (prompt, spec, params) in enumerate(rows):
        alone = _alone(model, sae, prompt, spec, params, seed=10 + i)
        assert finished[i].token_ids == alone.token_ids, i
        np.testing.assert_allclose(finished[i].contamination, alone.contamination, atol=1e-4)
        np.testing.assert_allclose(finished[i].prompt_contamination, alone.prompt_contamination, atol=1e-4)
    assert finished[0].timings["batch_size"] > 1


def test_running_batch_drops_cancelled_and_failing_rows_alone(
    model: LanguageModel, sae: Any, scores: torch.Tensor
) -> None:
    from ops.steering.generation import DecodeRequest, GenerationCancelled, RunningBatch

    params = SamplingParams(max_new_tokens=8, stop_at_eos=False)
    stop = threading.Event()
    ids = model.tokenize(["the heart", "a mid prompt"], max_length=10**9)
    bad = SteeringSpec("swap", torch.rand(D_SAE + 3))  # does not fit the SAE
    requests = [
        DecodeRequest("the heart", ids[0], SteeringSpec("swap", scores), params, cancelled=stop.is_set, row=0),
        DecodeRequest("a mid prompt", ids[1], SteeringSpec("swap", scores), params, row=1),
        DecodeRequest("a mid prompt", ids[1], bad, params, row=2),
    ]
    batch = RunningBatch(model, sae, HOOK)
    failed = batch.add(requests)
    assert [(req.row, type(res)) for req, res in failed] == [(2, SAEMismatchError)] and len(batch) == 2
    batch.step()
    stop.set()
    done = batch.step()
    assert [(req.row, type(res)) for req, res in done] == [(0, GenerationCancelled)] and len(batch) == 1
    results = [res for _ in range(10) for _, res in batch.step()]
    assert len(results) == 1 and not isinstance(results[0], Exception)
    assert results[0].token_ids == _alone(model, sae, "a mid prompt", SteeringSpec("swap", scores), params, 0).token_ids


# ---------------------------------------------------------------------------------------------
# positions="last_prompt": only the prefill's last prompt token is edited (AlignSAE swaps)


def test_last_prompt_positions_marks_the_last_real_token_of_a_prefill() -> None:
    from ops.steering.engine import last_prompt_positions

    real = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    expected = torch.tensor([[0, 0, 0, 1], [0, 0, 0, 1], [0, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(last_prompt_positions(real, 0), expected)
    assert not last_prompt_positions(real, 5).any()  # a KV-cached decode step


def test_last_prompt_spec_edits_only_the_last_prompt_position(model: LanguageModel, sae: Any) -> None:
    ids = torch.tensor([[2, 2, 1, 10, 11, 12], [1, 13, 14, 15, 16, 17]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    plain = model.hf(ids, attention_mask=mask).logits
    spec = SteeringSpec("set", latents={0: 25.0, 3: 0.0}, keep_error=True, positions="last_prompt")
    with steering_hook(model.hf, sae, HOOK, spec, SPECIAL) as record:
        edited = model.hf(ids, attention_mask=mask).logits
    steered = record.steps[0].steered
    assert steered[:, -1].all() and not steered[:, :-1].any()
    torch.testing.assert_close(edited[:, :-1], plain[:, :-1])  # causal: earlier positions untouched
    assert not torch.allclose(edited[:, -1], plain[:, -1])
    everywhere = SteeringSpec("set", latents={0: 25.0, 3: 0.0}, keep_error=True)
    with steering_hook(model.hf, sae, HOOK, everywhere, SPECIAL) as record_all:
        model.hf(ids, attention_mask=mask)
    assert int(record_all.steps[0].steered.sum()) > int(steered.sum())


def test_last_prompt_spec_leaves_generated_tokens_alone(model: LanguageModel, sae: Any) -> None:
    params = SamplingParams(max_new_tokens=5, greedy=True, stop_at_eos=False)
    spec = SteeringSpec("set", latents={0: 25.0}, keep_error=True, positions="last_prompt")
    with steering_hook(model.hf, sae, HOOK, spec, SPECIAL) as record:
        generate(model, None, ["the heart"], params=params)
    assert len(record.steps) == 5
    assert int(record.steps[0].steered.sum()) == 1
    assert not any(bool(s.steered.any()) for s in record.steps[1:])
    with pytest.raises(SaealignError, match="unknown positions"):
        SteeringSpec("sae", positions="first")  # type: ignore[arg-type]
