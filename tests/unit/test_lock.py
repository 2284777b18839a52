"""The environment the suite runs in is exactly requirements.lock (what `make test` installs)."""

from __future__ import annotations

import os
import re
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest

LOCK = Path(__file__).resolve().parents[2] / "requirements.lock"
PROJECT = "saealign"

pytestmark = pytest.mark.skipif(
    os.environ.get("SAEALIGN_UNLOCKED") == "1", reason="make test-latest runs the newest releases, not the lock"
)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked() -> dict[str, str]:
    pins = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", LOCK.read_text(), flags=re.MULTILINE)
    return {_norm(name): version for name, version in pins}


def installed() -> dict[str, str]:
    """What `pip list` shows for the running venv: its site-packages only (other tests may put
    folders of their own on sys.path)."""
    paths = sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})
    found = {_norm(d.metadata["Name"]): d.version for d in metadata.distributions(path=paths)}
    found.pop(PROJECT, None)
    return found


def test_lock_pins_every_package_once_with_hashes() -> None:
    text = LOCK.read_text()
    pins = re.findall(r"^[A-Za-z0-9][A-Za-z0-9._-]*==", text, flags=re.MULTILINE)
    assert len(pins) == len(locked()), "a package is pinned twice"
    assert text.count("==") == len(pins) and len(re.findall(r"--hash=sha256:", text)) >= len(pins)
    assert locked()["torch"].endswith("+cpu")


def test_installed_packages_equal_the_lock() -> None:
    lock, env = locked(), installed()
    missing = {n: v for n, v in lock.items() if env.get(n) != v}
    extra = {n: v for n, v in env.items() if n not in lock}
    assert not missing and not extra, (
        f"environment differs from {LOCK.name}: not as locked {missing}, not in the lock {extra}; "
        "fix: `make clean && make install` (or `make lock` after changing pyproject.toml)"
    )
