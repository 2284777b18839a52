"""``saealign serve``: the aligned-generation service (Ray Serve + FastAPI) and its web page.

One deployment, :class:`SaealignService`, loads the LM, the SAE and every scored topic of a lake
dataset once per replica (:class:`workflows.serve_engine.Engine`), and answers:

=============================  ================================================================
``GET /``                      the web page (``workflows/static``: plain HTML + JS, no build step)
``POST /generate``             one steered continuation with per-token contamination
``POST /generate/stream``      the same as server-sent events, one ``token`` event per new token
``POST /compare``              the prompt under ``orig`` and each requested method, same seed
``GET /topics``                the scored topics; ``GET /topics/{name}`` one with its top latents
``POST /topics``               score a new topic from texts (DuckDB scoring, stored in the lake)
``POST /v1/completions``       OpenAI legacy completions (``topic``, ``method``, ``options`` extra)
``POST /v1/chat/completions``  OpenAI chat (the model's chat template), the same extra fields
``GET /v1/models``             the served model, with the methods, topics and options a request may use
``GET /healthz``               liveness and what is loaded
=============================  ================================================================

Concurrent generation requests are scheduled by :class:`workflows.serve_engine.Scheduler` at the
level of decode steps (iteration-level scheduling): one worker thread per replica drives a
:class:`ops.steering.generation.RunningBatch`; between two steps, waiting rows join it (their
prompts prefilled, their KV caches merged) and finished rows leave, so a short request arriving
while a long one decodes starts at once and ends first. Each row carries its own steering spec
(topic scores, method, options), sampling parameters and seed, and its output equals what the
same request gives alone (tested). Streamed rows join the same batch; their tokens are sent as
soon as they are sampled, with the contamination of the step that produced them. A client that
goes away (closed stream, cancelled request) takes its row out of the batch at the next step.

Run it: ``saealign serve --lake out/demo/lake`` (binds 127.0.0.1:8000), or
``serve run cluster/serve.yaml`` (``import_path: workflows.serve:app`` with typed ``args``).
"""

# No ``from __future__ import annotations`` here: Ray Serve reads the app builder's parameter
# annotation as a class (a string would skip its pydantic validation), and FastAPI reads the
# handlers' body types.

import asyncio
import dataclasses
import json
import logging
import signal
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any, get_args

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from pydantic import RootModel
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException as StarletteHTTPException

from ops.errors import SaealignError, TopicExistsError
from ops.lake.contract import Lake
from ops.scoring.scores import resolve_dataset
from ops.steering.generation import DecodeRequest, GenerationCancelled
from workflows._config import parse_config
from workflows.serve_api import (
    ChatCompletionRequest,
    CompareRequest,
    CompletionRequest,
    GenerateRequest,
    Method,
    OpenAIRequest,
    RequestLimitError,
    SteeringOptions,
    TopicRequest,
    check_limits,
    error_body,
    validation_error_body,
)
from workflows.serve_engine import (
    Engine,
    Scheduler,
    ServeConfig,
    ServiceBusyError,
    UnknownTopicError,
    result_dict,
)

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css"}


class ServeArgs(RootModel[ServeConfig]):
    """Typed arguments of the app builder (``args:`` in cluster/serve.yaml): ServeConfig's fields."""


# ---------------------------------------------------------------------------------------------
# HTTP


api = FastAPI(title="saealign", description="Steered generation with SAE topic alignment.", version="0.1.0")


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param), status_code=status)


@api.exception_handler(RequestValidationError)
async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    body = validation_error_body(list(exc.errors()))
    return JSONResponse(body, status_code=body["error"]["code"])


@api.exception_handler(StarletteHTTPException)
async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own errors (a body that cannot be decoded, an unknown path, a wrong method) in
    the same error shape as every other error."""
    return _error(exc.status_code, str(exc.detail), None)


@api.exception_handler(RequestLimitError)
async def _on_limit(request: Request, exc: RequestLimitError) -> JSONResponse:
    return _error(422, str(exc), exc.field)


@api.exception_handler(SaealignError)
async def _on_saealign(request: Request, exc: SaealignError) -> JSONResponse:
    if isinstance(exc, UnknownTopicError):
        return _error(404, str(exc), "topic")
    if isinstance(exc, TopicExistsError):
        return _error(409, str(exc), "name")
    if isinstance(exc, ServiceBusyError):
        resp = _error(429, str(exc))
        resp.headers["Retry-After"] = str(exc.retry_after_s)
        return resp
    return _error(400, str(exc))


@api.exception_handler(Exception)
async def _on_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("internal error on %s", request.url.path)
    return _error(500, f"internal error: {type(exc).__name__}: {exc}")


class _OpenAIShape:
    """How an OpenAI endpoint words its answer: ids, object names, a choice, a streamed delta."""

    prefix = object = chunk_object = ""

    def choice(self, text: str, finish: str) -> dict[str, Any]:
        raise NotImplementedError

    def delta(self, piece: str, finish: str | None, first: bool) -> dict[str, Any]:
        raise NotImplementedError


class _TextCompletion(_OpenAIShape):
    prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"

    def choice(self, text: str, finish: str) -> dict[str, Any]:
        return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}

    def delta(self, piece: str, finish: str | None, first: bool) -> dict[str, Any]:
        return self.choice(piece, finish)  # type: ignore[arg-type]


class _ChatCompletion(_OpenAIShape):
    prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def choice(self, text: str, finish: str) -> dict[str, Any]:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}

    def delta(self, piece: str, finish: str | None, first: bool) -> dict[str, Any]:
        delta: dict[str, Any] = {"content": piece} if piece else {}
        if first:
            delta["role"] = "assistant"
        return {"index": 0, "delta": delta, "finish_reason": finish}


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def _apply_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@serve.deployment
@serve.ingress(api)
class SaealignService:
    """The Ray Serve deployment: one :class:`Engine` per replica behind the FastAPI routes."""

    def __init__(self, cfg: ServeConfig) -> None:
        logging.basicConfig(level=logging.INFO)
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        self.cfg = cfg
        self.engine = Engine(cfg)
        self.replica = uuid.uuid4().hex[:8]
        if cfg.warmup:
            self.engine.warm_up()
        self._streams: set[asyncio.Task[None]] = set()
        self.scheduler = Scheduler(
            self.engine.running_batch, cfg.max_batch_size, cfg.batch_wait_timeout_s, cfg.max_queued_rows
        )

    def __del__(self) -> None:
        scheduler = getattr(self, "scheduler", None)
        if scheduler is not None:
            scheduler.stop()

    # -- scheduling -----------------------------------------------------------------------------

    async def _run(self, row: DecodeRequest, started: float) -> dict[str, Any]:
        res = await self.scheduler.submit(row)
        if isinstance(res, Exception):
            raise res
        queue_s = max(0.0, time.perf_counter() - row.queued_at - res.timings["total_s"])
        return result_dict(res, row, started, {"queue_s": queue_s})

    async def _rows(self, req: GenerateRequest | CompareRequest, methods: Sequence[str]) -> list[DecodeRequest]:
        if req.topic and req.topic not in self.engine.topics:
            await asyncio.to_thread(self.engine.topic, req.topic)  # loads it, or 404
        rows = self.engine.rows(req, methods)
        self.scheduler.admit(len(rows))  # or 429: the queue is full
        return rows

    # -- routes ---------------------------------------------------------------------------------

    @api.get("/", response_class=HTMLResponse)
    async def index(self) -> HTMLResponse:
        return HTMLResponse((STATIC_DIR / "index.html").read_text())

    @api.get("/static/{name}")
    async def static(self, name: str) -> Any:
        if name not in STATIC_FILES:
            return _error(404, f"no static file '{name}'")
        return FileResponse(STATIC_DIR / name, media_type=STATIC_FILES[name])

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        e = self.engine
        return {
            "status": "ok",
            "replica": self.replica,
            "model": e.key.model,
            "sae": e.sae_spec,
            "hook": e.hook,
            "dataset": e.dataset,
            "d_sae": e.d_sae,
            "topics": sorted(e.topics),
            "load_s": e.load_s,
            "limits": dataclasses.asdict(e.limits),
            "batching": {
                "max_batch_size": self.cfg.max_batch_size,
                "wait_s": self.cfg.batch_wait_timeout_s,
                "max_queued_rows": self.cfg.max_queued_rows,
                "running_rows": self.scheduler.running,
                "queued_rows": self.scheduler.queued,
            },
        }

    @api.post("/generate")
    async def generate_one(self, req: GenerateRequest) -> dict[str, Any]:
        started = time.perf_counter()
        (row,) = await self._rows(req, [req.method])
        return await self._run(row, started)

    @api.post("/compare")
    async def compare(self, req: CompareRequest) -> dict[str, Any]:
        started = time.perf_counter()
        rows = await self._rows(req, req.all_methods())
        results = await asyncio.gather(*(self._run(r, started) for r in rows))
        return {"prompt": req.prompt, "topic": req.topic, "seed": req.seed, "results": list(results)}

    @api.post("/generate/stream")
    async def generate_stream(self, req: GenerateRequest) -> StreamingResponse:
        started = time.perf_counter()
        (row,) = await self._rows(req, [req.method])

        async def events() -> AsyncIterator[str]:
            async with aclosing(self._stream(row)) as stream:
                async for kind, payload in stream:
                    if kind == "token":
                        yield _sse("token", payload)
                    elif kind == "done":
                        yield _sse("done", result_dict(payload, row, started))
                    else:
                        yield _sse("error", payload)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _stream(self, row: DecodeRequest) -> AsyncGenerator[tuple[str, Any], None]:
        """('token', event)… then ('done', GenerationResult) or ('error', error body): the row runs
        in the scheduler's batch; leaving early (client gone) takes it out at the next step."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancelled = threading.Event()

        def put(item: tuple[str, Any]) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        async def run() -> None:
            res = await self.scheduler.submit(row, self.engine.token_reporter(lambda ev: put(("token", ev))), cancelled)
            if isinstance(res, GenerationCancelled):
                put(("error", error_body("cancelled", 499)))
            elif isinstance(res, SaealignError):
                put(("error", error_body(str(res), 400)))
            elif isinstance(res, Exception):
                log.error("streaming generation failed: %s: %s", type(res).__name__, res)
                put(("error", error_body(f"internal error: {type(res).__name__}: {res}", 500)))
            else:
                put(("done", res))

        task = asyncio.ensure_future(run())
        self._streams.add(task)  # a reference until it ends (the event loop keeps only weak ones)
        task.add_done_callback(self._streams.discard)
        try:
            while True:
                kind, payload = await queue.get()
                yield kind, payload
                if kind != "token":
                    break
        finally:
            cancelled.set()  # the row leaves the batch at its next step

    @api.get("/topics")
    async def topics(self) -> dict[str, Any]:
        return {"dataset": self.engine.dataset, "topics": await asyncio.to_thread(self.engine.topic_list)}

    @api.get("/topics/{name}")
    async def topic(self, name: str, top: int = 20) -> dict[str, Any]:
        if not 1 <= top <= 50:
            raise RequestLimitError("top", "must be in 1..50")
        return await asyncio.to_thread(self.engine.topic_info, name, top)

    @api.post("/topics", status_code=201)
    async def add_topic(self, req: TopicRequest) -> dict[str, Any]:
        check_limits(req, self.engine.limits)
        return await asyncio.to_thread(self.engine.add_topic, req)

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        """The served model, with what a request may add under ``extra_body``: ``saealign.methods``,
        ``saealign.topics`` (scored topic names) and ``saealign.options`` (the steering options'
        JSON schema: type, default, bounds, description)."""
        topics = await asyncio.to_thread(self.engine.topic_list)
        extras = {
            "methods": list(get_args(Method)),
            "topics": [t["topic"] for t in topics],
            "options": SteeringOptions.model_json_schema()["properties"],
        }
        model = {"id": self.engine.key.model, "object": "model", "created": 0, "owned_by": "saealign"}
        return {"object": "list", "data": [{**model, "saealign": extras}]}

    @api.post("/v1/completions")
    async def completions(self, req: CompletionRequest) -> Any:
        return await self._openai(req, req.prompt_text(), _TextCompletion())

    @api.post("/v1/chat/completions")
    async def chat_completions(self, req: ChatCompletionRequest) -> Any:
        prompt = self.engine.chat_prompt([m.model_dump() for m in req.messages])
        return await self._openai(req, prompt, _ChatCompletion())

    async def _openai(self, req: OpenAIRequest, prompt: str, shape: _OpenAIShape) -> Any:
        """One OpenAI-style request: the prompt steered as a /generate request, answered in
        ``shape`` (text or chat completion), streamed or whole."""
        started = time.perf_counter()
        greq = req.as_generate(prompt)
        (row,) = await self._rows(greq, [greq.method])
        base = {"id": f"{shape.prefix}-{uuid.uuid4().hex}", "object": shape.object, "created": int(time.time())}
        base["model"] = self.engine.key.model
        if req.stream:
            chunks = self._openai_chunks(row, req, {**base, "object": shape.chunk_object}, shape)
            return StreamingResponse(chunks, media_type="text/event-stream")
        res = await self._run(row, started)
        text, stopped = _apply_stop(res["text"], req.stops())
        finish = "stop" if stopped or res["finish_reason"] == "eos" else "length"
        n_prompt, n_out = len(res["prompt_token_ids"]), len(res["token_ids"])
        return {
            **base,
            "choices": [shape.choice(text, finish)],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out},
            "saealign": {k: res[k] for k in ("method", "topic", "tokens", "contamination", "latents_changed")}
            | {"mean_contamination": res["mean_contamination"], "timings": res["timings"]},
        }

    async def _openai_chunks(
        self, row: DecodeRequest, req: OpenAIRequest, base: dict[str, Any], shape: _OpenAIShape
    ) -> AsyncIterator[str]:
        """OpenAI streaming: ``data: {chunk}`` per token, a last chunk with the finish reason, ``[DONE]``."""
        stops, text, finish = req.stops(), "", "length"

        def chunk(piece: str, reason: str | None, extra: dict[str, Any] | None = None) -> str:
            choice = shape.delta(piece, reason, first=not text and reason is None)
            return f"data: {json.dumps({**base, 'choices': [choice], **(extra or {})})}\n\n"

        async with aclosing(self._stream(row)) as stream:
            async for kind, payload in stream:
                if kind == "error":
                    yield f"data: {json.dumps(payload)}\n\n"
                    break
                if kind == "done":
                    finish = "stop" if payload.finish_reason == "eos" else "length"
                    break
                cut, stopped = _apply_stop(text + payload["text"], stops)
                piece = cut[len(text) :]
                if piece:
                    yield chunk(piece, None, {"saealign": {"contamination": payload["contamination"]}})
                text = cut
                if stopped:
                    finish = "stop"
                    break
        yield chunk("", finish)
        yield "data: [DONE]\n\n"

    def check_health(self) -> None:
        """Ray Serve's replica health check."""
        if self.engine.model is None:
            raise RuntimeError("model not loaded")


# ---------------------------------------------------------------------------------------------
# Builders and the CLI


def build_app(cfg: ServeConfig) -> Application:
    """The Serve application for ``cfg`` (replicas, concurrency and CPUs from it). A relative
    local lake path is made absolute here, where the builder runs (e.g. where `serve run` is)."""
    if "://" not in cfg.lake:
        cfg = dataclasses.replace(cfg, lake=str(Path(cfg.lake).expanduser().resolve()))
    return SaealignService.options(  # type: ignore[attr-defined]
        num_replicas=cfg.replicas,
        max_ongoing_requests=cfg.max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica},
    ).bind(cfg)


def app(args: ServeArgs) -> Application:
    """App builder for ``import_path: workflows.serve:app`` (``args`` = ServeConfig's fields)."""
    if isinstance(args, dict):  # called directly with a plain dict
        args = ServeArgs.model_validate(args)
    return build_app(args.root)


def main(argv: list[str] | None = None) -> int:
    import ray

    cfg = parse_config(ServeConfig, argv, "saealign serve")
    resolve_dataset(Lake(cfg.lake), cfg.dataset)  # fail fast, before starting Ray
    ray.init(**({"address": cfg.address} if cfg.address else {"include_dashboard": False}))
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)  # a TERM stops it as Ctrl-C does
    try:
        serve.run(build_app(cfg), name="saealign", route_prefix="/")
        print(f"saealign serving on http://{cfg.host}:{cfg.port}/  (Ctrl-C to stop)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        serve.shutdown()
        ray.shutdown()  # stops the local Ray this command started, with every process of it
    return 0


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
