"""The engine of ``saealign serve``: what one replica holds and how it generates, without Ray.

:class:`Engine` loads the LM, the SAE and every scored topic of a lake dataset, scores new topics
and runs generation rows; :class:`Batcher` runs the rows of concurrent requests in batches, one
batch at a time. ``workflows/serve.py`` puts them behind the Ray Serve deployment and its FastAPI
routes.
"""

# No ``from __future__ import annotations``: pydantic reads ServeConfig's annotations (Ray Serve's
# typed app arguments) and needs them as types.

import asyncio
import dataclasses
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq
import torch
from pydantic import ConfigDict

from ops.errors import SaealignError, TopicExistsError
from ops.lake.contract import Lake
from ops.models.lm import load_model, resolve_device
from ops.saes.registry import load_sae, sae_id
from ops.scoring.scores import (
    dataset_key,
    list_topics,
    resolve_dataset,
    score_topic,
    top_latents,
    topic_scores,
)
from ops.steering.engine import SteeringSpec, check_scores_sae, check_steerable
from ops.steering.generation import GenerationResult, SamplingParams, TokenCallback, TokenEvent, generate
from workflows.serve_api import (
    MAX_ALIGN_TEXTS,
    MAX_PROMPT_CHARS,
    CompareRequest,
    GenerateRequest,
    Limits,
    RequestLimitError,
    SteeringOptions,
    TopicRequest,
    check_limits,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    """Serve steered generation over HTTP (Ray Serve) with a web page; binds to 127.0.0.1 by default."""

    lake: str = "out/demo/lake"
    """Lake with the topic scores (`saealign demo` builds out/demo/lake)."""
    dataset: str | None = None
    """Lake dataset; default: the lake's only dataset. Model, SAE and hook come from its manifest."""
    sae: str = ""
    """SAE spec; empty = the one the dataset was built with (its manifest)."""
    host: str = "127.0.0.1"
    """HTTP host to bind (0.0.0.0 exposes the service to the network)."""
    port: int = 8000
    """HTTP port."""
    replicas: int = 1
    """Replicas of the deployment (each loads model, SAE and scores once)."""
    max_ongoing_requests: int = 32
    """Concurrent requests per replica (more wait in the proxy's queue)."""
    max_batch_size: int = 8
    """Generation rows batched into one forward pass."""
    batch_wait_timeout_s: float = 0.02
    """How long a batch waits to fill up."""
    max_queued_rows: int = 64
    """Rows (a request's methods) that may wait for the next batch per replica; beyond that a
    request is refused with HTTP 429 and a Retry-After header (back-pressure)."""
    cpus_per_replica: float = 1.0
    """Ray CPUs reserved per replica."""
    gpus_per_replica: float = 0.0
    """Ray GPUs reserved per replica (with device 'auto' a replica with a GPU generates on it)."""
    torch_threads: int = 0
    """torch intra-op threads per replica (0 = Ray's default: the replica's CPUs)."""
    device: str = "auto"
    """'auto' (cuda when available), 'cpu' or 'cuda'."""
    max_prompt_chars: int = 2000
    """Longest prompt accepted, in characters."""
    max_prompt_tokens: int = 512
    """Longest prompt accepted, in tokens."""
    max_new_tokens: int = 256
    """Most tokens one request may generate."""
    max_align_texts: int = 200
    """Most align texts one POST /topics may send."""
    allow_new_topics: bool = True
    """Allow POST /topics to score and store new topics in the lake."""
    warmup: bool = True
    """Run one short generation when a replica starts (the first request is then not slow)."""
    address: str = ""
    """Ray cluster address for `saealign serve` (empty: start a local Ray)."""

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise SaealignError(f"--port must be in 1..65535, got {self.port}")
        if self.max_queued_rows < 1:
            raise SaealignError("--max-queued-rows must be at least 1")
        if self.replicas < 1 or self.max_batch_size < 1 or self.max_ongoing_requests < 1:
            raise SaealignError("--replicas, --max-batch-size and --max-ongoing-requests must be at least 1")
        if min(self.batch_wait_timeout_s, self.cpus_per_replica, self.gpus_per_replica, self.torch_threads) < 0:
            raise SaealignError("--batch-wait-timeout-s, --cpus/gpus-per-replica and --torch-threads must be >= 0")
        if not 0 < self.max_prompt_chars <= MAX_PROMPT_CHARS:
            raise SaealignError(f"--max-prompt-chars must be in 1..{MAX_PROMPT_CHARS}")
        if not 0 < self.max_align_texts <= MAX_ALIGN_TEXTS:
            raise SaealignError(f"--max-align-texts must be in 1..{MAX_ALIGN_TEXTS}")
        if self.max_prompt_tokens < 1:
            raise SaealignError("--max-prompt-tokens must be at least 1")
        SamplingParams(max_new_tokens=self.max_new_tokens)  # validates the bound

    @property
    def limits(self) -> Limits:
        return Limits(self.max_prompt_chars, self.max_prompt_tokens, self.max_new_tokens, self.max_align_texts)


ServeConfig.__pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[attr-defined]


class UnknownTopicError(SaealignError):
    """No scores for the topic (HTTP 404)."""


@dataclass
class Row:
    """One generation request: prompt, its steering spec, sampling parameters and seed."""

    prompt: str
    spec: SteeringSpec
    params: SamplingParams
    seed: int
    queued_at: float = dataclasses.field(default_factory=time.perf_counter)


@dataclass
class Topic:
    scores: torch.Tensor
    """[d_sae] float32, NaN = unscored."""
    meta: dict[str, Any]
    top: list[dict[str, Any]]
    """The 50 highest-scored latents (latent, score, g, support)."""


class StreamCancelled(Exception):
    """Raised inside a streaming generation whose client went away."""


class IncrementalText:
    """Detokenizes a growing list of ids, returning only the new text (held back while the
    tail is an incomplete UTF-8 character)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = str(self.tokenizer.decode(self.ids, skip_special_tokens=True))
        if text.endswith("\ufffd") or not text.startswith(self.text):
            return ""
        delta, self.text = text[len(self.text) :], text
        return delta


class Engine:
    """Model, SAE and topic scores of one replica, and the generation entry points."""

    def __init__(self, cfg: ServeConfig) -> None:
        t0 = time.perf_counter()
        self.cfg = cfg
        self.limits = cfg.limits
        lake = Lake(cfg.lake)
        self.dataset = resolve_dataset(lake, cfg.dataset)
        self.key = dataset_key(lake, self.dataset)
        manifest = lake.read_manifest(self.dataset)
        self.sae_spec = cfg.sae or str(manifest["config"]["sae"])
        if cfg.sae:
            check_scores_sae(self.key.sae, sae_id(cfg.sae))
        device = resolve_device(cfg.device)
        self.model = load_model(self.key.model, device=device)
        self.sae = load_sae(self.sae_spec, device=device)
        self.hook = self.key.hook
        check_steerable(self.sae, self.hook)  # an --sae override is refused at start, not per request
        self.d_sae = int(self.sae.cfg.d_sae)
        self.topics: dict[str, Topic] = {}
        for row in list_topics(cfg.lake):
            if row.get("dataset") == self.dataset:
                self._load_topic(str(row["topic"]))
        self._topic_lock = threading.Lock()
        self.load_s = time.perf_counter() - t0
        log.info(
            "serving %s + %s: %d topics, loaded in %.1fs", self.key.model, self.sae_spec, len(self.topics), self.load_s
        )

    # -- topics ---------------------------------------------------------------------------------

    def _load_topic(self, name: str) -> Topic:
        scores, meta = topic_scores(self.cfg.lake, name, self.dataset)
        if scores.shape[0] != self.d_sae:
            raise SaealignError(f"topic '{name}' has {scores.shape[0]} scores, the SAE {self.d_sae} latents")
        lake = Lake(self.cfg.lake)
        with lake.fs.open_input_file(lake.scores_export_path(name, self.dataset)) as src:
            table = pq.read_table(src, columns=["latent", "g", "support", "score"])
        topic = Topic(torch.from_numpy(scores), meta, top_latents(table, 50))
        self.topics[name] = topic
        return topic

    def topic(self, name: str) -> Topic:
        """A topic's scores; one scored since start-up (e.g. on another replica) is loaded."""
        if name in self.topics:
            return self.topics[name]
        known = {str(r.get("topic")) for r in list_topics(self.cfg.lake) if r.get("dataset") == self.dataset}
        if name not in known:
            raise UnknownTopicError(f"unknown topic '{name}'; scored topics: {sorted(known) or 'none'}")
        return self._load_topic(name)

    def topic_list(self) -> list[dict[str, Any]]:
        for row in list_topics(self.cfg.lake):
            if row.get("dataset") == self.dataset and row["topic"] not in self.topics:
                self._load_topic(str(row["topic"]))
        return [self.topic_info(name, 0) for name in sorted(self.topics)]

    def topic_info(self, name: str, top: int = 20) -> dict[str, Any]:
        t = self.topic(name)
        keep = ("n_align", "n_scored", "n_prompts", "min_support", "distance_power", "align_source", "created")
        return {"topic": name, **{k: t.meta.get(k) for k in keep if k in t.meta}, "top": t.top[:top]}

    def add_topic(self, req: TopicRequest) -> dict[str, Any]:
        """Score a new topic with the DuckDB scoring (never replacing one) and load it."""
        if not self.cfg.allow_new_topics:
            raise SaealignError("this service does not score new topics (allow_new_topics is off)")
        with self._topic_lock:
            lake = Lake(self.cfg.lake)
            if req.name in self.topics or lake.exists(lake.scores_export_path(req.name, self.dataset)):
                raise TopicExistsError(f"topic '{req.name}' already exists; choose another name")
            row = score_topic(
                self.cfg.lake,
                req.name,
                req.texts,
                self.dataset,
                power=float(req.distance_power),
                min_support=req.min_support,
                replace=False,
                align_source="serve",
            )
            self._load_topic(req.name)
        info = self.topic_info(req.name, req.top)
        info["timings"] = row.get("timings", {})
        return info

    # -- requests -> rows -----------------------------------------------------------------------

    def spec(self, method: str, topic: str | None, options: SteeringOptions) -> SteeringSpec:
        scores = self.topic(topic).scores if topic else None
        spec = SteeringSpec.for_method(method, scores, options.settings(), topic)
        spec.check_fits(self.d_sae)
        return spec

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The conversation as the model's chat template writes it, the assistant's turn opened."""
        tokenizer = self.model.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise SaealignError(
                f"model '{self.key.model}' has no chat template; fix: use /v1/completions with a plain prompt"
            )
        return str(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))

    def check_prompt(self, prompt: str, max_new_tokens: int) -> int:
        """The prompt's token count; raises when it does not fit the limits or the context."""
        n = len(self.model.tokenize([prompt], max_length=10**9)[0])
        if n == 0:
            raise RequestLimitError("prompt", "the prompt has no tokens")
        if n > self.limits.max_prompt_tokens:
            raise RequestLimitError("prompt", f"at most {self.limits.max_prompt_tokens} tokens, got {n}")
        if n + max_new_tokens > self.model.n_ctx:
            raise RequestLimitError("max_new_tokens", f"{n} prompt tokens + {max_new_tokens} exceed the context")
        return n

    def rows(self, req: GenerateRequest | CompareRequest, methods: Sequence[str]) -> list[Row]:
        check_limits(req, self.limits)
        self.check_prompt(req.prompt, req.max_new_tokens)
        params = SamplingParams(
            max_new_tokens=req.max_new_tokens,
            greedy=req.greedy,
            top_k=req.top_k,
            temperature=req.temperature,
            stop_at_eos=not req.ignore_eos,
        )
        return [Row(req.prompt, self.spec(m, req.topic, req.options), params, req.seed) for m in methods]

    # -- generation -----------------------------------------------------------------------------

    def run_rows(self, rows: Sequence[Row]) -> list[GenerationResult | Exception]:
        """Generate every row: one :func:`generate` call per group of equal sampling parameters,
        per-row specs and seeds. A failing group is retried row by row, so one bad row fails alone."""
        out: list[GenerationResult | Exception] = [RuntimeError("not run")] * len(rows)
        groups: dict[SamplingParams, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(row.params, []).append(i)
        for params, idx in groups.items():
            try:
                results = self._generate([rows[i] for i in idx], params)
                for i, res in zip(idx, results, strict=True):
                    out[i] = res
            except Exception as exc:
                if len(idx) == 1:
                    out[idx[0]] = exc
                    continue
                log.warning("batch of %d failed (%s); retrying row by row", len(idx), exc)
                for i in idx:
                    try:
                        out[i] = self._generate([rows[i]], params)[0]
                    except Exception as row_exc:
                        out[i] = row_exc
        return out

    def _generate(
        self, rows: Sequence[Row], params: SamplingParams, on_token: TokenCallback | None = None
    ) -> list[GenerationResult]:
        return generate(
            self.model,
            self.sae,
            [r.prompt for r in rows],
            [r.spec for r in rows],
            hook_name=self.hook,
            params=params,
            batch_size=len(rows),
            seeds=[r.seed for r in rows],
            on_token=on_token,
        )

    def stream(self, row: Row, emit: Callable[[dict[str, Any]], None], cancelled: threading.Event) -> GenerationResult:
        """Generate one row, calling ``emit`` with each token as it is sampled: its index, id,
        token string, incremental text and the contamination / latents changed of its step."""
        tok = self.model.tokenizer
        text = IncrementalText(tok)

        def on_token(event: TokenEvent) -> None:
            if cancelled.is_set():
                raise StreamCancelled
            token_id, c, ch = event.token_ids[0], event.contamination[0], event.latents_changed[0]
            emit(
                {
                    "index": event.step,
                    "token_id": token_id,
                    "token": str(tok.decode([token_id])),
                    "text": text.push(token_id),
                    "contamination": None if math.isnan(c) else c,
                    "latents_changed": None if math.isnan(ch) else ch,
                }
            )

        return self._generate([row], row.params, on_token)[0]

    def warm_up(self) -> None:
        spec = SteeringSpec("swap", next(iter(self.topics.values())).scores) if self.topics else SteeringSpec("sae")
        self.run_rows([Row("Hello", spec, SamplingParams(max_new_tokens=2), 0)])


def result_dict(
    res: GenerationResult, row: Row, started: float, extra: dict[str, float] | None = None
) -> dict[str, Any]:
    """A result as the API returns it: ``GenerationResult.to_dict()`` plus the seed and the
    request's queue and total time."""
    out = res.to_dict()
    out["seed"] = row.seed
    out["timings"] = {**out["timings"], **(extra or {}), "request_s": time.perf_counter() - started}
    return out


class ServiceBusyError(SaealignError):
    """The replica's queue is full (the service answers HTTP 429 with Retry-After)."""

    retry_after_s = 1


class Batcher:
    """Runs rows submitted by concurrent requests in batches, one batch at a time, through
    ``run(rows) -> results`` in a worker thread.

    A batch is formed when the previous one has finished: it takes up to ``max_batch_size``
    waiting rows, and when fewer are waiting it waits up to ``wait_s`` for more. At most
    ``max_queued`` rows wait; a request that would exceed it is refused whole
    (:class:`ServiceBusyError`). Rows whose caller went away are dropped before running. ``run``
    returns one result or exception per row; an exception raised by ``run`` itself goes to every
    row of the batch.
    """

    def __init__(
        self,
        run: Callable[[list[Row]], list[GenerationResult | Exception]],
        max_batch_size: int,
        wait_s: float,
        max_queued: int = 64,
    ) -> None:
        self.run = run
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self.max_queued = max_queued
        self._rows: deque[tuple[Row, asyncio.Future[GenerationResult | Exception]]] = deque()
        self._ready: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None

    def admit(self, n_rows: int) -> None:
        """Raise :class:`ServiceBusyError` unless ``n_rows`` more rows fit in the queue."""
        waiting = sum(1 for _, future in self._rows if not future.done())
        if waiting + n_rows > self.max_queued:
            raise ServiceBusyError(
                f"the service is busy ({waiting} rows queued, at most {self.max_queued}); "
                f"fix: retry after {ServiceBusyError.retry_after_s} s"
            )

    async def submit(self, row: Row) -> GenerationResult | Exception:
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._ready = asyncio.Event()
            self._worker = loop.create_task(self._work())
        assert self._ready is not None
        future: asyncio.Future[GenerationResult | Exception] = loop.create_future()
        self._rows.append((row, future))
        self._ready.set()
        return await future

    async def _next_batch(self) -> list[tuple[Row, asyncio.Future[GenerationResult | Exception]]]:
        assert self._ready is not None
        while not self._rows:
            self._ready.clear()
            await self._ready.wait()
        deadline = asyncio.get_running_loop().time() + self.wait_s
        while len(self._rows) < self.max_batch_size:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), remaining)
            except TimeoutError:
                break
        n = min(self.max_batch_size, len(self._rows))
        return [item for item in (self._rows.popleft() for _ in range(n)) if not item[1].done()]

    async def _work(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            try:
                results = await asyncio.to_thread(self.run, [row for row, _ in batch])
            except Exception as exc:
                results = [exc] * len(batch)
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
