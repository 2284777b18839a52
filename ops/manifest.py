"""Manifests: every dataset or artifact written records what made it."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

_PACKAGES = (
    "saealign",
    "torch",
    "transformers",
    "transformer-lens",
    "sae-lens",
    "sentence-transformers",
    "ray",
    "pyarrow",
    "duckdb",
    "numpy",
)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_revision() -> str:
    """The checkout's commit (with ``+dirty`` when it has uncommitted changes), or 'unknown'."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def base_manifest(kind: str, config: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": kind,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config,
        "versions": package_versions(),
        "git_revision": git_revision(),
        "host": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON to a local ``path`` with the lake's atomic writer."""
    from pyarrow import fs as pafs

    from ops.lake.contract import json_bytes, write_atomic

    write_atomic(pafs.LocalFileSystem(), str(Path(path).resolve()), lambda sink: sink.write(json_bytes(payload)))
