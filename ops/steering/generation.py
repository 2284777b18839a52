"""Steered generation through the Hugging Face model: KV cache, left padding, per-row specs.

:func:`generate` tokenizes the prompts, left-pads each batch, runs one prefill and then one
KV-cached decode step per new token on ``model.hf`` inside :func:`ops.steering.engine.steering_hook`,
so the hook (a native PyTorch forward hook on decoder layer L) steers the prompt and every
generated token. Sampling: greedy, or top-k (default 5) with a temperature; each row draws from
its own seeded generator, so a row's sample does not depend on the other rows of its batch.

Per generated token j the result carries the statistics of the steered activation that produced
it (token 0: the last prompt position; token j: generated token j − 1 fed back), NaN where the
position was left untouched (first position, special tokens) or nothing was measured.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ops.errors import SaealignError, SAEMismatchError
from ops.models.lm import LanguageModel
from ops.steering.engine import SteeringRecord, SteeringSpec, special_ids_of, steering_hook

log = logging.getLogger(__name__)

MAX_NEW_TOKENS_LIMIT = 1024
"""Upper bound on ``max_new_tokens`` per request."""


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen."""

    max_new_tokens: int = 64
    """Tokens to generate per prompt (1 … MAX_NEW_TOKENS_LIMIT)."""
    greedy: bool = False
    """Take the most likely token instead of sampling."""
    top_k: int = 5
    """Sample among the k most likely tokens (0 = the whole vocabulary)."""
    temperature: float = 1.0
    """Softmax temperature for sampling (> 0)."""
    seed: int = 0
    """Seed of every row's sampling generator (rows with equal prompts and specs sample alike)."""
    stop_at_eos: bool = True
    """Stop a row at the end-of-sequence token (False: always generate max_new_tokens)."""

    def __post_init__(self) -> None:
        if not 0 < self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise SaealignError(
                f"max_new_tokens must be in 1..{MAX_NEW_TOKENS_LIMIT}, got {self.max_new_tokens}; "
                f"fix: pass a value from 1 to {MAX_NEW_TOKENS_LIMIT}"
            )
        if self.top_k < 0:
            raise SaealignError(f"top_k must be >= 0 (0 = no limit), got {self.top_k}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise SaealignError(f"temperature must be positive, got {self.temperature}; fix: use --greedy for 0")


@dataclass(frozen=True)
class TokenEvent:
    """One decode step, reported to ``generate(on_token=...)`` as soon as its tokens are sampled."""

    step: int
    """Index of the generated token (0 = the first new token)."""
    rows: tuple[int, ...]
    """Prompt indices (into ``generate``'s ``prompts``) of the batch this step belongs to."""
    token_ids: tuple[int, ...]
    """One sampled id per row of the batch (the pad id for rows that had already finished)."""
    contamination: tuple[float, ...]
    """Per row, of the steered activation that produced the token; NaN where not measured."""
    latents_changed: tuple[float, ...]


TokenCallback = Callable[[TokenEvent], None]
"""Called once per decode step; an exception raised in it stops the generation (e.g. a client left)."""


@dataclass
class GenerationResult:
    """One prompt's continuation and its per-token steering statistics."""

    prompt: str
    method: str
    text: str
    """The continuation only (special tokens dropped)."""
    token_ids: list[int]
    tokens: list[str]
    contamination: list[float]
    """Per generated token (see module doc); NaN where not measured."""
    latents_changed: list[float]
    prompt_token_ids: list[int]
    prompt_contamination: list[float]
    prompt_latents_changed: list[float]
    finish_reason: str
    """'eos' or 'length'."""
    timings: dict[str, float]
    """Of the batch this row ran in: prefill_s, decode_s, total_s, s_per_token, batch_size."""
    spec: SteeringSpec = field(repr=False)

    @property
    def mean_contamination(self) -> float:
        return _nanmean(self.contamination)

    @property
    def mean_latents_changed(self) -> float:
        return _nanmean(self.latents_changed)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN -> None)."""

        def clean(values: list[float]) -> list[float | None]:
            return [None if math.isnan(v) else v for v in values]

        return {
            "prompt": self.prompt,
            "method": self.method,
            "topic": self.spec.topic,
            "spec": self.spec.options(),
            "text": self.text,
            "token_ids": self.token_ids,
            "tokens": self.tokens,
            "contamination": clean(self.contamination),
            "latents_changed": clean(self.latents_changed),
            "mean_contamination": None if math.isnan(self.mean_contamination) else self.mean_contamination,
            "mean_latents_changed": None if math.isnan(self.mean_latents_changed) else self.mean_latents_changed,
            "prompt_token_ids": self.prompt_token_ids,
            "prompt_contamination": clean(self.prompt_contamination),
            "prompt_latents_changed": clean(self.prompt_latents_changed),
            "finish_reason": self.finish_reason,
            "timings": self.timings,
        }


def _nanmean(values: list[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr[~np.isnan(arr)].mean()) if (~np.isnan(arr)).any() else math.nan


# ---------------------------------------------------------------------------------------------
# Validation


def check_prompts(prompts: Sequence[str]) -> None:
    if isinstance(prompts, str):
        raise SaealignError("prompts must be a list of strings, got one string; fix: wrap it in a list")
    if not prompts:
        raise SaealignError("no prompts given; fix: pass --prompt TEXT or --prompts-file F")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise SaealignError(f"prompt {i} is empty; fix: give every prompt some text")


def check_generation_sae(model: LanguageModel, sae: Any | None, hook_name: str | None) -> str:
    """The hook to steer at: ``hook_name`` or the SAE's own; raises if SAE and model disagree."""
    sae_hook = getattr(sae.cfg.metadata, "hook_name", None) if sae is not None else None
    hook = hook_name or sae_hook
    if hook is None:
        raise SaealignError("no hook name: the SAE does not record one; fix: pass the hook name")
    if sae is None:
        return hook
    if hook_name and sae_hook and hook_name != sae_hook:
        raise SAEMismatchError(f"the SAE reads '{sae_hook}', not '{hook_name}'; fix: drop the hook or use its own")
    d_model = int(model.hf.config.hidden_size)
    if int(sae.cfg.d_in) != d_model:
        raise SAEMismatchError(
            f"SAE d_in={sae.cfg.d_in} does not match model '{model.name}' d_model={d_model}; "
            "fix: use an SAE trained on this model"
        )
    return hook


# ---------------------------------------------------------------------------------------------
# Sampling


def sample_next(logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator]) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, V]; row i draws from ``generators[i]``."""
    if params.greedy:
        return logits.argmax(dim=-1)
    k = params.top_k if 0 < params.top_k < logits.shape[-1] else logits.shape[-1]
    values, idx = torch.topk(logits.float(), k, dim=-1)
    cdf = torch.softmax(values / params.temperature, dim=-1).cumsum(dim=-1)
    u = torch.stack([torch.rand(1, generator=g, device=logits.device) for g in generators])  # [B, 1]
    choice = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=k - 1)
    return idx.gather(-1, choice).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# The decode loop


@dataclass
class _Batch:
    ids: list[list[int]]
    input_ids: torch.Tensor  # [B, W] left-padded
    attention_mask: torch.Tensor  # [B, W]

    @property
    def width(self) -> int:
        return int(self.input_ids.shape[1])


def left_pad(ids: list[list[int]], pad_id: int, device: str) -> _Batch:
    width = max(len(r) for r in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return _Batch(ids, input_ids.to(device), mask.to(device))


def cache_keyword(hf: Any) -> str:
    """The keyword that carries the KV cache into ``hf.forward``: ``cache`` from transformers
    5.24 on (``past_key_values`` is deprecated there), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"


@torch.inference_mode()
def decode_loop(
    hf: Any,
    batch: _Batch,
    params: SamplingParams,
    eos_ids: Sequence[int],
    pad_id: int,
    seeds: Sequence[int] | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Prefill + KV-cached decode. Returns generated ids [B, T], a done-before mask [B, T] (True
    where the row had already finished), and timings. ``seeds``: one per row (default params.seed).
    ``on_step(step, ids [B])`` runs right after each step's tokens are sampled."""
    from transformers import DynamicCache

    device = batch.input_ids.device
    row_seeds = list(seeds) if seeds is not None else [params.seed] * len(batch.ids)
    generators = [torch.Generator(device=device).manual_seed(int(seed)) for seed in row_seeds]
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
    mask = batch.attention_mask
    positions = (mask.cumsum(dim=-1) - 1).clamp_(min=0)
    cached = {cache_keyword(hf): DynamicCache(config=hf.config), "use_cache": True}
    t0 = time.perf_counter()
    out = hf(input_ids=batch.input_ids, attention_mask=mask, position_ids=positions, logits_to_keep=1, **cached)
    t_prefill = time.perf_counter() - t0
    finished = torch.zeros(len(batch.ids), dtype=torch.bool, device=device)
    tokens: list[torch.Tensor] = []
    dead: list[torch.Tensor] = []
    position = positions[:, -1:]
    for step in range(params.max_new_tokens):
        nxt = sample_next(out.logits[:, -1, :], params, generators)
        dead.append(finished.clone())
        nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
        tokens.append(nxt)
        if on_step is not None:
            on_step(step, nxt)
        if params.stop_at_eos:
            finished = finished | torch.isin(nxt, eos)
        if step == params.max_new_tokens - 1 or bool(finished.all()):
            break
        mask = torch.cat([mask, (~finished).long()[:, None]], dim=-1)
        position = position + 1
        out = hf(input_ids=nxt[:, None], attention_mask=mask, position_ids=position, **cached)
    total = time.perf_counter() - t0
    timings = {
        "prefill_s": t_prefill,
        "decode_s": total - t_prefill,
        "total_s": total,
        "steps": float(len(tokens)),
        "s_per_token": total / max(len(tokens), 1),
        "batch_size": float(len(batch.ids)),
    }
    return torch.stack(tokens, dim=1), torch.stack(dead, dim=1), timings


# ---------------------------------------------------------------------------------------------
# Perplexity of continuations


def continuation_perplexities(
    model: LanguageModel,
    prompt_ids: Sequence[Sequence[int]],
    cont_ids: Sequence[Sequence[int]],
    batch_size: int = 16,
) -> list[float]:
    """exp(mean NLL) of each continuation given its prompt under the unsteered HF model (NaN for
    an empty continuation); see :func:`perplexities_of_ids`."""
    pad_id = model.tokenizer.pad_token_id
    return perplexities_of_ids(model.hf, prompt_ids, cont_ids, 0 if pad_id is None else pad_id, batch_size)


@torch.inference_mode()
def perplexities_of_ids(
    hf: Any,
    prompt_ids: Sequence[Sequence[int]],
    cont_ids: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 16,
) -> list[float]:
    """exp(mean NLL) of each continuation given its prompt under a Hugging Face causal LM (NaN for
    an empty continuation). Rows run in right-padded batches, in the order given: a causal
    model's logits at the real positions do not see the padding after them. The output head runs
    only from the batch's shortest prompt on (``logits_to_keep``)."""
    if len(prompt_ids) != len(cont_ids):
        raise SaealignError(f"{len(prompt_ids)} prompts for {len(cont_ids)} continuations")
    if batch_size < 1:
        raise SaealignError(f"batch_size must be at least 1, got {batch_size}")
    if any(not len(p) for p in prompt_ids):
        raise SaealignError("a continuation's prompt is empty; fix: give every prompt at least one token")
    out = [math.nan] * len(cont_ids)
    rows = [i for i, c in enumerate(cont_ids) if len(c)]
    device = next(hf.parameters()).device
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        seqs = [list(prompt_ids[i]) + list(cont_ids[i]) for i in chunk]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for j, seq in enumerate(seqs):
            ids[j, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[j, : len(seq)] = 1
        ids, mask = ids.to(device), mask.to(device)
        offset = min(len(prompt_ids[i]) for i in chunk) - 1  # first position whose logits count
        logits = hf(input_ids=ids, attention_mask=mask, logits_to_keep=width - offset).logits.float()
        for j, i in enumerate(chunk):
            p, n = len(prompt_ids[i]), len(cont_ids[i])
            nll = F.cross_entropy(logits[j, p - 1 - offset : p + n - 1 - offset], ids[j, p : p + n])
            out[i] = float(torch.exp(nll))
    return out


# ---------------------------------------------------------------------------------------------
# Public entry


def generate(
    model: LanguageModel,
    sae: Any | None,
    prompts: Sequence[str],
    specs: SteeringSpec | Sequence[SteeringSpec] | None = None,
    hook_name: str | None = None,
    params: SamplingParams | None = None,
    batch_size: int = 8,
    seeds: Sequence[int] | None = None,
    on_token: TokenCallback | None = None,
) -> list[GenerationResult]:
    """Generate a continuation of every prompt, each row steered by its spec.

    ``specs``: one per prompt, or one for all, or None for plain generation with no hook at all.
    ``sae``: the SAE the specs (and their scores) belong to; may be None when no spec needs it.
    ``seeds``: a sampling seed per prompt (default: ``params.seed`` for every row).
    Prompts run in batches of ``batch_size`` (left padding); results come back in prompt order.
    ``on_token``: called with a :class:`TokenEvent` at every decode step (streaming).
    """
    params = params or SamplingParams()
    check_prompts(prompts)
    if batch_size < 1:
        raise SaealignError(f"batch_size must be at least 1, got {batch_size}")
    if seeds is not None and len(seeds) != len(prompts):
        raise SaealignError(f"{len(seeds)} seeds for {len(prompts)} prompts; fix: one seed per prompt")
    row_seeds = list(seeds) if seeds is not None else [params.seed] * len(prompts)
    spec_list = _spec_list(specs, len(prompts))
    hook = check_generation_sae(model, sae, hook_name) if spec_list is not None else None
    if spec_list is not None and sae is not None:
        for spec in spec_list:
            spec.check_fits(int(sae.cfg.d_sae))
    ids = _tokenize(model, prompts, params.max_new_tokens)
    results: list[GenerationResult] = []
    for start in range(0, len(prompts), batch_size):
        stop = min(start + batch_size, len(prompts))
        row_specs = spec_list[start:stop] if spec_list is not None else None
        results += _generate_batch(
            model,
            sae,
            hook,
            prompts[start:stop],
            ids[start:stop],
            row_specs,
            params,
            row_seeds[start:stop],
            on_token,
            start,
        )
    return results


def _spec_list(specs: SteeringSpec | Sequence[SteeringSpec] | None, n: int) -> list[SteeringSpec] | None:
    if specs is None:
        return None
    if isinstance(specs, SteeringSpec):
        return [specs] * n
    spec_list = list(specs)
    if len(spec_list) != n:
        raise SaealignError(f"{len(spec_list)} steering specs for {n} prompts; fix: one per prompt, or one for all")
    return spec_list


def _tokenize(model: LanguageModel, prompts: Sequence[str], max_new_tokens: int) -> list[list[int]]:
    ids = model.tokenize(list(prompts), max_length=10**9)
    limit = model.n_ctx - max_new_tokens
    for i, row in enumerate(ids):
        if not row:
            raise SaealignError(f"prompt {i} has no tokens; fix: give every prompt some text")
        if len(row) > limit:
            raise SaealignError(
                f"prompt {i} has {len(row)} tokens; with max_new_tokens={max_new_tokens} the model's "
                f"context of {model.n_ctx} allows {limit}; fix: shorten the prompt or ask for fewer tokens"
            )
    return ids


def _generate_batch(
    model: LanguageModel,
    sae: Any | None,
    hook: str | None,
    prompts: Sequence[str],
    ids: list[list[int]],
    specs: list[SteeringSpec] | None,
    params: SamplingParams,
    seeds: list[int],
    on_token: TokenCallback | None = None,
    first_row: int = 0,
) -> list[GenerationResult]:
    tok = model.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    eos_ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    batch = left_pad(ids, pad_id, model.device)
    record = SteeringRecord()
    rows = tuple(range(first_row, first_row + len(ids)))

    def reporter(rec: SteeringRecord) -> Callable[[int, torch.Tensor], None] | None:
        return None if on_token is None else partial(_report_step, on_token, rec, rows)

    if specs is None:
        gen, dead, timings = decode_loop(model.hf, batch, params, eos_ids, pad_id, seeds, reporter(record))
    else:
        assert hook is not None
        with steering_hook(model.hf, sae, hook, specs, special_ids_of(tok)) as record:
            gen, dead, timings = decode_loop(model.hf, batch, params, eos_ids, pad_id, seeds, reporter(record))
    stats = _row_stats(record, batch, gen.shape[1])
    return [
        _result(model, prompts[i], ids[i], gen[i], dead[i], specs[i] if specs else SteeringSpec(), stats, i, timings)
        for i in range(len(ids))
    ]


def _report_step(
    on_token: TokenCallback, record: SteeringRecord, rows: tuple[int, ...], step: int, nxt: torch.Tensor
) -> None:
    """Report one decode step with the stats of the forward that produced its tokens (last position)."""
    c = ch = (math.nan,) * len(rows)
    if record.steps:
        last = record.steps[-1]
        c = tuple(float(v) for v in last.contamination[:, -1].tolist())
        ch = tuple(float(v) for v in last.latents_changed[:, -1].tolist())
    on_token(TokenEvent(step, rows, tuple(int(t) for t in nxt.tolist()), c, ch))


def _row_stats(record: SteeringRecord, batch: _Batch, steps: int) -> dict[str, torch.Tensor] | None:
    """Prompt stats [B, W] and generated-token stats [B, steps] from the record."""
    if not record.steps:
        return None
    prefill, decode = record.steps[0], record.steps[1:]
    out = {"prompt_c": prefill.contamination, "prompt_ch": prefill.latents_changed}
    for key, attr in (("gen_c", "contamination"), ("gen_ch", "latents_changed")):
        cols = [getattr(prefill, attr)[:, -1:]] + [getattr(s, attr) for s in decode]
        out[key] = torch.cat(cols, dim=1)[:, :steps]
    return out


def _result(
    model: LanguageModel,
    prompt: str,
    prompt_ids: list[int],
    gen: torch.Tensor,
    dead: torch.Tensor,
    spec: SteeringSpec,
    stats: dict[str, torch.Tensor] | None,
    row: int,
    timings: dict[str, float],
) -> GenerationResult:
    tok = model.tokenizer
    n = int((~dead).sum())
    token_ids = [int(t) for t in gen[:n].tolist()]
    eos = tok.eos_token_id
    finish = "eos" if token_ids and token_ids[-1] == eos else "length"
    text_ids = token_ids[:-1] if finish == "eos" else token_ids
    p = len(prompt_ids)

    def take(key: str, width: int | None = None) -> list[float]:
        if stats is None:
            return [math.nan] * (width if width is not None else n)
        values = stats[key][row]
        values = values[-width:] if width is not None else values[:n]
        return [float(v) for v in values.tolist()]

    return GenerationResult(
        prompt=prompt,
        method=spec.method,
        text=str(tok.decode(text_ids, skip_special_tokens=True)),
        token_ids=token_ids,
        tokens=[str(tok.decode([t])) for t in token_ids],
        contamination=take("gen_c"),
        latents_changed=take("gen_ch"),
        prompt_token_ids=list(prompt_ids),
        prompt_contamination=take("prompt_c", p),
        prompt_latents_changed=take("prompt_ch", p),
        finish_reason=finish,
        timings=dict(timings),
        spec=spec,
    )
