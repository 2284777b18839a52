"""AlignSAE building blocks on tiny SAEs from config, tiny random models and crafted ontologies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ops.alignsae.metrics import concept_auc
from ops.alignsae.ontology import load_ontology, split_ontology
from ops.alignsae.swaps import (
    SwapTrial,
    VanillaConceptSAE,
    concept_means,
    diffmean_specs,
    generate_ids,
    plan_swaps,
    slot_spec,
)
from ops.alignsae.training import (
    AlignedSAE,
    AlignTrainConfig,
    check_base_sae,
    encode_in_chunks,
    init_concept_slots,
    load_aligned_sae,
    set_typical,
    train_aligned,
)
from ops.errors import SaealignError
from ops.models.lm import LanguageModel
from ops.steering.engine import SteeringSpec, make_steerer

D_IN, D_SAE = 16, 32
CONCEPTS = ["fam:a", "fam:b", "other:c"]
FAMILIES = {"fam:a": "fam", "fam:b": "fam", "other:c": "other"}


def tiny_sae(k: int = 4, seed: int = 0) -> object:
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    torch.manual_seed(seed)
    meta = SAEMetadata(hook_name="blocks.0.hook_resid_post", model_name="tiny")
    return TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=k, metadata=meta))


def planted_data(n_per: int = 60, seed: int = 0) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
    """Pooled vectors of 3 concepts, each shifted along its own planted direction."""
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(3, D_IN, generator=gen)
    labels = np.zeros((3 * n_per, 3), dtype=bool)
    x = torch.randn(3 * n_per, D_IN, generator=gen)
    for j in range(3):
        labels[j * n_per : (j + 1) * n_per, j] = True
        x[j * n_per : (j + 1) * n_per] += 2.0 * directions[j]
    return x, labels, directions


# ---------------------------------------------------------------------------------------------
# the aligned SAE


def test_encode_appends_independent_concept_slots() -> None:
    base = tiny_sae()
    aligned = AlignedSAE(base, CONCEPTS, FAMILIES)
    with torch.no_grad():
        aligned.b_enc_c.fill_(5.0)  # concept slots always on, whatever TopK picks
    x = torch.randn(7, D_IN)
    acts = aligned.encode(x)
    assert acts.shape == (7, D_SAE + 3)
    torch.testing.assert_close(acts[:, :D_SAE], base.encode(x))
    assert (acts[:, D_SAE:] > 0).all()  # not limited by k
    assert aligned.concept_slots == {"fam:a": 32, "fam:b": 33, "other:c": 34}
    expected = base.decode(acts[:, :D_SAE]) + acts[:, D_SAE:] @ aligned.W_dec_c
    torch.testing.assert_close(aligned.decode(acts), expected)


def test_check_base_sae_rejects_input_normalisation() -> None:
    sae = tiny_sae()
    sae.cfg.normalize_activations = "layer_norm"
    with pytest.raises(SaealignError, match="normalises"):
        check_base_sae(sae)


def test_mean_difference_init_separates_concepts() -> None:
    x, labels, _ = planted_data()
    aligned = AlignedSAE(tiny_sae(), CONCEPTS, FAMILIES)
    init_concept_slots(aligned, x, labels)
    acts = encode_in_chunks(lambda v: torch.relu(aligned.concept_pre(v)), x)
    assert concept_auc(acts, labels).min() > 0.95
    assert (aligned.typical > 0).all()
    # decoder row of fam:a = its mean minus the mean of its family's other concept, per typical activation
    expected = (x[labels[:, 0]].mean(0) - x[labels[:, 1]].mean(0)) / aligned.typical[0]
    torch.testing.assert_close(aligned.W_dec_c[0], expected, rtol=1e-4, atol=1e-4)


def test_vanilla_latent_init_reuses_the_base_latent() -> None:
    x, labels, _ = planted_data()
    aligned = AlignedSAE(tiny_sae(), CONCEPTS, FAMILIES)
    base = encode_in_chunks(lambda v: aligned.base.encode(v), x)
    latents = [int((base[labels[:, j]].mean(0) - base[~labels[:, j]].mean(0)).argmax()) for j in range(len(CONCEPTS))]
    init_concept_slots(aligned, x, labels, latents=latents)
    for j, k in enumerate(latents):
        cos = torch.nn.functional.cosine_similarity(aligned.W_enc_c[:, j], aligned.base.W_enc[:, k], dim=0)
        assert cos > 0.999  # same direction, rescaled
    acts = encode_in_chunks(lambda v: torch.relu(aligned.concept_pre(v)), x)
    pre_base = encode_in_chunks(lambda v: aligned.base.process_sae_in(v) @ aligned.base.W_enc + aligned.base.b_enc, x)
    for j, k in enumerate(latents):  # the slot fires exactly where the latent's pre-activation is positive
        np.testing.assert_array_equal(acts[:, j] > 0, pre_base[:, k] > 0)


def test_encoder_learning_rate_is_validated() -> None:
    with pytest.raises(SaealignError, match="--lr-encoder"):
        AlignTrainConfig(lr_encoder=-1.0)


def test_training_binds_slots_and_keeps_reconstruction() -> None:
    x, labels, _ = planted_data(seed=1)
    aligned = AlignedSAE(tiny_sae(), CONCEPTS, FAMILIES)
    with torch.no_grad():  # a poor start: concept slots point nowhere in particular
        aligned.W_enc_c.normal_(0, 0.01)
    # the encoder's step is relative to its scale; from a near-zero start it needs a large one
    cfg = AlignTrainConfig(stage1_steps=5, stage2_steps=150, batch_tokens=64, batch_texts=64, lr=1e-2, lr_encoder=0.5)
    history = train_aligned(aligned, x, labels.argmax(1), x, labels, cfg)
    assert [h["stage"] for h in history] == [1] * 5 + [2] * 150
    assert "binding" not in history[0] and "binding" in history[-1]
    assert np.mean([h["binding"] for h in history[-10:]]) < history[5]["binding"]
    held, held_labels, _ = planted_data(seed=1)
    acts = encode_in_chunks(lambda v: torch.relu(aligned.concept_pre(v)), held)
    assert concept_auc(acts, held_labels).mean() > 0.9
    assert not any(p.requires_grad for p in aligned.parameters())


def test_save_and_load_roundtrip(tmp_path: Path) -> None:
    from sae_lens import SAE

    x, labels, _ = planted_data()
    aligned = AlignedSAE(tiny_sae(), CONCEPTS, FAMILIES)
    init_concept_slots(aligned, x, labels)
    set_typical(aligned, x, labels)
    aligned.save(tmp_path)
    loaded = load_aligned_sae(tmp_path)
    torch.testing.assert_close(loaded.encode(x), aligned.encode(x))
    torch.testing.assert_close(loaded.decode(aligned.encode(x)), aligned.decode(aligned.encode(x)))
    assert loaded.concepts == CONCEPTS and loaded.families == FAMILIES
    torch.testing.assert_close(loaded.typical, aligned.typical)
    plain = SAE.load_from_disk(tmp_path)  # the free SAE alone stays a valid sae-lens SAE
    assert plain.cfg.d_sae == D_SAE


def test_load_aligned_sae_rejects_plain_directory(tmp_path: Path) -> None:
    tiny_sae().save_model(tmp_path)
    with pytest.raises(SaealignError, match="not an AlignSAE directory"):
        load_aligned_sae(tmp_path)


# ---------------------------------------------------------------------------------------------
# swaps


def _aligned_with_typical() -> AlignedSAE:
    x, labels, _ = planted_data()
    aligned = AlignedSAE(tiny_sae(), CONCEPTS, FAMILIES)
    init_concept_slots(aligned, x, labels)
    set_typical(aligned, x, labels)
    return aligned


def _steer(sae: object, specs: list[SteeringSpec], x: torch.Tensor) -> torch.Tensor:
    """``specs`` (one per row of x [n, d], or one for all) applied by the engine, every position steered."""
    rows = torch.ones(x.shape[0], 1, dtype=torch.bool)
    out, _ = make_steerer(sae, specs).apply(x[:, None, :], rows, ~rows)
    return out[:, 0]


def test_slot_edit_with_error_changes_only_edited_slots() -> None:
    aligned = _aligned_with_typical()
    x = torch.randn(5, D_IN)
    out = _steer(aligned, [slot_spec(aligned, {"fam:b": 2.0}, ("fam:a",), keep_error=True)], x)
    a = torch.relu(aligned.concept_pre(x))
    expected = x - a[:, :1] * aligned.W_dec_c[0] + (2.0 * aligned.typical[1] - a[:, 1:2]) * aligned.W_dec_c[1]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    plain = _steer(aligned, [slot_spec(aligned, {"fam:b": 2.0}, ("fam:a",), keep_error=False)], x)
    acts = aligned.encode(x)
    acts[:, 32], acts[:, 33] = 0.0, 2.0 * aligned.typical[1]
    torch.testing.assert_close(plain, aligned.decode(acts))


def test_slot_edits_apply_each_rows_spec() -> None:
    aligned = _aligned_with_typical()
    specs = [SteeringSpec("orig")] * 2 + [slot_spec(aligned, {"other:c": 1.0})] * 2
    x = torch.randn(4, D_IN)
    out = _steer(aligned, specs, x)
    torch.testing.assert_close(out[:2], x[:2])
    assert not torch.allclose(out[2:], x[2:])


def test_unknown_concept_in_swap_is_an_error() -> None:
    aligned = _aligned_with_typical()
    with pytest.raises(SaealignError, match=r"unknown concept.*nope"):
        slot_spec(aligned, {"nope": 1.0})


def test_swap_on_aligned_slots_is_a_clear_error() -> None:
    aligned = _aligned_with_typical()
    with pytest.raises(SaealignError, match="plain sae-lens SAE"):
        make_steerer(aligned, [SteeringSpec("swap", scores=torch.ones(D_SAE + len(CONCEPTS)))])


def test_vanilla_concept_sae_uses_chosen_latents() -> None:
    sae = tiny_sae()
    vanilla = VanillaConceptSAE(sae, {"fam:a": 3, "fam:b": 5}, {"fam:a": 1.0, "fam:b": 2.0})
    x = torch.randn(3, D_IN)
    out = _steer(vanilla, [slot_spec(vanilla, {"fam:b": 1.0}, ("fam:a",))], x)
    acts = sae.encode(x)
    delta = (2.0 - acts[:, 5:6]) * sae.W_dec[5] - acts[:, 3:4] * sae.W_dec[3]
    torch.testing.assert_close(out, x + delta, rtol=1e-4, atol=1e-4)


def test_plan_swaps_targets_stay_in_family() -> None:
    texts = [f"t{i}" for i in range(30)]
    labels = ["fam:a"] * 10 + ["fam:b"] * 10 + ["other:c"] * 10
    trials = plan_swaps(texts, labels, FAMILIES, per_family=6, seed=0)
    assert len(trials) == 6
    assert all(t.source != t.target and FAMILIES[t.source] == FAMILIES[t.target] == "fam" for t in trials)
    assert {t.source for t in trials} == {"fam:a", "fam:b"}
    assert trials == plan_swaps(texts, labels, FAMILIES, per_family=6, seed=0)


def test_concept_means_weight_every_token() -> None:
    tokens = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [5.0, 0.0]], dtype=torch.float16)
    offsets = torch.tensor([0, 2, 3, 4])  # texts: 2 tokens (a), 1 token (b), 1 token (a)
    means = concept_means(tokens, offsets, ["fam:a", "fam:b", "fam:a"])
    torch.testing.assert_close(means["fam:a"], torch.tensor([3.0, 0.0]))  # (1 + 3 + 5) / 3, not a mean of text means
    torch.testing.assert_close(means["fam:b"], torch.tensor([0.0, 2.0]))
    with pytest.raises(SaealignError, match="labels"):
        concept_means(tokens, offsets, ["fam:a"])


def test_diffmean_specs_move_each_row_from_source_to_target_mean() -> None:
    means = {"fam:a": torch.tensor([1.0, 0.0]), "fam:b": torch.tensor([0.0, 1.0])}
    trials = [
        SwapTrial("p", "fam:a", "fam:b", ("fam:a", "fam:b")),
        SwapTrial("q", "fam:b", "fam:a", ("fam:a", "fam:b")),
    ]
    specs = diffmean_specs(means, trials, alpha=2.0)
    out = _steer(None, [specs[0], specs[1], specs[0]], torch.zeros(3, 2))
    torch.testing.assert_close(out, torch.tensor([[-2.0, 2.0], [2.0, -2.0], [-2.0, 2.0]]))
    with pytest.raises(SaealignError, match="fam:c"):
        diffmean_specs(means, [SwapTrial("r", "fam:a", "fam:c", ("fam:a", "fam:c"))], 1.0)


# ---------------------------------------------------------------------------------------------
# generation with a tiny random Llama


class FakeTokenizer:
    """Characters -> ids 3..39; 0 pad, 1 BOS, 2 EOS."""

    bos_token_id, eos_token_id, pad_token_id, all_special_ids = 1, 2, 0, [0, 1, 2]

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict[str, list[list[int]]]:
        return {"input_ids": [[3 + ord(ch) % 37 for ch in t] for t in texts]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(97 + i % 26) for i in ids if i > 2 or not skip_special_tokens)


def tiny_lm() -> LanguageModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=40,
        hidden_size=D_IN,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    hf = LlamaForCausalLM(cfg).eval()
    return LanguageModel(name="tiny", tokenizer=FakeTokenizer(), device="cpu", prepend_bos=True, n_ctx=64, _hf=hf)  # type: ignore[arg-type]


def test_left_padded_batch_matches_single_prompts() -> None:
    model = tiny_lm()
    prompts = [[1, 5, 6, 7, 8], [1, 9, 10]]
    for seed in (None, 3):  # greedy, then sampled: every row has its own generator
        batch = generate_ids(model, prompts, max_new_tokens=6, seed=seed)
        singles = [generate_ids(model, [p], max_new_tokens=6, seed=seed)[0] for p in prompts]
        assert batch == singles


def test_identity_edit_changes_nothing_and_the_hook_is_removed() -> None:
    model = tiny_lm()
    plain = generate_ids(model, [[1, 5, 6, 7]], max_new_tokens=3, seed=None)
    zero = [SteeringSpec("orig", vector=torch.zeros(D_IN))]
    steered = generate_ids(model, [[1, 5, 6, 7]], 3, None, hook="blocks.1.hook_resid_post", specs=zero)
    assert steered == plain
    assert not model.hf.model.layers[1]._forward_hooks


def test_slot_swap_in_generation_changes_output() -> None:
    model = tiny_lm()
    aligned = _aligned_with_typical()
    with torch.no_grad():
        aligned.W_dec_c.mul_(50.0)  # a strong concept direction
    hook = "blocks.0.hook_resid_post"
    plain = generate_ids(model, [[1, 5, 6]], 8, None)
    spec = slot_spec(aligned, {"fam:b": 20.0}, ["fam:a"])
    swapped = generate_ids(model, [[1, 5, 6]], 8, None, hook=hook, sae=aligned, specs=[spec])
    assert plain != swapped


# ---------------------------------------------------------------------------------------------
# ontology


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_jsonl_ontology_families_from_prefix_and_split(tmp_path: Path) -> None:
    rows = [{"text": f"{lab} text {i}", "label": lab} for lab in ("s:pos", "s:neg", "topic") for i in range(20)]
    onto = load_ontology(_write_jsonl(tmp_path / "o.jsonl", rows))
    assert onto.families == {"s:pos": "s", "s:neg": "s", "topic": "topic"}
    assert onto.family_members("s:neg") == ["s:pos", "s:neg"]
    train, test = split_ontology(onto, test_fraction=0.25, seed=3)
    assert test.counts() == {"s:pos": 5, "s:neg": 5, "topic": 5}
    assert not set(train.texts) & set(test.texts)
    again = split_ontology(load_ontology(_write_jsonl(tmp_path / "r.jsonl", rows[::-1])), 0.25, seed=3)[1]
    assert set(again.texts) == set(test.texts)  # independent of file order
    assert set(split_ontology(onto, 0.25, seed=4)[1].texts) != set(test.texts)


def test_yaml_ontology_with_explicit_family(tmp_path: Path) -> None:
    import yaml

    data = {"happy": {"family": "mood", "texts": [f"h{i}" for i in range(10)]}, "sad": [f"s{i}" for i in range(10)]}
    path = tmp_path / "o.yaml"
    path.write_text(yaml.safe_dump(data))
    onto = load_ontology(str(path))
    assert onto.families == {"happy": "mood", "sad": "sad"}
    assert onto.counts() == {"happy": 10, "sad": 10}


def test_concept_with_too_few_texts_is_an_error(tmp_path: Path) -> None:
    rows = [{"text": f"a{i}", "label": "a"} for i in range(12)] + [{"text": f"b{i}", "label": "b"} for i in range(9)]
    with pytest.raises(SaealignError, match=r"fewer than 10 texts: b \(9\)"):
        load_ontology(_write_jsonl(tmp_path / "o.jsonl", rows))


def test_select_unknown_concept_is_an_error() -> None:
    onto = load_ontology("embedded:ontology")
    assert len(onto.concepts) == 8 and onto.families["tense:past"] == "tense"
    with pytest.raises(SaealignError, match=r"unknown concept.*topic:cars"):
        onto.select(["topic:cars"])
    assert onto.select(["topic:sports", "tense:past"]).counts() == {"tense:past": 75, "topic:sports": 75}


def test_decorrelation_term_is_optional() -> None:
    x, labels, _ = planted_data(seed=2)
    aligned = AlignedSAE(tiny_sae(), CONCEPTS, FAMILIES)
    init_concept_slots(aligned, x, labels)
    cfg = AlignTrainConfig(stage1_steps=0, stage2_steps=3, batch_tokens=32, batch_texts=32, lambda_indep=1.0)
    history = train_aligned(aligned, x, np.full(len(x), -1), x, labels, cfg)
    assert all("indep" in h and "token_binding" not in h for h in history)  # no labelled tokens
