"""The service's request bodies: built from the options declared in ops, bounded, strict."""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

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


class _StepBatch:
    """A stand-in for RunningBatch: a row's result is its prompt, after ``max_new_tokens`` steps;
    ``gate`` (when given) must be set for each step to run."""

    def __init__(self, log: list[str], gate: threading.Event | None = None) -> None:
        self.rows: list[list[Any]] = []
        self.log, self.gate = log, gate
        self.joinable = True

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, requests: list[Any]) -> list[Any]:
        self.log += [f"join {r.prompt}" for r in requests]
        self.rows += [[r, r.params.max_new_tokens] for r in requests]
        return []

    def step(self) -> list[Any]:
        if self.gate is not None:
            self.gate.wait(10)
        done = []
        for row in list(self.rows):
            row[1] -= 1
            if row[1] == 0 or row[0].cancelled():
                self.rows.remove(row)
                done.append((row[0], RuntimeError(row[0].prompt)))
                self.log.append(f"leave {row[0].prompt}")
        return done

    def close(self) -> list[Any]:
        rows, self.rows = self.rows, []
        return [(r, RuntimeError("closed")) for r, _ in rows]


def _row(prompt: str, tokens: int = 1) -> Any:
    from ops.steering.engine import SteeringSpec
    from ops.steering.generation import DecodeRequest, SamplingParams

    return DecodeRequest(prompt, [1, 2], SteeringSpec("orig"), SamplingParams(max_new_tokens=tokens), 0)


def test_a_full_queue_refuses_whole_requests_until_rows_drain() -> None:
    import asyncio

    from workflows.serve_engine import Scheduler, ServiceBusyError

    gate, log = threading.Event(), []

    async def scenario() -> None:
        scheduler = Scheduler(lambda: _StepBatch(log, gate), max_batch_size=1, wait_s=0.0, max_queued=2)
        running = asyncio.ensure_future(scheduler.submit(_row("a")))
        await asyncio.sleep(0.2)  # "a" is running, the queue is empty
        scheduler.admit(2)
        queued = [asyncio.ensure_future(scheduler.submit(_row(p))) for p in ("b", "c")]
        await asyncio.sleep(0.1)
        with pytest.raises(ServiceBusyError, match="2 rows queued, at most 2"):
            scheduler.admit(1)
        gate.set()
        results = await asyncio.gather(running, *queued)
        assert [str(r) for r in results] == ["a", "b", "c"]
        scheduler.admit(2)  # drained: room again
        scheduler.stop()

    asyncio.run(scenario())
    assert log == ["join a", "leave a", "join b", "leave b", "join c", "leave c"]


def test_a_row_arriving_while_a_long_one_decodes_joins_at_the_next_step_and_leaves_first() -> None:
    import asyncio

    from workflows.serve_engine import Scheduler

    log: list[str] = []

    async def scenario() -> None:
        scheduler = Scheduler(lambda: _StepBatch(log, _Slow()), max_batch_size=4, wait_s=0.0)
        long = asyncio.ensure_future(scheduler.submit(_row("long", 50)))
        await asyncio.sleep(0.05)
        short = await scheduler.submit(_row("short", 2))
        assert str(short) == "short" and not long.done()
        gone = threading.Event()
        later = asyncio.ensure_future(scheduler.submit(_row("gone", 1000), cancelled=gone))
        await asyncio.sleep(0.05)
        gone.set()  # its client left: the row leaves at the next step
        assert str(await later) == "gone" and not long.done()
        assert str(await long) == "long"
        scheduler.stop()

    asyncio.run(scenario())
    assert log.index("join short") < log.index("leave short") < log.index("leave long")
    assert log.index("leave gone") < log.index("leave long")


class _Slow(threading.Event):
    """A gate that lets every step through after 10 ms (a decode step's stand-in)."""

    def wait(self, timeout: float | None = None) -> bool:
        time.sleep(0.01)
        return True


def test_busy_is_http_429_with_retry_after_in_the_error_envelope() -> None:
    import asyncio
    import json

    from workflows import serve
    from workflows.serve_engine import ServiceBusyError

    resp = asyncio.run(serve._on_saealign(None, ServiceBusyError("the service is busy")))  # type: ignore[arg-type]
    assert resp.status_code == 429 and resp.headers["Retry-After"] == str(ServiceBusyError.retry_after_s)
    assert json.loads(bytes(resp.body))["error"]["code"] == 429
