"""Load test of the serving deployment, loopback only: batched vs one at a time.

Starts a local Ray and the Serve app on a free 127.0.0.1 port, then

1. one at a time: ``--sequential`` requests sent by one client, each alone in its batch, half
   before and half after the batched phase (this machine is shared: bracketing the batched
   phase evens out background-load drift between the two measurements);
2. batched: ``--clients`` concurrent clients × ``--requests`` requests each.

Every request asks for exactly ``--tokens`` tokens (``ignore_eos``), cycling through
topics and methods (swap/clamp/orig, medical/sport) with its own seed, so batches mix per-row
specs. Prints a table of requests, errors, p50/p95 latency, tokens/s and mean batch size, and the
ratio batched / one-at-a-time throughput (goal: ≥ 3). Bounded: the batched phase stops issuing
requests after ``--max-seconds``.

    .venv/bin/python -m tests.benchmarks.bench_serve                 # builds a small lake in /tmp
    .venv/bin/python -m tests.benchmarks.bench_serve --lake out/demo/lake --topics medical

Without ``--lake`` the service runs on a small lake with a random SAE (32 embedded pool prompts,
topics medical and sport): the cost of serving does not depend on the trained weights. Latency
and throughput depend on ``--tokens``, ``--max-batch-size`` and ``--torch-threads``, which the
JSON records. The numbers go with the machine, date and command to ``--out`` (default
``docs/data/serve.json``), from which ``make docs`` renders ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import math
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.benchmarks.machine import DATA, write_result  # noqa: E402

PROMPTS = [
    "My heart is broken, so I should",
    "Our team needs a shot in the arm before",
    "The economy caught a cold after",
    "I have butterflies in my stomach so I should",
    "Tell me about your weekend plans.",
    "The best way to start the morning is",
]


@dataclass
class Phase:
    name: str
    latencies: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: list[str] = field(default_factory=list)
    batch_sizes: list[float] = field(default_factory=list)
    wall: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, latency: float, result: dict[str, Any]) -> None:
        with self.lock:
            self.latencies.append(latency)
            self.tokens += len(result["token_ids"])
            self.batch_sizes.append(float(result["timings"]["batch_size"]))

    def row(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        pct = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]) if lat else (lambda q: float("nan"))
        return {
            "phase": self.name,
            "requests": len(lat),
            "errors": len(self.errors),
            "p50_s": pct(0.50),
            "p95_s": pct(0.95),
            "tokens/s": self.tokens / self.wall if self.wall else float("nan"),
            "mean_batch": statistics.fmean(self.batch_sizes) if self.batch_sizes else float("nan"),
            "wall_s": self.wall,
        }


def request_body(i: int, topics: list[str], tokens: int) -> dict[str, Any]:
    method = ("swap", "clamp", "swap", "orig")[i % 4]
    return {
        "prompt": PROMPTS[i % len(PROMPTS)],
        "topic": topics[(i // 2) % len(topics)],
        "method": method,
        "max_new_tokens": tokens,
        "ignore_eos": True,
        "seed": i,
    }


def call(client: httpx.Client, phase: Phase, body: dict[str, Any]) -> None:
    t0 = time.perf_counter()
    try:
        resp = client.post("/generate", json=body)
        if resp.status_code != 200:
            raise RuntimeError(f"{resp.status_code}: {resp.text[:200]}")
        phase.record(time.perf_counter() - t0, resp.json())
    except Exception as exc:
        with phase.lock:
            phase.errors.append(str(exc))


def one_at_a_time(url: str, indices: range, topics: list[str], tokens: int, name: str) -> Phase:
    phase = Phase(name)
    with httpx.Client(base_url=url, timeout=600) as client:
        t0 = time.perf_counter()
        for i in indices:
            call(client, phase, request_body(i, topics, tokens))
        phase.wall = time.perf_counter() - t0
    return phase


def merged(name: str, *phases: Phase) -> Phase:
    out = Phase(name)
    for ph in phases:
        out.latencies += ph.latencies
        out.tokens += ph.tokens
        out.errors += ph.errors
        out.batch_sizes += ph.batch_sizes
        out.wall += ph.wall
    return out


def batched(url: str, clients: int, per_client: int, topics: list[str], tokens: int, max_seconds: float) -> Phase:
    phase = Phase(f"batched ({clients} clients)")
    counter = itertools.count()
    deadline = time.perf_counter() + max_seconds

    def client_loop(c: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as client:
            for _ in range(per_client):
                if time.perf_counter() > deadline:
                    return
                call(client, phase, request_body(next(counter), topics, tokens))

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client_loop, range(clients)))
    phase.wall = time.perf_counter() - t0
    return phase


def print_table(rows: list[dict[str, Any]]) -> None:
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()]
        print("| " + " | ".join(cells) + " |")


def _finite(row: dict[str, Any]) -> dict[str, Any]:
    """The row for JSON: ``tokens/s`` as ``tokens_per_s``, NaN (a phase with no requests) as null."""
    out = {("tokens_per_s" if k == "tokens/s" else k): v for k, v in row.items()}
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lake", default="", help="lake with scored topics (default: build a small one in /tmp)")
    p.add_argument("--topics", nargs="+", default=["medical", "sport"])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=20, help="requests per client")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--sequential", type=int, default=8, help="requests of the one-at-a-time phase")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--torch-threads", type=int, default=2)
    p.add_argument("--max-seconds", type=float, default=900.0, help="stop issuing batched requests after this")
    p.add_argument("--out", default=str(DATA / "serve.json"), help="where the numbers go (JSON)")
    args = p.parse_args(argv)
    t_start = time.perf_counter()

    import ray
    from ray import serve

    from tests.integration.test_serve import free_port, service_lake
    from workflows.serve import ServeConfig, build_app

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        lake = args.lake or str(service_lake(Path(tempfile.gettempdir()) / "saealign-bench-serve"))
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        cfg = ServeConfig(
            lake=lake,
            torch_threads=args.torch_threads,
            max_batch_size=args.max_batch_size,
            max_ongoing_requests=max(32, 2 * args.clients),
        )
        serve.run(build_app(cfg), name="saealign", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        scored = {t["topic"] for t in httpx.get(f"{url}/topics", timeout=30).json()["topics"]}
        if missing := sorted(set(args.topics) - scored):
            raise SystemExit(f"topics {missing} are not scored in {lake} (scored: {sorted(scored)}); pass --topics")
        one_at_a_time(url, range(2), args.topics, 4, "warm-up")
        half = args.sequential // 2
        before = one_at_a_time(url, range(half), args.topics, args.tokens, "one at a time (before)")
        bat = batched(url, args.clients, args.requests, args.topics, args.tokens, args.max_seconds)
        after = one_at_a_time(url, range(half, args.sequential), args.topics, args.tokens, "one at a time (after)")
        seq = merged("one at a time (both)", before, after)
    finally:
        serve.shutdown()
        ray.shutdown()

    rows = [before.row(), after.row(), seq.row(), bat.row()]
    print(
        f"\nserve load test: {args.tokens} tokens/request, max_batch_size {args.max_batch_size}, "
        f"torch threads {args.torch_threads}, loopback"
    )
    print_table(rows)
    ratio = bat.row()["tokens/s"] / seq.row()["tokens/s"]
    planned = args.clients * args.requests
    print(f"\nbatched / one-at-a-time throughput: {ratio:.2f}x (goal >= 3: {'met' if ratio >= 3 else 'NOT met'})")
    n_errors = len(seq.errors) + len(bat.errors)
    print(f"batched requests completed: {len(bat.latencies)} of {planned}; errors: {n_errors}")
    for err in (seq.errors + bat.errors)[:5]:
        print(f"  error: {err}")
    write_result(
        args.out,
        "tests.benchmarks.bench_serve",
        {
            "bench": {"seconds": time.perf_counter() - t_start},
            "config": {
                "lake": args.lake or "small test lake (random SAE, 32 embedded pool prompts)",
                "topics": args.topics,
                "methods": "swap, clamp, swap, orig (cycled)",
                "tokens_per_request": args.tokens,
                "clients": args.clients,
                "requests_per_client": args.requests,
                "sequential_requests": args.sequential,
                "max_batch_size": args.max_batch_size,
                "torch_threads": args.torch_threads,
                "max_seconds": args.max_seconds,
                "replicas": 1,
                "network": "loopback",
            },
            "rows": [_finite(r) for r in rows],
            "batched_completed": len(bat.latencies),
            "batched_planned": planned,
            "errors": n_errors,
            "ratios": [
                {
                    "what": "batched ÷ one-at-a-time throughput (tokens/s)",
                    "value": None if math.isnan(ratio) else ratio,
                    "goal": "≥ 3",
                    "met": ratio >= 3,
                }
            ],
        },
        argv,
    )
    return 0 if not (seq.errors or bat.errors) else 1


if __name__ == "__main__":
    sys.exit(main())
