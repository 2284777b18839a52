from __future__ import annotations

from dataclasses import dataclass
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
