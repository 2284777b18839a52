"""SAE registry: the shipped default, a local sae-lens directory, or a sae-lens release.

Specs:

* ``default`` — the TopK SAE shipped in the package for the embedded model
  (``blocks.6.hook_resid_post``, trained by ``saealign train-sae``; see its manifest);
* a directory in sae-lens format (``cfg.json`` + ``sae_weights.safetensors``);
* ``saelens:<release>/<sae_id>`` — ``SAE.from_pretrained`` for connected use
  (e.g. ``saelens:gpt2-small-res-jb/blocks.8.hook_resid_pre``).

Any architecture sae-lens loads loads here; which ones steering runs (standard, JumpReLU, TopK,
BatchTopK saved for inference, gated) is decided in one place,
``ops.steering.engine.STEERABLE_ARCHITECTURES``, and checked before a job does any work.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ops.errors import SaealignError, SAEMismatchError
from ops.models.lm import LanguageModel
from ops.paths import DATA_DIR

DEFAULT_SAE_DIR = DATA_DIR / "sae" / "default"


def resolve_sae_path(spec: str) -> Path | None:
    """Local directory for ``spec`` (None for a sae-lens release)."""
    if spec.startswith("saelens:"):
        return None
    path = DEFAULT_SAE_DIR if spec == "default" else Path(spec).expanduser()
    if not (path / "cfg.json").is_file():
        raise SaealignError(
            f"no SAE at '{path}' (cfg.json missing); fix: pass a directory written by "
            "`saealign train-sae`, 'default', or saelens:<release>/<sae_id>"
        )
    return path


def sae_id(spec: str) -> str:
    """A short stable identifier of an SAE spec (used as a lake partition key)."""
    path = resolve_sae_path(spec)
    if path is None:
        return spec.removeprefix("saelens:").replace("/", "__")
    return "default" if spec == "default" else path.resolve().name


def load_sae(spec: str, device: str = "cpu") -> Any:
    """Load an SAE (float32) by spec."""
    from sae_lens import SAE

    path = resolve_sae_path(spec)
    if path is not None:
        return SAE.load_from_disk(path, device=device, dtype="float32")
    release, _, ident = spec.removeprefix("saelens:").partition("/")
    try:
        return SAE.from_pretrained(release, ident, device=device)
    except (OSError, ValueError) as exc:
        raise SaealignError(
            f"cannot load sae-lens release '{release}/{ident}' ({type(exc).__name__}: {exc}); "
            "fix: connect to the hub, or use the shipped 'default' SAE"
        ) from exc


def sae_hook_name(sae: Any) -> str | None:
    return getattr(sae.cfg.metadata, "hook_name", None)


def check_sae_fits(sae: Any, model: LanguageModel, hook_name: str | None = None) -> str:
    """Raise :class:`SAEMismatchError` unless ``sae`` reads ``model`` at a hook it has;
    returns the hook name to use."""
    d_model = model.d_model
    if sae.cfg.d_in != d_model:
        raise SAEMismatchError(
            f"SAE d_in={sae.cfg.d_in} does not match model '{model.name}' d_model={d_model}; "
            "fix: use an SAE trained on this model (saealign train-sae) or the matching model"
        )
    hook = hook_name or sae_hook_name(sae)
    if hook is None:
        raise SAEMismatchError("the SAE does not record its hook; fix: pass the hook name explicitly")
    if hook not in model.tl.hook_dict:
        raise SAEMismatchError(
            f"model '{model.name}' has no hook '{hook}' that the SAE reads; fix: pass a matching model"
        )
    return hook


def read_manifest(path: Path) -> dict[str, Any]:
    manifest = path / "manifest.json"
    return json.loads(manifest.read_text()) if manifest.is_file() else {}
