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
