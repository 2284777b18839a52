"""build-lake on a local Ray: row sums, and kill-then-resume equals a clean run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import duckdb
import pytest
import ray

from ops.errors import SaealignError
from workflows.build_lake import BuildLakeConfig, build

POOL = "embedded:pool#:64"


@pytest.fixture(scope="module")
def local_ray() -> Any:
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield
    ray.shutdown()


def _cfg(lake: Path, sae: Path, **kw: Any) -> BuildLakeConfig:
    return BuildLakeConfig(lake=str(lake), sae=str(sae), pool=(POOL,), shard_size=8, context=128, **kw)


def _tables(lake: Path) -> dict[str, list[tuple[Any, ...]]]:
    con = duckdb.connect()
    out = {}
    for name, cols in {
        "prompts": "prompt_id, text, n_tokens",
        "activations": "prompt_id, latent, value",
        "embeddings": "prompt_id, embedding",
    }.items():
        out[name] = con.sql(f"SELECT {cols} FROM read_parquet('{lake}/{name}/**/*.parquet') ORDER BY ALL").fetchall()
    return out


def test_clean_run_and_killed_run_agree(tmp_path: Path, random_sae_dir: Path, local_ray: Any) -> None:
    manifest = build(_cfg(tmp_path / "clean", random_sae_dir))
    assert manifest["rows"]["prompts"] == 64
    clean = _tables(tmp_path / "clean")
    sums = duckdb.sql(
        f"SELECT prompt_id, sum(value) s FROM read_parquet('{tmp_path}/clean/activations/**/*.parquet') GROUP BY 1"
    ).fetchall()
    assert len(sums) == 64 and all(abs(s - 1) <= 1e-5 for _, s in sums)

    killed = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "workflows.cli",
        "build-lake",
        "--lake",
        str(killed),
        "--sae",
        str(random_sae_dir),
        "--pool",
        POOL,
        "--shard-size",
        "8",
        "--context",
        "128",
    ]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not list(killed.glob("activations/**/part-*.parquet")):
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(killed.glob("embeddings/**/part-*.parquet")))
    assert done < 8, "the job finished before it was killed; the test did not test resumption"
    build(_cfg(killed, random_sae_dir))
    assert _tables(killed) == clean


def test_bad_input_leaves_the_lake_alone(tmp_path: Path, random_sae_dir: Path, local_ray: Any) -> None:
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(SaealignError, match="no non-empty text"):
        build(BuildLakeConfig(lake=str(tmp_path / "l"), sae=str(random_sae_dir), pool=(str(tmp_path / "empty.jsonl"),)))
    (tmp_path / "notext.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(SaealignError, match="no 'text' column"):
        build(
            BuildLakeConfig(lake=str(tmp_path / "l"), sae=str(random_sae_dir), pool=(str(tmp_path / "notext.jsonl"),))
        )
    assert not (tmp_path / "l").exists()
