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


# ---------------------------------------------------------------------------------------------
# The architecture matrix: tiny random SAEs of every sae-lens kind, tiny random LMs per family

SAE_KINDS = ("standard", "jumprelu", "topk", "batchtopk", "gated")
"""sae-lens SAE architectures that steering runs (BatchTopK as sae-lens saves it for inference)."""


def _randomise(sae: Any, d_in: int) -> None:
    """Encoder ~ N(0, 1/d_in) with the decoder its transpose and a small negative bias, so that
    a random SAE fires a handful of latents per token, as a trained one does."""
    with torch.no_grad():
        sae.W_enc.normal_(0, 1 / d_in**0.5)
        sae.W_dec.copy_(sae.W_enc.T)
        for name in ("b_enc", "b_gate", "b_mag"):
            bias = getattr(sae, name, None)
            if isinstance(bias, torch.nn.Parameter):
                bias.normal_(-0.2, 0.1)
        if isinstance(getattr(sae, "r_mag", None), torch.nn.Parameter):
            sae.r_mag.normal_(0, 0.3)
        if isinstance(getattr(sae, "threshold", None), torch.nn.Parameter):
            sae.threshold.uniform_(0.0, 0.3)


def make_sae(kind: str, d_in: int, d_sae: int, hook: str, seed: int = 0) -> Any:
    """A random sae-lens inference SAE of ``kind`` (``SAE_KINDS``, or ``transcoder``), as an
    ``SAE`` object. ``batchtopk`` is a BatchTopK training SAE converted the way sae-lens saves it
    for inference (:func:`save_sae` writes it with ``save_inference_model``)."""
    import sae_lens.saes as S
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    meta = SAEMetadata(hook_name=hook, model_name="test")
    if kind == "batchtopk":
        sae: Any = S.BatchTopKTrainingSAE(S.BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=4, metadata=meta))
        _randomise(sae, d_in)
        with torch.no_grad():
            sae.topk_threshold.fill_(0.3)
        return sae
    classes = {
        "standard": (S.StandardSAE, S.StandardSAEConfig, {}),
        "jumprelu": (S.JumpReLUSAE, S.JumpReLUSAEConfig, {}),
        "topk": (S.TopKSAE, S.TopKSAEConfig, {"k": 4}),
        "gated": (S.GatedSAE, S.GatedSAEConfig, {}),
        "transcoder": (S.Transcoder, S.TranscoderConfig, {"d_out": d_in, "apply_b_dec_to_input": False}),
    }
    cls, cfg_cls, extra = classes[kind]
    sae = cls(cfg_cls(d_in=d_in, d_sae=d_sae, metadata=meta, **extra))
    _randomise(sae, d_in)
    return sae


def save_sae(kind: str, path: Path, d_in: int, d_sae: int, hook: str, seed: int = 0) -> Path:
    """A random SAE of ``kind`` written to ``path`` in sae-lens format (``save_model``; a
    BatchTopK training SAE through ``save_inference_model``, as sae-lens ships trained ones)."""
    sae = make_sae(kind, d_in, d_sae, hook, seed)
    (sae.save_inference_model if kind == "batchtopk" else sae.save_model)(path)
    return path


LM_FAMILIES = ("llama", "gpt2", "gemma2")
"""Hugging Face model families with a TransformerLens twin (``ops.models.lm.TL_FAMILIES``)."""


def save_tiny_lm(family: str, path: Path, seed: int = 0) -> Path:
    """A tiny random causal LM of ``family`` (2 layers, d_model 64) with the embedded SmolLM2
    tokenizer, saved with ``save_pretrained``: a local model directory ``load_model`` takes.
    Weights are drawn wider than the default so that logits are large enough for Gemma-2's
    soft-caps to matter; Gemma-2's sliding window is shorter than the test prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma2Config, GPT2Config, LlamaConfig

    from ops.models.lm import _smollm2_files

    tokenizer = AutoTokenizer.from_pretrained(_smollm2_files()[0])
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    ids["pad_token_id"] = tokenizer.pad_token_id
    shared = {"vocab_size": len(tokenizer), "initializer_range": 0.2, **ids}
    configs = {
        "llama": lambda: LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            **shared,
        ),
        "gpt2": lambda: GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, **shared),
        "gemma2": lambda: Gemma2Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=8,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=5.0,
            max_position_embeddings=512,
            attn_implementation="eager",
            **shared,
        ),
    }
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(configs[family]())
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
