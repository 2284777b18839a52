"""Where saealign keeps caches and where the package keeps its embedded data."""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
SQL_DIR = Path(__file__).resolve().parent / "sql"
"""Named SQL statements (``-- name: <name>`` sections) that the scoring and lake code run."""


def cache_dir() -> Path:
    """Root of the on-disk cache: ``$SAEALIGN_CACHE`` or ``~/.cache/saealign``."""
    root = os.environ.get("SAEALIGN_CACHE") or Path.home() / ".cache" / "saealign"
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path
