"""The service's request bodies: built from the options declared in ops, bounded, strict."""

from __future__ import annotations

import dataclasses

import pydantic
import pytest

from ops.steering.engine import SteeringOptions as EngineOptions
from workflows._config import field_docs
from workflows.serve_api import GenerateRequest, SteeringOptions


def test_steering_options_body_mirrors_the_engine_dataclass() -> None:
    schema = SteeringOptions.model_json_schema()["properties"]
    docs = field_docs(EngineOptions)
    for f in dataclasses.fields(EngineOptions):
        assert schema[f.name]["default"] == f.default
        assert schema[f.name]["description"] == docs[f.name]
    assert set(schema) == {f.name for f in dataclasses.fields(EngineOptions)}
    assert SteeringOptions(clamp_k=3, keep_error=True).settings() == EngineOptions(clamp_k=3, keep_error=True)


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"clamp_k": 0}, "clamp_k"),
        ({"clamp_k": 10**6}, "clamp_k"),
        ({"unknown": 1}, "unknown"),
        ({"clamp_mode": "x"}, "clamp_mode"),
        ({"strength": -1}, "strength"),
    ],
)
def test_bad_steering_options_name_the_field(options: dict[str, object], param: str) -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        GenerateRequest(prompt="a", method="swap", topic="t", options=options)  # type: ignore[arg-type]
    assert info.value.errors()[0]["loc"] == ("options", param)


def test_a_full_queue_refuses_whole_requests_until_rows_drain() -> None:
    import asyncio
    import threading

    from ops.steering.engine import SteeringSpec
    from ops.steering.generation import SamplingParams
    from workflows.serve_engine import Batcher, Row, ServiceBusyError

    release, ran = threading.Event(), []

    def run(rows: list[Row]) -> list[Exception]:
        release.wait(10)
        ran.extend(r.prompt for r in rows)
        return [RuntimeError(r.prompt) for r in rows]

    def row(prompt: str) -> Row:
        return Row(prompt, SteeringSpec("orig"), SamplingParams(max_new_tokens=1), 0)

    async def scenario() -> None:
        batcher = Batcher(run, max_batch_size=1, wait_s=0.0, max_queued=2)
        running = asyncio.ensure_future(batcher.submit(row("a")))
        await asyncio.sleep(0.1)  # "a" is the running batch, the queue is empty
        batcher.admit(2)
        queued = [asyncio.ensure_future(batcher.submit(row(p))) for p in ("b", "c")]
        await asyncio.sleep(0)
        with pytest.raises(ServiceBusyError, match="2 rows queued, at most 2"):
            batcher.admit(1)
        release.set()
        results = await asyncio.gather(running, *queued)
        assert [str(r) for r in results] == ["a", "b", "c"]
        batcher.admit(2)  # drained: room again

    asyncio.run(scenario())
    assert ran == ["a", "b", "c"]


def test_busy_is_http_429_with_retry_after_in_the_error_envelope() -> None:
    import asyncio
    import json

    from workflows import serve
    from workflows.serve_engine import ServiceBusyError

    resp = asyncio.run(serve._on_saealign(None, ServiceBusyError("the service is busy")))  # type: ignore[arg-type]
    assert resp.status_code == 429 and resp.headers["Retry-After"] == str(ServiceBusyError.retry_after_s)
    assert json.loads(bytes(resp.body))["error"]["code"] == 429
