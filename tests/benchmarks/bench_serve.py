"""Load test of the serving deployment, loopback only: served throughput beside the raw batched decode.

Starts a local Ray and the Serve app on a free 127.0.0.1 port, then, for each K in ``--specs``
(default 1, 4, 16 distinct steering specs among the requests: topic × method × strength):

1. raw: the same requests as rows of one :class:`ops.steering.generation.RunningBatch` in this
   process (``Engine.run_rows``: no HTTP, no scheduler), ``--clients`` rows at a time, ``--requests``
   rounds: what the decode itself delivers;
2. served: ``--clients`` concurrent clients × ``--requests`` requests each through HTTP (the
   scheduler adds each request to the running batch at the next decode step);

and ``--sequential`` requests one at a time (half before, half after the K phases: this machine
is shared, bracketing evens out drift). Every request asks for exactly ``--tokens`` tokens
(``ignore_eos``) with its own seed. Prints requests, errors, p50/p95 latency, tokens/s and mean
batch size per phase, and the ratios served ÷ raw (goal ≥ 0.7) and served ÷ one at a time.
Bounded: a served phase stops issuing requests after ``--max-seconds``.

    .venv/bin/python -m tests.benchmarks.bench_serve                 # builds a small lake in /tmp
    .venv/bin/python -m tests.benchmarks.bench_serve --lake out/demo/lake --topics medical

Without ``--lake`` the service runs on a small lake with a random SAE (32 embedded pool prompts,
topics medical and sport): the cost of serving does not depend on the trained weights. The
numbers go with the machine, date and command to ``--out`` (default ``docs/data/serve.json``),
from which ``make docs`` renders ``docs/benchmarks.md``.
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


METHODS = ("swap", "clamp")
STRENGTHS = (1.0, 0.75, 0.5, 0.25)


def spec_of(j: int, topics: list[str]) -> dict[str, Any]:
    """Steering spec number ``j``: topic, method and strength differ between consecutive numbers."""
    topic = topics[j % len(topics)]
    method = METHODS[(j // len(topics)) % len(METHODS)]
    strength = STRENGTHS[(j // (len(topics) * len(METHODS))) % len(STRENGTHS)]
    options = {"strength": strength} if method == "swap" else {"clamp_factor": 8.0 * strength}
    return {"topic": topic, "method": method, "options": options}


def request_body(i: int, topics: list[str], tokens: int, n_specs: int = 4) -> dict[str, Any]:
    """Request ``i``: one of ``n_specs`` distinct steering specs, its own prompt and seed."""
    return {
        "prompt": PROMPTS[i % len(PROMPTS)],
        **spec_of(i % n_specs, topics),
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


def served(
    url: str, clients: int, per_client: int, topics: list[str], tokens: int, n_specs: int, max_seconds: float
) -> Phase:
    phase = Phase(f"served, {clients} clients, K={n_specs}")
    counter = itertools.count()
    deadline = time.perf_counter() + max_seconds

    def client_loop(c: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as client:
            for _ in range(per_client):
                if time.perf_counter() > deadline:
                    return
                call(client, phase, request_body(next(counter), topics, tokens, n_specs))

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client_loop, range(clients)))
    phase.wall = time.perf_counter() - t0
    return phase


def raw(engine: Any, rows: int, rounds: int, topics: list[str], tokens: int, n_specs: int) -> Phase:
    """The same requests decoded in this process, ``rows`` at a time in one running batch."""
    from workflows.serve_api import GenerateRequest

    phase = Phase(f"raw batched decode, {rows} rows, K={n_specs}")
    t0 = time.perf_counter()
    for r in range(rounds):
        reqs = [GenerateRequest(**request_body(r * rows + i, topics, tokens, n_specs)) for i in range(rows)]
        batch = [row for req in reqs for row in engine.rows(req, [req.method])]
        t = time.perf_counter()
        results = engine.run_rows(batch)
        elapsed = time.perf_counter() - t
        for res in results:
            phase.record(elapsed, res.to_dict())
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
    p.add_argument("--requests", type=int, default=4, help="requests per client (raw: rounds)")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--specs", type=int, nargs="+", default=[1, 4, 16], help="distinct steering specs (K)")
    p.add_argument("--sequential", type=int, default=4, help="requests of the one-at-a-time phase")
    p.add_argument("--max-batch-size", type=int, default=16)
    # one torch thread per process by default: on a 2-core machine the Ray proxy, the HTTP
    # clients and a 2-thread replica oversubscribe the cores (measured: served ÷ raw 0.54–0.90
    # with 2 threads, 0.87–1.05 with 1, and more tokens/s for both)
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--max-seconds", type=float, default=600.0, help="stop issuing served requests after this")
    p.add_argument("--out", default=str(DATA / "serve.json"), help="where the numbers go (JSON)")
    args = p.parse_args(argv)
    t_start = time.perf_counter()

    import ray
    import torch
    from ray import serve

    from tests.integration.test_serve import free_port, service_lake
    from workflows.serve import ServeConfig, build_app
    from workflows.serve_engine import Engine

    torch.set_num_threads(args.torch_threads)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    pairs: list[tuple[Phase, Phase]] = []
    try:
        lake = args.lake or str(service_lake(Path(tempfile.gettempdir()) / "saealign-bench-serve"))
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        cfg = ServeConfig(
            lake=lake,
            torch_threads=args.torch_threads,
            max_batch_size=args.max_batch_size,
            max_ongoing_requests=max(32, 2 * args.clients),
            max_queued_rows=max(64, 2 * args.clients),
            device="cpu",
        )
        serve.run(build_app(cfg), name="saealign", route_prefix="/")
        engine = Engine(cfg)  # the same model, SAE and topics, in this process, for the raw decode
        url = f"http://127.0.0.1:{port}"
        scored = {t["topic"] for t in httpx.get(f"{url}/topics", timeout=30).json()["topics"]}
        if missing := sorted(set(args.topics) - scored):
            raise SystemExit(f"topics {missing} are not scored in {lake} (scored: {sorted(scored)}); pass --topics")
        one_at_a_time(url, range(2), args.topics, 4, "warm-up")
        raw(engine, 2, 1, args.topics, 4, 2)
        half = args.sequential // 2
        before = one_at_a_time(url, range(half), args.topics, args.tokens, "one at a time (before)")
        for k in args.specs:  # raw and served side by side, per K
            rows = min(args.clients, args.max_batch_size)
            pairs.append(
                (
                    raw(engine, rows, args.requests * args.clients // rows, args.topics, args.tokens, k),
                    served(url, args.clients, args.requests, args.topics, args.tokens, k, args.max_seconds),
                )
            )
        after = one_at_a_time(url, range(half, args.sequential), args.topics, args.tokens, "one at a time (after)")
        seq = merged("one at a time (both)", before, after)
    finally:
        serve.shutdown()
        ray.shutdown()

    rows_out = [seq.row()] + [ph.row() for pair in pairs for ph in pair]
    print(
        f"\nserve load test: {args.tokens} tokens/request, max_batch_size {args.max_batch_size}, "
        f"torch threads {args.torch_threads}, loopback"
    )
    print_table(rows_out)
    ratios = []
    for raw_ph, srv in pairs:
        value = srv.row()["tokens/s"] / raw_ph.row()["tokens/s"]
        ratios.append({"what": f"{srv.name} ÷ raw batched decode (tokens/s)", "value": value, "goal": "≥ 0.7"})
    main_pair = pairs[len(pairs) // 2][1] if pairs else None
    if main_pair is not None:
        value = main_pair.row()["tokens/s"] / seq.row()["tokens/s"]
        ratios.append({"what": f"{main_pair.name} ÷ one at a time (tokens/s)", "value": value, "goal": "≥ 3"})
    for r in ratios:
        r["met"] = bool(r["value"] >= float(r["goal"].split()[-1]))  # NaN: not met
        print(f"{r['what']}: {r['value']:.2f}x (goal {r['goal']}: {'met' if r['met'] else 'NOT met'})")
        r["value"] = None if math.isnan(r["value"]) else r["value"]
    errors = seq.errors + [e for pair in pairs for ph in pair for e in ph.errors]
    planned = args.clients * args.requests * len(pairs)
    completed = sum(len(srv.latencies) for _, srv in pairs)
    print(f"served requests completed: {completed} of {planned}; errors: {len(errors)}")
    for err in errors[:5]:
        print(f"  error: {err}")
    write_result(
        args.out,
        "tests.benchmarks.bench_serve",
        {
            "bench": {"seconds": time.perf_counter() - t_start},
            "config": {
                "lake": args.lake or "small test lake (random SAE, 32 embedded pool prompts)",
                "topics": args.topics,
                "specs": "K distinct (topic, method swap/clamp, strength) per phase",
                "spec_counts": args.specs,
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
            "rows": [_finite(r) for r in rows_out],
            "served_completed": completed,
            "served_planned": planned,
            "errors": len(errors),
            "ratios": ratios,
        },
        argv,
    )
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
