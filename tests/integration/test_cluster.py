"""``saealign submit``/``jobs`` against a real local Ray cluster (``ray start --head``), and fault
tolerance when a worker node dies mid-job.

The cluster runs in its own temp dir on free ports, with token authentication and a token of its
own (``RAY_AUTH_TOKEN``), so it never touches other Ray instances on this machine; it is stopped by
signalling the processes this module started (never ``ray stop``, which stops every Ray on the
machine), always, in a finally.

The multi-node test runs only with ``SAEALIGN_MULTINODE=1``: it starts a second raylet on this
machine, which on a 2-core CI runner roughly doubles this module's time; see the reason on the
test itself.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import psutil
import pytest

from tests.conftest import make_topk_sae

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
POOL = "embedded:pool#:32"
LAKE_ARGS = ["--pool", POOL, "--shard-size", "4", "--context", "64", "--address", "auto"]
N_SHARDS = 8
JOB_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RayNode:
    """One ``ray start --block`` process and everything it spawns."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                [str(VENV_BIN / "ray"), "start", "--block", "--disable-usage-stats", *args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _family(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        """SIGKILL ``ray start`` and everything it spawned (GCS, raylet, agents, workers, whose
        process groups differ): a node crash, and the way this module stops its nodes, since a
        graceful stop drains for up to half a minute."""
        for p in self._family():
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)


class LocalCluster:
    """A head (2 CPUs) on free ports in its own temp dir; optional worker nodes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.token = secrets.token_hex(16)
        self.gcs_port, self.dash_port = _free_port(), _free_port()
        self.url = f"http://127.0.0.1:{self.dash_port}"
        path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if Path(p) != VENV_BIN)
        self.env = {
            **os.environ,
            "PATH": path,  # the default runtime_env, not an inherited PATH, must find `saealign`
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_USAGE_STATS_ENABLED": "0",
            # notice a dead node within seconds (defaults: about half a minute)
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_timeout_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
        }
        self.nodes: list[RayNode] = []

    def _ports(self) -> list[str]:
        return ["--dashboard-agent-listen-port", str(_free_port()), "--metrics-export-port", str(_free_port())]

    def start_head(self) -> None:
        head = RayNode(
            [
                "--head",
                "--node-ip-address=127.0.0.1",
                f"--port={self.gcs_port}",
                "--num-cpus=2",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dash_port}",
                f"--ray-client-server-port={_free_port()}",
                f"--temp-dir={self.root / 'head'}",
                *self._ports(),
            ],
            self.env,
            self.root / "head.log",
        )
        self.nodes.append(head)
        self._wait(lambda: self._up() and len(self.alive_nodes()) == 1, head, "the head and its dashboard")

    def add_worker(self, resources: dict[str, float]) -> RayNode:
        before = len(self.alive_nodes())  # the head is up and listed (start_head waits for it)
        node = RayNode(
            [
                f"--address=127.0.0.1:{self.gcs_port}",
                "--node-ip-address=127.0.0.1",
                "--num-cpus=2",
                f"--resources={json.dumps(resources)}",
                f"--temp-dir={self.root / f'worker{len(self.nodes)}'}",
                *self._ports(),
            ],
            self.env,
            self.root / f"worker{len(self.nodes)}.log",
        )
        self.nodes.append(node)
        self._wait(lambda: len(self.alive_nodes()) > before, node, "the worker node to join")
        return node

    def _wait(self, ready: Any, node: RayNode, what: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not node.alive():
                raise RuntimeError(f"ray start exited ({node.proc.returncode}):\n{node.log.read_text()[-3000:]}")
            if ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"timed out waiting for {what}:\n{node.log.read_text()[-3000:]}")

    def _up(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/api/authentication_mode", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def state(self) -> Any:
        from ray.util.state import StateApiClient

        return StateApiClient(self.url, headers={"Authorization": f"Bearer {self.token}"})

    def alive_nodes(self) -> list[Any]:
        from ray.util.state.common import ListApiOptions, StateResource

        try:
            nodes = self.state().list(StateResource.NODES, options=ListApiOptions(), raise_on_missing_output=False)
        except Exception:  # the dashboard's node module may not be ready yet
            return []
        return [n for n in nodes if n.state == "ALIVE"]

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.kill()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    root = Path(tempfile.mkdtemp(prefix="saray-", dir="/tmp"))  # short: Ray's socket paths are length-limited
    c = LocalCluster(root)
    try:
        c.start_head()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cluster_sae")
    make_topk_sae(576, 256, 8, "blocks.6.hook_resid_post").save_model(path)
    return path


def _client_env(cluster: LocalCluster) -> dict[str, str]:
    """The submitter's environment: the cluster's token, but no RAY_AUTH_MODE (submit finds the mode)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    return {**env, "RAY_AUTH_TOKEN": cluster.token}


def _saealign(*args: str, env: dict[str, str], timeout: float, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workflows.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def _lake_args(lake: Path, sae: Path, *extra: str) -> list[str]:
    return ["build-lake", "--lake", str(lake), "--sae", str(sae), *LAKE_ARGS, *extra]


def _tables(lake: Path) -> dict[str, list[tuple[Any, ...]]]:
    con = duckdb.connect()
    cols = {"prompts": "prompt_id, text, n_tokens", "activations": "prompt_id, latent, value", "embeddings": "*"}
    return {
        t: con.sql(f"SELECT {c} FROM read_parquet('{lake}/{t}/*/*/*/*/part-*.parquet') ORDER BY ALL").fetchall()
        for t, c in cols.items()
    }


def _submission_id(stdout: str) -> str:
    return next(line.split(":", 1)[1].strip() for line in stdout.splitlines() if line.startswith("submission id:"))


@pytest.fixture(scope="module")
def clean_lake(cluster: LocalCluster, sae_dir: Path) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """build-lake submitted to the single-node cluster with ``saealign submit`` (default runtime_env)."""
    lake = cluster.root / "lake-clean"
    proc = _saealign(
        "submit",
        "--address",
        cluster.url,
        "--timeout",
        str(JOB_TIMEOUT_S),
        *_lake_args(lake, sae_dir),
        env=_client_env(cluster),
        timeout=JOB_TIMEOUT_S + 60,
    )
    return lake, proc


def test_submit_build_lake_succeeds_with_exact_rows(
    cluster: LocalCluster, clean_lake: tuple[Path, subprocess.CompletedProcess[str]]
) -> None:
    lake, proc = clean_lake
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sid = _submission_id(proc.stdout)
    assert f"job {sid} SUCCEEDED" in proc.stdout
    assert "lake dataset" in proc.stdout  # the job's own output came back through the log stream
    tables = _tables(lake)
    assert len(tables["prompts"]) == 32 and len(tables["embeddings"]) == 32
    assert len({r[0] for r in tables["activations"]}) == 32
    assert len({r[:2] for r in tables["activations"]}) == len(tables["activations"])  # no duplicated rows
    (manifest_path,) = [p for p in (lake / "manifests").glob("*.json") if not p.name.startswith(".")]
    manifest = json.loads(manifest_path.read_text())
    assert manifest["rows"]["activations"] == len(tables["activations"])
    assert len(list(lake.glob("prompts/**/part-*.parquet"))) == N_SHARDS

    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.url, headers={"Authorization": f"Bearer {cluster.token}"})
    info = client.get_job_info(sid)
    assert info.status == "SUCCEEDED" and info.entrypoint.startswith("saealign build-lake")
    assert info.entrypoint.endswith("--address auto")  # after the job name, submit's own options pass through
    assert info.runtime_env["working_dir"].startswith("gcs://")  # the checkout was uploaded

    listing = _saealign("jobs", "--address", cluster.url, env=_client_env(cluster), timeout=60)
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if line.startswith(sid))
    assert "SUCCEEDED" in row and "saealign build-lake" in row


def test_failing_job_exits_nonzero(cluster: LocalCluster, tmp_path: Path) -> None:
    missing = tmp_path / "no-lake"
    proc = _saealign(
        "submit",
        "--address",
        cluster.url,
        "query",
        "--lake",
        str(missing),
        "SELECT 1",
        env=_client_env(cluster),
        timeout=120,
    )
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "FAILED" in proc.stderr
    assert f"no lake at {missing}" in proc.stdout  # the job's own error came back through the log stream


def test_no_wait_returns_and_timeout_stops_the_job(cluster: LocalCluster, sae_dir: Path, tmp_path: Path) -> None:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.url, headers={"Authorization": f"Bearer {cluster.token}"})
    args = _lake_args(tmp_path / "lake", sae_dir)
    quick = _saealign("submit", "--no-wait", "--address", cluster.url, *args, env=_client_env(cluster), timeout=60)
    assert quick.returncode == 0, quick.stderr[-2000:]
    assert "lake dataset" not in quick.stdout  # returned without following the job
    client.stop_job(_submission_id(quick.stdout))

    timed = _saealign(
        "submit", "--timeout", "3", "--address", cluster.url, *args, env=_client_env(cluster), timeout=120
    )
    assert timed.returncode == 1, timed.stdout[-2000:] + timed.stderr[-2000:]
    assert "no result after 3s; stopping the job" in timed.stderr
    assert client.get_job_status(_submission_id(timed.stdout)) == "STOPPED"


def test_wrong_token_is_a_clear_error(cluster: LocalCluster) -> None:
    env = {**_client_env(cluster), "RAY_AUTH_TOKEN": "not-the-token"}
    proc = _saealign("jobs", "--address", cluster.url, env=env, timeout=60)
    assert proc.returncode == 2
    assert "rejected the token" in proc.stderr and "RAY_AUTH_TOKEN" in proc.stderr


def test_unreachable_address_fails_fast() -> None:
    port = _free_port()  # nothing listens there
    start = time.monotonic()
    proc = _saealign("submit", "--address", f"http://127.0.0.1:{port}", "build-lake", env=dict(os.environ), timeout=60)
    assert proc.returncode == 2
    assert f"cannot reach Ray dashboard at http://127.0.0.1:{port}" in proc.stderr
    assert "ray start --head" in proc.stderr
    assert time.monotonic() - start < 30


def test_silent_or_foreign_servers_give_up_within_the_probe_timeout() -> None:
    from ops.errors import SaealignError
    from workflows.submit import probe

    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        start = time.monotonic()
        with pytest.raises(SaealignError, match="cannot reach Ray dashboard"):
            probe(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=2)
        assert time.monotonic() - start < 10

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)  # 404s: not Ray
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(SaealignError, match="no Ray dashboard at"):
            probe(f"http://127.0.0.1:{server.server_port}", timeout=2)
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("job", "message"), [("no-such-job", "unknown job 'no-such-job'"), ("serve", "cannot be submitted")]
)
def test_bad_job_names_fail_before_contacting_anyone(job: str, message: str) -> None:
    proc = _saealign("submit", "--address", f"http://127.0.0.1:{_free_port()}", job, env=dict(os.environ), timeout=60)
    assert proc.returncode == 2 and message in proc.stderr
    assert "cannot reach" not in proc.stderr  # validated before the dashboard is probed


def _map_task_nodes(cluster: LocalCluster, job_id: str) -> dict[str, set[str]]:
    """node id -> names of this job's Ray Data actor tasks that ran there (every attempt: actor
    creations, restarts and the per-shard calls)."""
    from ray.util.state.common import ListApiOptions, StateResource

    tasks = cluster.state().list(
        StateResource.TASKS,
        options=ListApiOptions(filters=[("job_id", "=", job_id)], detail=True, limit=10_000),
        raise_on_missing_output=False,
    )
    nodes: dict[str, set[str]] = {}
    for t in tasks:
        if "MapWorker" in (t.name or "") and t.node_id:
            nodes.setdefault(t.node_id, set()).add(t.name)
    return nodes


HOLD_HEAD = """
import time, ray
ray.init()
@ray.remote(num_cpus=1.5, resources={"node:__internal_head__": 0.001})
def hold():
    print("holding the head's CPUs", flush=True)
    time.sleep(3600)
ray.get(hold.remote())
"""


def _hold_head_cpus(cluster: LocalCluster, client: Any) -> str:
    """A job whose task holds 1.5 of the head's 2 CPUs: the build-lake actors (0.5 CPU each) then
    cannot both fit on the head, so the worker node gets at least one. Stopping it frees the CPUs."""
    script = cluster.root / "hold_head.py"
    script.write_text(HOLD_HEAD)
    sid = client.submit_job(entrypoint=f"{sys.executable} {script}")
    deadline = time.monotonic() + 120
    while "holding the head's CPUs" not in client.get_job_logs(sid):
        status = client.get_job_status(sid)
        assert time.monotonic() < deadline and status in ("PENDING", "RUNNING"), client.get_job_logs(sid)
        time.sleep(0.5)
    return str(sid)


@pytest.mark.skipif(
    os.environ.get("SAEALIGN_MULTINODE") != "1",
    reason="multi-node: a second raylet plus an actor restart after the kill add 2-3 minutes on a "
    "2-core runner, over the CI budget; run with SAEALIGN_MULTINODE=1",
)
def test_worker_node_killed_mid_job_still_succeeds_with_clean_rows(
    cluster: LocalCluster, sae_dir: Path, clean_lake: tuple[Path, subprocess.CompletedProcess[str]]
) -> None:
    """One LM/SAE actor and one embedding actor (0.5 CPU each) over the head and a second node:
    while a job holds 1.5 of the head's 2 CPUs, at least one actor has to go to the second node.
    That node is SIGKILLed as soon as the first shard is written, the head's CPUs are released,
    the lost actor is restarted on the head, its calls retried and lost blocks rebuilt; the
    idempotent shard writes leave exactly the rows of the clean single-node run."""
    from ray.job_submission import JobSubmissionClient

    clean, proc = clean_lake
    assert proc.returncode == 0, proc.stderr[-2000:]
    client = JobSubmissionClient(cluster.url, headers={"Authorization": f"Bearer {cluster.token}"})
    worker = cluster.add_worker({"worker_node": 2})
    worker_id = next(n.node_id for n in cluster.alive_nodes() if not n.is_head_node)
    holder = _hold_head_cpus(cluster, client)
    try:
        lake = cluster.root / "lake-killed"
        args = _lake_args(lake, sae_dir, "--workers", "1", "--embed-workers", "1", "--cpus-per-worker", "0.5")
        submitted = _saealign(
            "submit", "--no-wait", "--address", cluster.url, *args, env=_client_env(cluster), timeout=120
        )
        sid = _submission_id(submitted.stdout)
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while time.monotonic() < deadline and not list(lake.glob("activations/**/part-*.parquet")):
            assert client.get_job_status(sid) not in ("FAILED", "STOPPED"), client.get_job_logs(sid)[-3000:]
            time.sleep(0.1)
        worker.kill()
        embedded_at_kill = len(list(lake.glob("embeddings/**/part-*.parquet")))
    finally:
        client.stop_job(holder)
    assert embedded_at_kill < N_SHARDS, "the job finished before the kill; nothing was tested"

    while time.monotonic() < deadline and client.get_job_status(sid) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        time.sleep(1)
    assert client.get_job_status(sid) == "SUCCEEDED", client.get_job_logs(sid)[-4000:]
    assert _tables(lake) == _tables(clean)
    ran_on = _map_task_nodes(cluster, client.get_job_info(sid).job_id)
    assert worker_id in ran_on and len(ran_on) == 2, f"the job's actors did not run on both nodes: {ran_on}"
