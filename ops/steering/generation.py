"""Steered generation through the Hugging Face model: KV cache, left padding, per-row specs.

:class:`RunningBatch` is the one decode loop: rows join it (their left-padded prompts prefilled,
their KV caches merged into the batch's) and leave it (finished, failed or cancelled) between
two KV-cached decode steps on ``model.hf``, inside :func:`ops.steering.engine.steering_hook`, so
the hook (a native PyTorch forward hook on decoder layer L) steers the prompt and every generated
token of each row with the row's own spec. :func:`generate` (every job) and the service's
scheduler (``workflows/serve_engine.py``) both drive it. Sampling: greedy, or top-k (default 5)
with a temperature; each row draws from its own seeded generator, so a row's sample does not
depend on the other rows of its batch.

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
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, field
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
    """One new token of one row, reported to its ``on_token`` callback as soon as it is sampled."""

    step: int
    """Index of the generated token (0 = the first new token)."""
    row: int
    """The row's index (into ``generate``'s ``prompts``)."""
    token_id: int
    contamination: float
    """Of the steered activation that produced the token; NaN where not measured."""
    latents_changed: float


TokenCallback = Callable[[TokenEvent], None]
"""Called once per new token of a row; an exception raised in it ends that row (e.g. a client left)."""


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
# Batches


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
# The running batch: iteration-level scheduling


class GenerationCancelled(SaealignError):
    """A row was cancelled (its caller went away) before it finished."""


@dataclass
class DecodeRequest:
    """One row to generate: prompt ids, steering spec, sampling parameters and seed."""

    prompt: str
    prompt_ids: list[int]
    spec: SteeringSpec = field(default_factory=SteeringSpec)
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0
    on_token: TokenCallback | None = None
    """Called with each new token of this row."""
    cancelled: Callable[[], bool] | None = None
    """Polled before every decode step; True drops the row (its result: :class:`GenerationCancelled`)."""
    row: int = 0
    """The caller's index of the row (reported in its token events)."""
    queued_at: float = field(default_factory=time.perf_counter)
    """When the request was made (``time.perf_counter``): the service reports its time queued."""


@dataclass
class _Live:
    req: DecodeRequest
    generator: torch.Generator
    started: float
    prefill_s: float
    prompt_c: list[float]
    prompt_ch: list[float]
    token_ids: list[int] = field(default_factory=list)
    contamination: list[float] = field(default_factory=list)
    latents_changed: list[float] = field(default_factory=list)
    decode_s: float = 0.0
    batch_rows: int = 0
    """Sum over this row's decode steps of the rows decoded together with it."""


Finished = tuple[DecodeRequest, "GenerationResult | Exception"]
"""A row that left the batch: its request and its result, or the exception that ended it."""


class RunningBatch:
    """A batch of rows that decode together, one KV-cached step at a time, where rows join
    (:meth:`add`: their prompts are prefilled and their caches merged into the batch's) and leave
    (when they finish, fail or are cancelled) between steps: iteration-level scheduling.

    Every row keeps its own steering spec, sampling parameters, seed and token budget; a row's
    tokens are those it gets alone (per-row seeded sampling, left padding, per-row positions).
    The steering hook (:func:`ops.steering.engine.steering_hook`) is entered per batch
    composition, so each forward steers its rows with their own specs. Caches merge by left
    padding the shorter one, which needs plain (not sliding-window) cache layers; for other models
    rows join only an empty batch (:attr:`joinable`). Not thread-safe: one thread drives it.
    """

    def __init__(self, model: LanguageModel, sae: Any | None, hook_name: str | None) -> None:
        self.model = model
        self.sae = sae
        self.hook = hook_name
        tok = model.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self.eos_id = tok.eos_token_id
        self.special_ids = special_ids_of(tok)
        self.device = model.device
        self._cache_kw = cache_keyword(model.hf)
        self._rows: list[_Live] = []
        self._cache: Any = None
        self._mask = torch.zeros((0, 0), dtype=torch.long)
        self._position = torch.zeros((0, 1), dtype=torch.long)
        self._next = torch.zeros(0, dtype=torch.long)
        self._steering: ExitStack | None = None
        self._record: SteeringRecord | None = None

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def joinable(self) -> bool:
        """Whether rows may join now: the batch is empty, or its cache layers can be merged."""
        from transformers.cache_utils import DynamicLayer

        return not self._rows or all(type(layer) is DynamicLayer for layer in self._cache.layers)

    # -- joining ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def add(self, requests: Sequence[DecodeRequest]) -> list[Finished]:
        """Prefill ``requests`` together and merge them into the batch; returns the rows that are
        already done (one-token budgets, EOS at once) or failed (e.g. a spec that does not fit)."""
        if not requests:
            return []
        if not self.joinable:
            raise SaealignError("rows can join this model's batch only when it is empty (sliding-window cache)")
        try:
            return self._add(requests)
        except Exception as exc:  # the batch is unchanged: retry row by row, so a bad row fails alone
            if len(requests) == 1:
                return [(requests[0], exc)]
            log.warning("prefill of %d rows failed (%s); retrying row by row", len(requests), exc)
            return [done for req in requests for done in self.add([req])]

    def _add(self, requests: Sequence[DecodeRequest]) -> list[Finished]:
        from transformers import DynamicCache

        self._close_steering()
        started = time.perf_counter()
        batch = left_pad([list(r.prompt_ids) for r in requests], self.pad_id, str(self.device))
        mask = batch.attention_mask
        positions = (mask.cumsum(dim=-1) - 1).clamp_(min=0)
        cache = DynamicCache(config=self.model.hf.config)
        with self._steered([r.spec for r in requests]) as record:
            out = self.model.hf(
                input_ids=batch.input_ids,
                attention_mask=mask,
                position_ids=positions,
                logits_to_keep=1,
                use_cache=True,
                **{self._cache_kw: cache},
            )
        prefill_s = time.perf_counter() - started
        stats = record.steps[-1] if record is not None and record.steps else None
        rows = []
        for i, req in enumerate(requests):
            n = len(req.prompt_ids)
            c = _floats(stats.contamination[i, -n:]) if stats is not None else [math.nan] * n
            ch = _floats(stats.latents_changed[i, -n:]) if stats is not None else [math.nan] * n
            generator = torch.Generator(device=self.device).manual_seed(int(req.seed))
            rows.append(_Live(req, generator, started, prefill_s, c, ch))
        first = len(self._rows)
        self._merge(cache, mask, positions[:, -1:], rows)
        return self._sample(out.logits[:, -1, :], range(first, len(self._rows)), stats)

    def _merge(self, cache: Any, mask: torch.Tensor, position: torch.Tensor, rows: list[_Live]) -> None:
        if not self._rows:
            self._cache, self._mask, self._position = cache, mask, position
            self._next = torch.full((len(rows),), self.pad_id, dtype=torch.long, device=mask.device)
            self._rows = rows
            return
        width = max(self._mask.shape[1], mask.shape[1])
        for old, new in zip(self._cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([_left_pad_seq(old.keys, width), _left_pad_seq(new.keys, width)])
            old.values = torch.cat([_left_pad_seq(old.values, width), _left_pad_seq(new.values, width)])
        self._mask = torch.cat([_left_pad_seq(self._mask, width, dim=1), _left_pad_seq(mask, width, dim=1)])
        self._position = torch.cat([self._position, position])
        pads = torch.full((len(rows),), self.pad_id, dtype=torch.long, device=mask.device)
        self._next = torch.cat([self._next, pads])
        self._rows += rows

    # -- decoding ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[Finished]:
        """One decode step for every row; returns the rows that finished, failed or were cancelled."""
        done: list[Finished] = []
        gone = [i for i, r in enumerate(self._rows) if r.req.cancelled is not None and r.req.cancelled()]
        if gone:
            done += [(self._rows[i].req, GenerationCancelled("the request was cancelled")) for i in gone]
            self._remove(gone)
        if not self._rows:
            return done
        record = self._open_steering()
        n_stats = len(record.steps) if record is not None else 0
        t0 = time.perf_counter()
        self._mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=-1)
        self._position = self._position + 1
        out = self.model.hf(
            input_ids=self._next[:, None],
            attention_mask=self._mask,
            position_ids=self._position,
            use_cache=True,
            **{self._cache_kw: self._cache},
        )
        elapsed = time.perf_counter() - t0
        for row in self._rows:
            row.decode_s += elapsed
            row.batch_rows += len(self._rows)
        stats = record.steps[-1] if record is not None and len(record.steps) > n_stats else None
        return done + self._sample(out.logits[:, -1, :], range(len(self._rows)), stats)

    def _sample(self, logits: torch.Tensor, rows: range, stats: Any) -> list[Finished]:
        """Sample the next token of ``rows`` (``logits``: one row each, in order), report it, and
        remove the rows that are done."""
        live = [self._rows[i] for i in rows]
        ids = sample_rows(logits, [r.req.params for r in live], [r.generator for r in live])
        done: list[Finished] = []
        ended: list[int] = []
        nan = [math.nan] * len(live)
        cs = stats.contamination[:, -1].tolist() if stats is not None else nan  # one read per step, not per row
        chs = stats.latents_changed[:, -1].tolist() if stats is not None else nan
        self._next[rows.start : rows.stop] = ids  # the next step's inputs
        for i, row, token, c, ch in zip(rows, live, ids.tolist(), cs, chs, strict=True):
            row.token_ids.append(int(token))
            row.contamination.append(c)
            row.latents_changed.append(ch)
            try:
                if row.req.on_token is not None:
                    row.req.on_token(TokenEvent(len(row.token_ids) - 1, row.req.row, int(token), c, ch))
            except Exception as exc:
                done.append((row.req, exc))
                ended.append(i)
                continue
            params = row.req.params
            if len(row.token_ids) >= params.max_new_tokens or (params.stop_at_eos and token == self.eos_id):
                done.append((row.req, self._result(row)))
                ended.append(i)
        if ended:
            self._remove(ended)
        return done

    def _remove(self, indices: Sequence[int]) -> None:
        drop = set(indices)
        keep = [i for i in range(len(self._rows)) if i not in drop]
        self._close_steering()
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache = None
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self._mask.device)
        for layer in self._cache.layers:
            layer.batch_select_indices(idx)
        self._mask, self._position, self._next = self._mask[idx], self._position[idx], self._next[idx]
        lead = int(self._mask.any(dim=0).long().argmax())  # columns that are padding in every row
        if lead and self.joinable:
            self._mask = self._mask[:, lead:]
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]

    def _result(self, row: _Live) -> GenerationResult:
        steps = len(row.token_ids)
        total = time.perf_counter() - row.started
        timings = {
            "prefill_s": row.prefill_s,
            "decode_s": row.decode_s,
            "total_s": total,
            "steps": float(steps),
            "s_per_token": total / max(steps, 1),
            "batch_size": row.batch_rows / max(steps - 1, 1) if steps > 1 else 1.0,
        }
        return make_result(
            self.model.tokenizer,
            row.req,
            row.token_ids,
            row.contamination,
            row.latents_changed,
            row.prompt_c,
            row.prompt_ch,
            timings,
        )

    # -- steering ---------------------------------------------------------------------------------

    def _steered(self, specs: list[SteeringSpec]) -> AbstractContextManager[SteeringRecord | None]:
        if self.hook is None:
            return nullcontext()
        return steering_hook(self.model.hf, self.sae, self.hook, specs, self.special_ids)

    def _open_steering(self) -> SteeringRecord | None:
        """The steering context of the current rows, entered once per batch composition."""
        if self.hook is None:
            return None
        if self._steering is None:
            self._steering = ExitStack()
            self._record = self._steering.enter_context(self._steered([r.req.spec for r in self._rows]))
        return self._record

    def _close_steering(self) -> None:
        if self._steering is not None:
            self._steering.close()
            self._steering, self._record = None, None

    def close(self) -> list[Finished]:
        """Leave the steering context and drop every row (each ends with :class:`GenerationCancelled`)."""
        done: list[Finished] = [(r.req, GenerationCancelled("the batch was closed")) for r in self._rows]
        self._close_steering()
        self._rows, self._cache = [], None
        return done


def _left_pad_seq(x: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """``x`` left-padded with zeros along ``dim`` to ``width``."""
    missing = width - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def _floats(values: torch.Tensor) -> list[float]:
    return [float(v) for v in values.tolist()]


def sample_rows(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: list[torch.Generator]
) -> torch.Tensor:
    """:func:`sample_next` for rows with their own sampling parameters (grouped by how they sample)."""
    groups: dict[tuple[bool, int, float], list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.greedy, p.top_k, p.temperature), []).append(i)
    if len(groups) == 1:
        return sample_next(logits, params[0], generators)
    out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    for idx in groups.values():
        rows = torch.tensor(idx, dtype=torch.long, device=logits.device)
        out[rows] = sample_next(logits[rows], params[idx[0]], [generators[i] for i in idx])
    return out


def run_requests(
    model: LanguageModel,
    sae: Any | None,
    hook_name: str | None,
    requests: Sequence[DecodeRequest],
    batch_size: int,
) -> list[GenerationResult]:
    """Generate every request in one :class:`RunningBatch` of at most ``batch_size`` rows (a
    waiting row joins as soon as one leaves); results in request order. An exception that ends a
    row (e.g. raised by its ``on_token``) is raised once the batch has stopped."""
    results: list[GenerationResult | Exception | None] = [None] * len(requests)
    order = {id(r): i for i, r in enumerate(requests)}
    waiting = list(requests)[::-1]
    batch = RunningBatch(model, sae, hook_name)
    try:
        while waiting or len(batch):
            room = batch_size - len(batch)
            joining = [waiting.pop() for _ in range(min(room, len(waiting)))] if batch.joinable else []
            finished = batch.add(joining) + batch.step() if joining else batch.step()
            for req, res in finished:
                results[order[id(req)]] = res
                if isinstance(res, Exception):
                    raise res
    finally:
        batch.close()
    return [r for r in results if isinstance(r, GenerationResult)]


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
    At most ``batch_size`` rows decode together (:class:`RunningBatch`: left padding, a waiting
    prompt joins when a row finishes); results come back in prompt order.
    ``on_token``: called with a :class:`TokenEvent` for every new token of every row (streaming).
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
    requests = [
        DecodeRequest(
            prompt, ids[i], spec_list[i] if spec_list else SteeringSpec(), params, row_seeds[i], on_token, row=i
        )
        for i, prompt in enumerate(prompts)
    ]
    return run_requests(model, sae, hook, requests, batch_size)


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


def make_result(
    tokenizer: Any,
    req: DecodeRequest,
    token_ids: list[int],
    contamination: list[float],
    latents_changed: list[float],
    prompt_c: list[float],
    prompt_ch: list[float],
    timings: dict[str, float],
) -> GenerationResult:
    """A row's :class:`GenerationResult` from its tokens and per-token statistics."""
    eos = tokenizer.eos_token_id
    finish = "eos" if token_ids and token_ids[-1] == eos and req.params.stop_at_eos else "length"
    text_ids = token_ids[:-1] if finish == "eos" else token_ids
    return GenerationResult(
        prompt=req.prompt,
        method=req.spec.method,
        text=str(tokenizer.decode(text_ids, skip_special_tokens=True)),
        token_ids=list(token_ids),
        tokens=[str(tokenizer.decode([t])) for t in token_ids],
        contamination=list(contamination),
        latents_changed=list(latents_changed),
        prompt_token_ids=list(req.prompt_ids),
        prompt_contamination=list(prompt_c),
        prompt_latents_changed=list(prompt_ch),
        finish_reason=finish,
        timings=timings,
        spec=req.spec,
    )
