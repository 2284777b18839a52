"""The engine of ``saealign serve``: what one replica holds and how it generates, without Ray.

:class:`Engine` loads the LM, the SAE and every scored topic of a lake dataset, scores new topics
and turns requests into generation rows; :class:`Scheduler` runs the rows of concurrent requests
with iteration-level scheduling (rows join the running batch between decode steps and leave
when done). ``workflows/serve.py`` puts them behind the Ray Serve deployment and its FastAPI
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
from ops.steering.generation import (
    DecodeRequest,
    GenerationCancelled,
    GenerationResult,
    RunningBatch,
    SamplingParams,
    TokenCallback,
    TokenEvent,
    run_requests,
)
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
class Topic:
    scores: torch.Tensor
    """[d_sae] float32, NaN = unscored."""
    meta: dict[str, Any]
    top: list[dict[str, Any]]
    """The 50 highest-scored latents (latent, score, g, support)."""


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

    def check_prompt(self, prompt: str, max_new_tokens: int) -> list[int]:
        """The prompt's token ids; raises when they do not fit the limits or the context."""
        ids = self.model.tokenize([prompt], max_length=10**9)[0]
        n = len(ids)
        if n == 0:
            raise RequestLimitError("prompt", "the prompt has no tokens")
        if n > self.limits.max_prompt_tokens:
            raise RequestLimitError("prompt", f"at most {self.limits.max_prompt_tokens} tokens, got {n}")
        if n + max_new_tokens > self.model.n_ctx:
            raise RequestLimitError("max_new_tokens", f"{n} prompt tokens + {max_new_tokens} exceed the context")
        return list(ids)

    def rows(self, req: GenerateRequest | CompareRequest, methods: Sequence[str]) -> list[DecodeRequest]:
        check_limits(req, self.limits)
        ids = self.check_prompt(req.prompt, req.max_new_tokens)
        params = SamplingParams(
            max_new_tokens=req.max_new_tokens,
            greedy=req.greedy,
            top_k=req.top_k,
            temperature=req.temperature,
            stop_at_eos=not req.ignore_eos,
        )
        return [DecodeRequest(req.prompt, ids, self.spec(m, req.topic, req.options), params, req.seed) for m in methods]

    # -- generation -----------------------------------------------------------------------------

    def running_batch(self) -> RunningBatch:
        """An empty :class:`RunningBatch` of this replica's model, SAE and hook."""
        return RunningBatch(self.model, self.sae, self.hook)

    def run_rows(self, rows: Sequence[DecodeRequest]) -> list[GenerationResult]:
        """Generate ``rows`` together, here and now (no scheduler): warm-up and tests."""
        return run_requests(self.model, self.sae, self.hook, list(rows), len(rows))

    def token_reporter(self, emit: Callable[[dict[str, Any]], None]) -> TokenCallback:
        """An ``on_token`` callback that calls ``emit`` with each new token as the API streams it:
        its index, id, token string, incremental text and its step's contamination / latents changed."""
        tok = self.model.tokenizer
        text = IncrementalText(tok)

        def on_token(event: TokenEvent) -> None:
            c, ch = event.contamination, event.latents_changed
            emit(
                {
                    "index": event.step,
                    "token_id": event.token_id,
                    "token": str(tok.decode([event.token_id])),
                    "text": text.push(event.token_id),
                    "contamination": None if math.isnan(c) else c,
                    "latents_changed": None if math.isnan(ch) else ch,
                }
            )

        return on_token

    def warm_up(self) -> None:
        spec = SteeringSpec("swap", next(iter(self.topics.values())).scores) if self.topics else SteeringSpec("sae")
        ids = self.check_prompt("Hello", 2)
        self.run_rows([DecodeRequest("Hello", ids, spec, SamplingParams(max_new_tokens=2), 0)])


def result_dict(
    res: GenerationResult, row: DecodeRequest, started: float, extra: dict[str, float] | None = None
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


@dataclass
class _Waiting:
    request: DecodeRequest
    deliver: Callable[[GenerationResult | Exception], None]


class Scheduler:
    """Iteration-level scheduling of one replica's generation rows (``RunningBatch``, one worker
    thread): between two decode steps, waiting rows join the running batch (up to
    ``max_batch_size`` rows decode together) and finished rows leave, so a request arriving while
    a long one decodes starts at the next step, not when the long one ends.

    Each row keeps its own steering spec, sampling parameters and seed (its tokens are those it
    gets alone). An idle engine waits up to ``wait_s`` for more rows before the first prefill, so
    requests arriving together are prefilled together. At most ``max_queued`` rows wait; a
    request that would exceed it is refused whole (:class:`ServiceBusyError`: HTTP 429). A row
    whose caller went away (its future cancelled, or its stream closed) is dropped before its
    next step; waiting rows of gone callers never start.
    """

    def __init__(
        self, make_batch: Callable[[], RunningBatch], max_batch_size: int, wait_s: float, max_queued: int = 64
    ) -> None:
        self.make_batch = make_batch
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self.max_queued = max_queued
        self._waiting: deque[_Waiting] = deque()
        self._wake = threading.Condition()
        self._running: dict[int, _Waiting] = {}
        self._worker: threading.Thread | None = None
        self._stopped = False

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def admit(self, n_rows: int) -> None:
        """Raise :class:`ServiceBusyError` unless ``n_rows`` more rows fit in the queue."""
        waiting = len(self._waiting)
        if waiting + n_rows > self.max_queued:
            raise ServiceBusyError(
                f"the service is busy ({waiting} rows queued, at most {self.max_queued}); "
                f"fix: retry after {ServiceBusyError.retry_after_s} s"
            )

    async def submit(
        self, row: DecodeRequest, on_token: TokenCallback | None = None, cancelled: threading.Event | None = None
    ) -> GenerationResult | Exception:
        """Queue ``row`` and wait for its result (or the exception that ended it). ``on_token`` is
        called from the worker thread with each new token; setting ``cancelled`` (or cancelling
        the awaiting task) drops the row."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[GenerationResult | Exception] = loop.create_future()

        def gone() -> bool:
            return future.cancelled() or (cancelled is not None and cancelled.is_set())

        def deliver(result: GenerationResult | Exception) -> None:
            loop.call_soon_threadsafe(_resolve, future, result)

        self.put(_Waiting(dataclasses.replace(row, on_token=on_token, cancelled=gone), deliver))
        return await future

    def put(self, item: _Waiting) -> None:
        with self._wake:
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="saealign-scheduler", daemon=True)
                self._worker.start()
            self._waiting.append(item)
            self._wake.notify()

    def stop(self) -> None:
        """Stop the worker after its current step; rows still queued or running are cancelled."""
        with self._wake:
            self._stopped = True
            self._wake.notify()

    def _joining(self, batch: RunningBatch) -> list[_Waiting]:
        """The waiting rows that join now (called with the lock held; blocks while idle)."""
        while not self._waiting and not len(batch) and not self._stopped:
            self._wake.wait()
        if not len(batch) and self.wait_s > 0:  # idle: let rows arriving together join together
            deadline = time.monotonic() + self.wait_s
            while len(self._waiting) < self.max_batch_size and not self._stopped:
                left = deadline - time.monotonic()
                if left <= 0 or not self._wake.wait(left):
                    break
        joining: list[_Waiting] = []
        while self._waiting and batch.joinable and len(batch) + len(joining) < self.max_batch_size:
            item = self._waiting.popleft()
            if item.request.cancelled is not None and item.request.cancelled():
                item.deliver(GenerationCancelled("the request was cancelled before it started"))
            else:
                joining.append(item)
        return joining

    def _work(self) -> None:
        batch = self.make_batch()
        while True:
            with self._wake:
                if self._stopped:
                    break
                joining = self._joining(batch)
            self._running.update((id(item.request), item) for item in joining)
            finished: list[tuple[DecodeRequest, GenerationResult | Exception]] = []
            try:
                finished += batch.add([item.request for item in joining])
                if len(batch):
                    finished += batch.step()
            except Exception as exc:  # a failure of the whole step: every running row gets it
                log.exception("decode step failed; %d rows end with the error", len(batch))
                finished += [(req, exc) for req, _ in batch.close()]
                batch = self.make_batch()
            for req, result in finished:
                self._running.pop(id(req)).deliver(result)
        stopped = GenerationCancelled("the service is stopping")
        for req, _ in batch.close():
            self._running.pop(id(req)).deliver(stopped)
        while self._waiting:
            self._waiting.popleft().deliver(stopped)


def _resolve(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)
