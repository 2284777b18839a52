from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from workflows._config import build_parser, field_docs, parse_config
from workflows.cli import JOBS, main


def test_help_lists_every_job(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for job in (
        "demo",
        "train-sae",
        "build-lake",
        "score",
        "query",
        "generate",
        "serve",
        "submit",
        "align-sae",
        "evaluate",
    ):
        assert job in JOBS and f"  {job}" in out


def test_unknown_job_exits_nonzero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["no-such-job"]) == 2
    assert "unknown job 'no-such-job'" in capsys.readouterr().err


@dataclass(frozen=True)
class _Cfg:
    """A config for the test."""

    name: str = "x"
    """The name."""
    count: int = 3
    """How many."""
    mode: Literal["a", "b"] = "a"
    """Which mode."""
    items: tuple[str, ...] = ("p",)
    """Some items."""
    flag: bool = False
    """A switch."""


def test_config_cli_uses_field_docstrings_and_types() -> None:
    assert field_docs(_Cfg)["count"] == "How many."
    assert "The name." in build_parser(_Cfg, "t").format_help()
    cfg = parse_config(_Cfg, ["--count", "5", "--mode", "b", "--items", "q", "r", "--flag"], "t")
    assert cfg == _Cfg(name="x", count=5, mode="b", items=("q", "r"), flag=True)
    with pytest.raises(SystemExit):
        parse_config(_Cfg, ["--mode", "c"], "t")


@pytest.mark.parametrize("job", sorted(JOBS))
def test_every_job_prints_its_help(job: str, capsys: pytest.CaptureFixture[str]) -> None:
    # argparse %-formats help strings: a docstring with a bare "%" once crashed --help
    with pytest.raises(SystemExit) as exit_info:
        main([job, "--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


@dataclass(frozen=True)
class _Inner:
    depth: int = 2
    """How deep."""
    greedy: bool = False
    """Take the best."""


@dataclass(frozen=True)
class _Outer:
    name: str = "x"
    """The name."""
    inner: _Inner = field(default_factory=_Inner)
    """Nested options."""


@dataclass(frozen=True)
class _Clash:
    depth: int = 1
    """Declared here and in _Inner."""
    inner: _Inner = field(default_factory=_Inner)


def test_nested_config_options_are_flattened_and_rebuilt() -> None:
    help_text = build_parser(_Outer, "t").format_help()
    assert "--depth" in help_text and "How deep." in help_text and "--inner" not in help_text
    assert parse_config(_Outer, [], "t") == _Outer()
    cfg = parse_config(_Outer, ["--depth", "7", "--greedy", "--name", "y"], "t")
    assert cfg == _Outer(name="y", inner=_Inner(depth=7, greedy=True))


def test_an_option_declared_twice_is_refused() -> None:
    with pytest.raises(TypeError, match="'depth' declared twice"):
        build_parser(_Clash, "t")


def test_jobs_take_the_options_declared_in_ops() -> None:
    from ops.alignsae.training import AlignTrainConfig
    from ops.steering.engine import SteeringOptions
    from ops.steering.generation import SamplingParams
    from workflows.align_sae import AlignSAEConfig
    from workflows.generate import GenerateConfig

    gen = parse_config(GenerateConfig, ["--topic", "m", "--clamp-k", "9", "--top-k", "3", "--no-stop-at-eos"], "t")
    assert gen.steering == SteeringOptions(clamp_k=9)
    assert gen.sampling == SamplingParams(top_k=3, stop_at_eos=False)
    align = parse_config(AlignSAEConfig, ["--stage2-steps", "5", "--seed", "4"], "t")
    assert align.train == AlignTrainConfig(stage2_steps=5) and align.seed == 4
