"""Fluency judges: distinct-n, and perplexity under a second LM (a tiny random Gemma-2 with a
word-level tokenizer stands in for Gemma-3 270M)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ops.evals.judges import JudgeUnavailableError, distinct_n, load_judge

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "it", "ran", "away", "very", "fast", "into", "garden"]


def tiny_judge_dir(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Gemma2Config, Gemma2ForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<unk>", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = Gemma2Config(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        final_logit_softcapping=5.0,
        pad_token_id=0,
        bos_token_id=1,
    )
    Gemma2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_distinct_n_counts_repeats() -> None:
    assert distinct_n([1, 2, 3, 4], 2) == 1.0
    assert distinct_n([7, 7, 7, 7, 7], 1) == pytest.approx(1 / 5)
    assert distinct_n([1, 2, 1, 2, 1], 2) == pytest.approx(2 / 4)
    assert math.isnan(distinct_n([1], 2))


def test_judge_perplexity_matches_a_direct_forward_and_ignores_batching(tmp_path: Path) -> None:
    judge = load_judge(f"path:{tiny_judge_dir(tmp_path / 'judge')}")
    prompts = ["the cat", "a mat and then it"]
    conts = ["sat on a mat", "ran away very fast into the garden"]
    batched = judge.perplexities(prompts, conts, batch_size=2)
    solo = [judge.perplexities([p], [c], batch_size=1)[0] for p, c in zip(prompts, conts, strict=True)]
    assert batched == pytest.approx(solo, rel=1e-5)
    tok = judge.tokenizer
    for p, c, got in zip(prompts, conts, batched, strict=True):
        p_ids = [tok.bos_token_id, *tok(p, add_special_tokens=False)["input_ids"]]
        c_ids = tok(c, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + c_ids])
        logits = judge.model(input_ids=ids).logits[0]  # softcapped by the model itself
        nll = F.cross_entropy(logits[len(p_ids) - 1 : -1], ids[0, len(p_ids) :])
        assert got == pytest.approx(float(torch.exp(nll)), rel=1e-5)
    # the first tokens only
    first = judge.perplexities(prompts[:1], ["sat on a mat"], max_tokens=1)[0]
    assert first == pytest.approx(judge.perplexities(prompts[:1], ["sat"])[0], rel=1e-5)
    assert math.isnan(judge.perplexities(["the cat"], [""])[0])


def test_unknown_or_missing_judges_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(JudgeUnavailableError, match="unknown judge"):
        load_judge("gpt-17")
    with pytest.raises(JudgeUnavailableError, match=r"no config\.json"):
        load_judge(f"path:{tmp_path}")


def test_own_judge_wraps_the_steered_model_and_needs_it(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_judge_dir(tmp_path / "judge")
    lm = SimpleNamespace(
        hf=AutoModelForCausalLM.from_pretrained(path), tokenizer=AutoTokenizer.from_pretrained(path), prepend_bos=False
    )
    own = load_judge("own", lm)
    assert own.name.startswith("own") and own.model is lm.hf and not own.prepend_bos
    with_bos = load_judge(f"path:{path}")
    # without BOS the first continuation token is conditioned on less: a different number
    assert own.perplexities(["the cat"], ["sat on"]) != with_bos.perplexities(["the cat"], ["sat on"])
    with pytest.raises(JudgeUnavailableError, match="needs the steered model"):
        load_judge("own")
