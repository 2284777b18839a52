"""The embedded model: the HookedTransformer and the Hugging Face model are the same function."""

from __future__ import annotations

from typing import Any

import torch

from ops.models.lm import load_model

SENTENCE = "The patient was admitted to the hospital with chest pain and shortness of breath."


def test_hooked_and_hf_logits_agree(embedded_model: Any) -> None:
    tokens = torch.tensor([embedded_model.tokenize([SENTENCE])[0]])
    with torch.no_grad():
        hf = embedded_model.hf(tokens).logits
        tl = embedded_model.tl(tokens)
    assert (hf - tl).abs().max().item() <= 1e-3


def test_greedy_generation_is_identical(embedded_model: Any) -> None:
    tokens = torch.tensor([embedded_model.tokenize([SENTENCE])[0]])
    with torch.no_grad():
        hf = embedded_model.hf.generate(tokens, max_new_tokens=20, do_sample=False)
        tl = embedded_model.tl.generate(tokens, max_new_tokens=20, do_sample=False, verbose=False)
    assert hf.shape[1] == tokens.shape[1] + 20
    assert hf.tolist() == tl.tolist()


def test_second_load_uses_the_float_cache(embedded_model: Any) -> None:
    again = load_model()
    assert again.from_cache
    assert torch.equal(again.hf.model.embed_tokens.weight, embedded_model.hf.model.embed_tokens.weight)
