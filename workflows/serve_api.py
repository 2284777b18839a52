"""Request and response bodies of the serving API, their hard limits, and the error format.

Every request body is a pydantic model with ``extra="forbid"`` (an unknown field is a 422 that
names it), except the OpenAI-compatible one, which ignores the OpenAI fields it does not use.
Field bounds here are hard caps; :class:`Limits` (from the serving config) may lower the caps on
prompt length, ``max_new_tokens`` and the number of align texts, checked by :func:`check_limits`.

Errors, for every endpoint, use the OpenAI error shape so that OpenAI clients read them::

    {"error": {"message": "max_new_tokens: Input should be ...", "type": "invalid_request_error",
               "param": "max_new_tokens", "code": 422}}
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from ops.errors import SaealignError
from ops.steering import engine
from ops.steering.engine import SCORED_METHODS
from ops.steering.generation import MAX_NEW_TOKENS_LIMIT
from workflows._config import field_docs

Method = Literal["orig", "sae", "clamp", "swap", "weight"]

MAX_PROMPT_CHARS = 8000
"""Hard cap on a prompt's length in characters (the config may lower it)."""
MAX_ALIGN_TEXTS = 500
"""Hard cap on the align texts of one POST /topics (the config may lower it)."""
MAX_ALIGN_TEXT_CHARS = 4000
"""Hard cap on the length of one align text."""
TOPIC_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


@dataclass(frozen=True)
class Limits:
    """Per-deployment request limits (each at most the matching hard cap)."""

    max_prompt_chars: int = 2000
    max_prompt_tokens: int = 512
    max_new_tokens: int = 256
    max_align_texts: int = 200


class RequestLimitError(ValueError):
    """A request over a deployment limit; ``field`` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


OPTION_CAPS: dict[str, dict[str, float]] = {
    "clamp_k": {"ge": 1, "le": 4096},
    "clamp_factor": {"ge": 0, "le": 1e4},
    "strength": {"ge": 0, "le": 100},
}
"""The service's hard caps on steering options (the options are declared once, in
``ops.steering.engine.SteeringOptions``; this body is built from that dataclass)."""


def body_of(options: type, caps: dict[str, dict[str, float]]) -> type[BaseModel]:
    """A request body (pydantic, unknown fields forbidden) with the fields of the config dataclass
    ``options``: same names, types, defaults and docstrings, bounded by ``caps``; the dataclass's own
    checks run on every body."""
    hints, docs = typing.get_type_hints(options), field_docs(options)
    body_fields: dict[str, Any] = {
        f.name: (hints[f.name], Field(f.default, description=docs.get(f.name), **caps.get(f.name, {})))  # type: ignore[call-overload]
        for f in dataclasses.fields(options)
    }

    def check(body: BaseModel) -> BaseModel:
        try:
            options(**body.model_dump())
        except SaealignError as exc:
            raise ValueError(str(exc)) from exc
        return body

    validators: dict[str, Any] = {"check": model_validator(mode="after")(check)}
    return create_model(  # type: ignore[call-overload, no-any-return]
        options.__name__,
        __config__=ConfigDict(extra="forbid"),
        __doc__=options.__doc__,
        __validators__=validators,
        **body_fields,
    )


class SteeringOptions(body_of(engine.SteeringOptions, OPTION_CAPS)):  # type: ignore[misc]
    """The ``options`` of a request: :class:`ops.steering.engine.SteeringOptions` as a body (docs/algorithms.md §3)."""

    def settings(self) -> engine.SteeringOptions:
        """The engine's options."""
        return engine.SteeringOptions(**self.model_dump())


class _Sampling(BaseModel):
    """Prompt, topic and sampling fields shared by /generate, /generate/stream and /compare."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="Text to continue.")
    topic: str | None = Field(default=None, pattern=TOPIC_PATTERN, description="Scored topic (GET /topics lists them).")
    max_new_tokens: int = Field(default=32, ge=1, le=MAX_NEW_TOKENS_LIMIT, description="Tokens to generate.")
    temperature: float = Field(default=1.0, gt=0, le=100, description="Sampling temperature.")
    top_k: int = Field(default=5, ge=0, le=1_000_000, description="Sample among the k most likely tokens (0 = all).")
    greedy: bool = Field(default=False, description="Take the most likely token instead of sampling.")
    ignore_eos: bool = Field(default=False, description="Always generate max_new_tokens (do not stop at end of text).")
    seed: int = Field(default=0, ge=0, le=2**63 - 1, description="Sampling seed (same seed, same output).")
    options: SteeringOptions = SteeringOptions()

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the prompt is blank")
        return value

    @field_validator("temperature")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be finite")
        return value


class GenerateRequest(_Sampling):
    """POST /generate and /generate/stream."""

    method: Method = Field(default="swap", description="orig, sae, clamp, swap or weight.")

    @model_validator(mode="after")
    def _topic_for_scored(self) -> GenerateRequest:
        if self.method in SCORED_METHODS and not self.topic:
            raise ValueError(f"topic: method '{self.method}' needs a topic")
        if self.options.strength != 1.0 and self.method not in ("swap", "weight"):
            raise ValueError(f"options.strength: applies to swap and weight only, not '{self.method}'")
        return self


class CompareRequest(_Sampling):
    """POST /compare: the prompt under ``orig`` and each of ``methods``, same seed."""

    methods: list[Method] = Field(default=["swap"], max_length=8, description="Methods besides orig.")

    @model_validator(mode="after")
    def _topic_for_scored(self) -> CompareRequest:
        scored = [m for m in self.methods if m in SCORED_METHODS]
        if scored and not self.topic:
            raise ValueError(f"topic: method '{scored[0]}' needs a topic")
        return self

    def all_methods(self) -> list[str]:
        return ["orig", *[m for m in dict.fromkeys(self.methods) if m != "orig"]]


class TopicRequest(BaseModel):
    """POST /topics: score a new topic from align texts."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=TOPIC_PATTERN, description="New topic name (letters, digits, '.', '_', '-').")
    texts: list[str] = Field(min_length=1, max_length=MAX_ALIGN_TEXTS, description="Align texts (P_align).")
    min_support: int = Field(default=20, ge=0, le=10**9, description="Latents firing on fewer prompts get no score.")
    distance_power: Literal[1, 2] = 1
    top: int = Field(default=20, ge=1, le=1000, description="Top latents returned.")

    @field_validator("texts")
    @classmethod
    def _texts(cls, texts: list[str]) -> list[str]:
        kept = [t.strip() for t in texts if t.strip()]
        if not kept:
            raise ValueError("every align text is blank")
        if any(len(t) > MAX_ALIGN_TEXT_CHARS for t in kept):
            raise ValueError(f"an align text is longer than {MAX_ALIGN_TEXT_CHARS} characters")
        return kept


class OpenAIRequest(BaseModel):
    """Fields shared by the OpenAI-compatible requests, with saealign's steering fields as extras
    (OpenAI clients send them with ``extra_body={...}``).

    ``temperature`` 0 means greedy. ``top_p`` other than 1, ``n`` other than 1, ``best_of``,
    ``echo`` and ``logprobs`` are not supported (422). Unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int = Field(default=16, ge=1, le=MAX_NEW_TOKENS_LIMIT)
    temperature: float = Field(default=1.0, ge=0, le=100)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    echo: bool = False
    logprobs: int | bool | None = None
    best_of: int | None = None
    user: str | None = None
    # saealign extras
    topic: str | None = Field(default=None, pattern=TOPIC_PATTERN)
    method: Method = "orig"
    top_k: int = Field(default=5, ge=0, le=1_000_000)
    options: SteeringOptions = SteeringOptions()

    @model_validator(mode="after")
    def _supported(self) -> OpenAIRequest:
        if self.top_p != 1.0:
            raise ValueError("top_p: not supported; use top_k")
        if self.echo or self.logprobs not in (None, False) or self.best_of not in (None, 1):
            raise ValueError("echo: echo, logprobs and best_of are not supported")
        if self.method in SCORED_METHODS and not self.topic:
            raise ValueError(f"topic: method '{self.method}' needs a topic")
        return self

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [s for s in ([self.stop] if isinstance(self.stop, str) else self.stop) if s]

    def as_generate(self, prompt: str) -> GenerateRequest:
        """The equivalent /generate request for ``prompt`` (validated again, so its limits apply)."""
        return GenerateRequest(
            prompt=prompt,
            topic=self.topic,
            method=self.method,
            max_new_tokens=self.max_tokens,
            temperature=self.temperature if self.temperature > 0 else 1.0,
            greedy=self.temperature == 0,
            top_k=self.top_k,
            seed=self.seed or 0,
            ignore_eos=False,
            options=self.options,
        )


class CompletionRequest(OpenAIRequest):
    """POST /v1/completions (OpenAI legacy completions)."""

    prompt: str | list[str] = Field(description="One prompt (a list of exactly one is accepted).")

    @model_validator(mode="after")
    def _one_prompt(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise ValueError("prompt: give one prompt (a string or a list of one string)")
        return self

    def prompt_text(self) -> str:
        return self.prompt[0] if isinstance(self.prompt, list) else self.prompt


class ChatMessage(BaseModel):
    """One message of a conversation (text content only)."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)


class ChatCompletionRequest(OpenAIRequest):
    """POST /v1/chat/completions: the conversation goes through the model's chat template (with
    the assistant's turn opened), then is continued like a completion prompt."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=64)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS_LIMIT)

    @model_validator(mode="after")
    def _tokens(self) -> ChatCompletionRequest:
        if self.max_completion_tokens is not None:  # the newer name of max_tokens
            self.max_tokens = self.max_completion_tokens
        return self


# ---------------------------------------------------------------------------------------------
# Responses (documented shapes; the handlers return plain dicts of these)


# ---------------------------------------------------------------------------------------------
# Limits and errors


def check_limits(req: _Sampling | TopicRequest, limits: Limits) -> None:
    """Raise :class:`RequestLimitError` where ``req`` exceeds this deployment's limits."""
    if isinstance(req, TopicRequest):
        if len(req.texts) > limits.max_align_texts:
            raise RequestLimitError("texts", f"at most {limits.max_align_texts} align texts, got {len(req.texts)}")
        return
    if len(req.prompt) > limits.max_prompt_chars:
        raise RequestLimitError("prompt", f"at most {limits.max_prompt_chars} characters, got {len(req.prompt)}")
    if req.max_new_tokens > limits.max_new_tokens:
        raise RequestLimitError("max_new_tokens", f"at most {limits.max_new_tokens}, got {req.max_new_tokens}")


def error_body(message: str, status: int, param: str | None = None, kind: str | None = None) -> dict[str, Any]:
    """The error JSON (OpenAI shape)."""
    if kind is None:
        kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def validation_error_body(errors: list[Any], status: int = 422) -> dict[str, Any]:
    """Error JSON for pydantic/FastAPI validation errors: the first error's field and message,
    with every error under ``detail``."""
    detail = []
    for err in errors:
        loc = [] if err.get("type") == "json_invalid" else [str(p) for p in err.get("loc", ()) if p != "body"]
        msg = str(err.get("msg", "invalid"))
        field = ".".join(loc)
        # errors raised by model validators carry "<field>: <message>" in the message
        ctx_error = (err.get("ctx") or {}).get("error")
        text = str(ctx_error) if ctx_error is not None else msg.removeprefix("Value error, ")
        if not field and ":" in text and " " not in text.split(":", 1)[0]:
            field, text = (s.strip() for s in text.split(":", 1))
        detail.append({"field": field or None, "message": text, "type": err.get("type")})
    first = detail[0] if detail else {"field": None, "message": "invalid request"}
    if errors and errors[0].get("type") == "json_invalid":
        message = f"malformed JSON: {first['message']}"
        body = error_body(message, 400, None)
    else:
        where = f"{first['field']}: " if first["field"] else ""
        body = error_body(f"{where}{first['message']}", status, first["field"])
    body["detail"] = detail
    return body
