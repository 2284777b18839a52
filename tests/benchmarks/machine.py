"""The machine and date a benchmark ran on, recorded beside its numbers, and the one way the
benchmarks write their JSON to ``docs/data/`` (from which ``make docs`` renders the docs)."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "docs" / "data"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    import torch

    return {
        "date": datetime.date.today().isoformat(),
        "cpu": _cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def revision() -> str | None:
    """The checkout's git commit, with ``+dirty`` when tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def command(module: str, argv: list[str] | None = None) -> str:
    """The command line that reproduces this run (``python -m <module> <args>``)."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python -m", module, *args])


def write_result(path: str | Path, module: str, payload: dict[str, Any], argv: list[str] | None = None) -> Path:
    """Write ``payload`` with a ``bench`` block (machine, date, revision, command) to ``path``.

    Keys of ``payload["bench"]`` (wall times, sources) join the block. The renderer
    (``render_docs.py``) reads ``bench``, and for any benchmark a ``config`` dict, a ``rows`` list of
    dicts and a ``ratios`` list of ``{"what", "value", "goal", "met"}``. NaN and infinities are
    written as ``null``, so the file is strict JSON.
    """
    out = Path(path)
    bench = {"machine": machine(), "revision": revision(), "command": command(module, argv)}
    bench.update(payload.pop("bench", {}))
    text = json.dumps(_finite(_plain({"bench": bench, **payload})), indent=1, allow_nan=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(f"numbers: {out}")
    return out


def _plain(obj: Any) -> Any:
    """``obj`` as JSON types: NumPy and torch scalars by value, anything else unknown as its ``str``."""
    return json.loads(json.dumps(obj, default=_default))


def _default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # NumPy arrays and scalars, torch tensors
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
