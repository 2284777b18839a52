"""``saealign submit`` and ``saealign jobs``: run saealign jobs on a Ray cluster (Ray Jobs API).

::

    saealign submit --address http://HEAD:8265 build-lake --lake s3://bucket/lake --workers 8 --gpus-per-worker 1
    saealign submit --no-wait score --lake s3://bucket/lake --topic medical --align-file embedded:topic:medical
    saealign jobs --address http://HEAD:8265

Everything after the job name passes unchanged to ``saealign <job>`` on the cluster. The job's code
travels as the runtime_env ``working_dir`` (this checkout without .venv, out, .git and caches); its
packages come from the cluster's image or a ``pip`` list (``--runtime-env cluster/runtime_env.yaml``).
A cluster started on this machine from this virtualenv already has them: the default runtime_env puts
the virtualenv's ``bin`` first on the job's PATH (a node without that directory ignores it).

Before anything is sent, the dashboard is probed within a few seconds, so a wrong address fails
fast. Clusters with token authentication (Ray's default since 2.59 for a ``ray start --head`` on a
machine that has a token) get the token from ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or
``~/.ray/auth_token``, the order Ray itself uses.

Jobs read and write the lake through a URI that every node can reach (a shared path, or
``s3://``/``gs://`` through pyarrow filesystems). A worker that dies mid-job has its actors
restarted and its shard retried by Ray Data; the lake's shard writes are atomic and skip finished
shards, so a retried or resubmitted job never duplicates rows.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import yaml

from ops.errors import SaealignError
from workflows._config import parse_config

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
PROBE_TIMEOUT_S = 5.0
REPO_ROOT = Path(__file__).resolve().parents[1]
EXCLUDES = [".git", ".venv", "out", "build", "*.egg-info", "**/__pycache__"]
EXCLUDES += [".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis"]
NOT_SUBMITTABLE = {
    "submit": "it runs on your machine and talks to the cluster itself",
    "jobs": "it runs on your machine and talks to the cluster itself",
    "serve": "a Serve app is a long-running service, not a job that ends; deploy it with "
    "`serve deploy cluster/serve.yaml` or the RayService in cluster/rayservice.yaml",
    "demo": "it writes its results under the job's temporary working directory on the head node, "
    "where they are lost; submit build-lake, score and evaluate with a shared lake URI instead",
}
TERMINAL_STATUSES = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass(frozen=True)
class SubmitConfig:
    """Submit a saealign job to a Ray cluster, stream its logs and exit with its outcome."""

    job: str = field(metadata={"positional": True})
    """The saealign job to run on the cluster (e.g. build-lake, score, train-sae)."""
    job_args: tuple[str, ...] = field(default=(), metadata={"remainder": True})
    """Everything after the job name: passed unchanged to `saealign <job>` on the cluster."""
    address: str = ""
    """Ray dashboard address (http://HOST:8265); empty = $RAY_API_SERVER_ADDRESS, an http(s)
    $RAY_ADDRESS, or http://127.0.0.1:8265."""
    wait: bool = True
    """Follow the job's logs until it ends (--no-wait: print the submission id and return)."""
    runtime_env: str = ""
    """YAML/JSON runtime_env file whose keys override the default (working_dir = this checkout);
    relative local paths in it are resolved from the file's directory (see cluster/runtime_env.yaml)."""
    timeout: float = 0.0
    """Seconds to wait for the job; when they run out the job is stopped and the exit code is 1
    (0 = no limit)."""
    command: str = "saealign"
    """How the cluster runs saealign (e.g. 'python -m workflows.cli' to use the uploaded code)."""

    def __post_init__(self) -> None:
        from workflows.cli import JOBS

        if self.job not in JOBS:
            raise SaealignError(
                f"unknown job '{self.job}'; jobs: {', '.join(sorted(set(JOBS) - set(NOT_SUBMITTABLE)))}"
            )
        if self.job in NOT_SUBMITTABLE:
            raise SaealignError(f"'{self.job}' cannot be submitted as a cluster job: {NOT_SUBMITTABLE[self.job]}")
        if self.timeout < 0:
            raise SaealignError("--timeout must be >= 0 (0 = no limit)")
        if not self.command.strip():
            raise SaealignError("--command must not be empty")

    @property
    def entrypoint(self) -> str:
        """The shell command the cluster runs."""
        return f"{self.command} {shlex.join([self.job, *self.job_args])}"


@dataclass(frozen=True)
class JobsConfig:
    """List the jobs of a Ray cluster with their status."""

    address: str = ""
    """Ray dashboard address (http://HOST:8265); empty as for `saealign submit`."""
    limit: int = 50
    """Show the most recent N jobs (0 = all)."""


def parse_submit(argv: list[str] | None) -> SubmitConfig:
    """``[options] <job> [job args...]``: options before the job name are submit's, the rest pass through."""
    epilog = "Options of `saealign submit` go before the job name; everything after it goes to the job."
    return parse_config(SubmitConfig, argv, "saealign submit", epilog=epilog)


# -- the dashboard: address, reachability, authentication -----------------------------------------


def dashboard_url(address: str) -> str:
    """``http://HOST:PORT`` from an address, the environment, or the local default."""
    if not address:
        env = os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS", "")
        address = env if env.startswith(("http://", "https://")) else DEFAULT_ADDRESS
    if address == "auto" or address.startswith("ray://"):
        raise SaealignError(f"'{address}' is not a dashboard address; fix: pass --address http://HOST:8265")
    if "://" not in address:
        address = "http://" + address
    return address.rstrip("/")


def _get_json(url: str, timeout: float) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        payload = json.loads(resp.read().decode())
    if not isinstance(payload, dict):
        raise ValueError(f"unexpected answer from {url}")
    return payload


def probe(url: str, timeout: float = PROBE_TIMEOUT_S) -> str:
    """The cluster's authentication mode ('token' or 'disabled'); a clear error within about
    ``timeout`` seconds per request when no Ray dashboard answers at ``url``."""
    fix = "fix: start a cluster with `ray start --head` or pass --address http://HOST:8265"
    try:
        try:
            return str(_get_json(f"{url}/api/authentication_mode", timeout)["authentication_mode"])
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise
        # a Ray older than 2.52 has no token authentication and no such endpoint
        if "ray_version" not in _get_json(f"{url}/api/version", timeout):
            raise ValueError("no ray_version in /api/version")
        return "disabled"
    except urllib.error.HTTPError as exc:
        raise SaealignError(f"no Ray dashboard at {url} (HTTP {exc.code} from {exc.url}); {fix}") from exc
    except (OSError, ValueError, KeyError) as exc:  # URLError, timeouts, refused connections, not Ray
        reason = getattr(exc, "reason", None) or exc
        raise SaealignError(f"cannot reach Ray dashboard at {url} ({reason}); {fix}") from exc


def read_token() -> str:
    """The Ray auth token from RAY_AUTH_TOKEN, the file at RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    return path.read_text().strip() if path.is_file() else ""


def auth_headers(url: str) -> dict[str, str]:
    """Headers for the dashboard at ``url`` (a bearer token when the cluster asks for one)."""
    if probe(url) != "token":
        return {}
    token = read_token()
    if not token:
        raise SaealignError(
            f"the Ray cluster at {url} uses token authentication and no token was found; fix: set "
            "RAY_AUTH_TOKEN to the cluster's token (`ray get-auth-token` on the head node, or the "
            "KubeRay Secret <cluster-name>) or RAY_AUTH_TOKEN_PATH to a file holding it"
        )
    return {"Authorization": f"Bearer {token}"}


def connect(address: str) -> tuple[Any, str, bool]:
    """A ``JobSubmissionClient`` for the cluster, its dashboard URL, and whether it uses a token."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = dashboard_url(address)
    headers = auth_headers(url)
    try:
        return JobSubmissionClient(url, headers=headers), url, bool(headers)
    except AuthenticationError as exc:
        raise SaealignError(
            f"the Ray cluster at {url} rejected the token; fix: set RAY_AUTH_TOKEN to the cluster's "
            "token (`ray get-auth-token` on the head node)"
        ) from exc
    except (ConnectionError, RuntimeError) as exc:
        raise SaealignError(f"the Ray dashboard at {url} did not accept the connection: {exc}") from exc


# -- runtime_env ---------------------------------------------------------------------------------


def default_runtime_env() -> dict[str, Any]:
    """This checkout as working_dir (when run from one); unbuffered output; this virtualenv's bin first on PATH."""
    env: dict[str, Any] = {"env_vars": {"PYTHONUNBUFFERED": "1"}}
    if (REPO_ROOT / "pyproject.toml").is_file() and (REPO_ROOT / "workflows").is_dir():
        env["working_dir"] = str(REPO_ROOT)
        env["excludes"] = list(EXCLUDES)
    if sys.prefix != sys.base_prefix:  # a virtualenv: a cluster started from it finds `saealign` there
        env["env_vars"]["PATH"] = f"{Path(sys.executable).parent}:${{PATH}}"
    return env


def load_runtime_env(path: str) -> dict[str, Any]:
    """The default runtime_env with the keys of ``path`` (YAML or JSON) on top; env_vars are merged.
    ``working_dir: null`` in the file means no upload (the code is in the image)."""
    env = default_runtime_env()
    if not path:
        return env
    file = Path(path)
    try:
        extra = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SaealignError(f"cannot read runtime_env file {path}: {exc}") from exc
    if not isinstance(extra, dict):
        raise SaealignError(f"runtime_env file {path} must hold a mapping (working_dir, pip, env_vars, ...)")
    wd = extra.get("working_dir")
    if isinstance(wd, str) and "://" not in wd and not Path(wd).expanduser().is_absolute():
        extra["working_dir"] = str((file.parent / wd).resolve())
    env_vars = {**env["env_vars"], **(extra.pop("env_vars", None) or {})}
    env.update(extra)
    env["env_vars"] = {k: str(v) for k, v in env_vars.items()}
    if env.get("working_dir") is None:
        env.pop("working_dir", None)
        env.pop("excludes", None)
    return env


# -- submit and follow ---------------------------------------------------------------------------


def submit(cfg: SubmitConfig) -> tuple[Any, str, str, str]:
    """Submit the job; returns (client, dashboard URL, submission id, how to run `ray job` on it)."""
    client, url, token = connect(cfg.address)
    runtime_env = load_runtime_env(cfg.runtime_env)
    logging.getLogger("ray._private.runtime_env.packaging").setLevel(logging.WARNING)  # one line per ignored file
    try:
        sid = client.submit_job(entrypoint=cfg.entrypoint, runtime_env=runtime_env)
    except RuntimeError as exc:
        raise SaealignError(f"the cluster at {url} refused the job: {exc}") from exc
    ray_job = f"{'RAY_AUTH_MODE=token ' if token else ''}ray job"  # the ray CLI sends the token only then
    return client, url, str(sid), ray_job


async def _tail(client: Any, sid: str, out: TextIO) -> None:
    async for chunk in client.tail_job_logs(sid):
        out.write(chunk)
        out.flush()


def _stream_logs(client: Any, sid: str, out: TextIO, timeout: float | None) -> bool:
    """Stream the job's logs until it ends; False when ``timeout`` seconds ran out first."""
    try:
        asyncio.run(asyncio.wait_for(_tail(client, sid, out), timeout))
    except TimeoutError:
        return False
    except (RuntimeError, OSError) as exc:  # a dropped websocket: the status poll below still ends the wait
        log.warning("log stream of %s ended early (%s); waiting for the job's status", sid, exc)
    return True


def follow(client: Any, sid: str, timeout: float = 0.0, out: TextIO = sys.stdout) -> str:
    """Stream logs, then wait for a terminal status; stops the job when ``timeout`` (> 0) runs out."""
    deadline = time.monotonic() + timeout if timeout > 0 else None

    def left() -> float | None:
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    in_time = _stream_logs(client, sid, out, left())
    while in_time:
        status = str(client.get_job_status(sid).value)
        if status in TERMINAL_STATUSES:
            return status
        remaining = left()
        in_time = remaining is None or remaining > 0
        time.sleep(0.5 if remaining is None else min(0.5, remaining))
    print(f"\n{sid}: no result after {timeout:g}s; stopping the job", file=sys.stderr)
    client.stop_job(sid)
    for _ in range(60):
        status = str(client.get_job_status(sid).value)
        if status in TERMINAL_STATUSES:
            return status
        time.sleep(0.5)
    return status


def main_submit(argv: list[str] | None = None) -> int:
    cfg = parse_submit(argv)
    client, url, sid, ray_job = submit(cfg)
    print(f"submission id: {sid}", flush=True)
    print(f"  entrypoint: {cfg.entrypoint}\n  dashboard: {url}", flush=True)
    if not cfg.wait:
        print(f"  follow it: {ray_job} logs --follow {sid} --address {url}\n  list jobs: saealign jobs --address {url}")
        return 0
    try:
        status = follow(client, sid, cfg.timeout)
    except KeyboardInterrupt:
        print(f"\n{sid} keeps running; stop it with: {ray_job} stop {sid} --address {url}", file=sys.stderr)
        return 130
    info = client.get_job_info(sid)
    detail = f": {info.message}" if status != "SUCCEEDED" and info.message else ""
    print(f"job {sid} {status}{detail}", file=sys.stdout if status == "SUCCEEDED" else sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


# -- jobs ----------------------------------------------------------------------------------------


def _when(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def jobs_table(jobs: list[Any], limit: int = 0) -> str:
    """A text table of job details (newest last): submission id, status, start, end, entrypoint."""
    jobs = sorted(jobs, key=lambda j: j.start_time or 0)
    jobs = jobs[-limit:] if limit > 0 else jobs
    rows = [("SUBMISSION ID", "STATUS", "START", "END", "ENTRYPOINT")]
    for j in jobs:
        entry = j.entrypoint or ""
        entry = entry if len(entry) <= 80 else entry[:77] + "..."
        status = str(getattr(j.status, "value", j.status))
        rows.append((j.submission_id or j.job_id or "-", status, _when(j.start_time), _when(j.end_time), entry))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)), r[4]]) for r in rows)


def main_jobs(argv: list[str] | None = None) -> int:
    cfg = parse_config(JobsConfig, argv, "saealign jobs")
    client, url, _ = connect(cfg.address)
    jobs = client.list_jobs()
    print(f"{len(jobs)} job(s) on {url}")
    if jobs:
        print(jobs_table(jobs, cfg.limit))
    return 0


main = main_submit
