"""Lake throughput vs a plain loop over the same model, layer and tokens (issue: reference lake).

Run by hand (not in CI), from the repository root with ../shared/data present:

    .venv/bin/python -m tests.benchmarks.bench_lake [--sizes 2000 12500] [--sae default] [--sample random]

For each pool size, in one run on one machine: (a) a plain loop that runs the LM to the SAE's
hook over the pool's tokens (same batching, no SAE, no embeddings, no writes); (b) the build-lake
job on a local Ray (LM + SAE + summaries + MiniLM embeddings + Parquet writes). Prints prompts/s,
tokens/s, their ratio, the lake's wall time next to the paper's set-up time (12.4 min for 8K
prompts on a V100), and the peak memory of the driver plus Ray processes (summed RSS, summed
PSS, and each role's peak RSS). The numbers go with the machine, date and command to ``--out``
(default ``docs/data/lake.json``), from which ``make docs`` renders ``docs/benchmarks.md``.

How to read the ratio: on the same cores the lake does more than the plain loop (it also embeds
every prompt with MiniLM, encodes with the SAE, summarises, writes Parquet, and Ray's own
processes take their share), so the benchmark also counts the CPU seconds of every process by
role; the embedding actor's CPU time next to the plain loop's bounds the ratio reachable on this
many cores. The settings that matter are the build-lake defaults: ``--embed-precision auto``
(bf16 autocast on a CPU with bf16 matrix units; the manifest records the precision, and a
resumed dataset keeps it) and ``--workers 0 --cpus-per-worker 0`` (one single-threaded LM actor
per CPU, as many as ``--worker-memory-gb`` lets memory hold). Memory: RSS counts the
object-store pages a process maps; PSS splits shared pages between the processes sharing them,
so summed PSS is the figure to compare across pool sizes. ``--sample random`` draws the small
pool from the whole one, so both have the same range of prompt lengths (peak memory follows the
longest prompts).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from ops.models.lm import load_model
from ops.saes.registry import load_sae
from ops.steering.activations import iter_batches, run_to_hook
from ops.texts import read_texts
from tests.benchmarks.machine import DATA, write_result
from workflows.build_lake import BuildLakeConfig, build

POOL = Path(__file__).resolve().parents[3] / "shared" / "data" / "reference_pool.jsonl"


def _role(proc: psutil.Process, me: int) -> str | None:
    """Which part of the job a process is: the driver, a Ray worker (by its task/actor name), a
    Ray system process, or None (not ours)."""
    if proc.pid == me:
        return "driver"
    cmd = proc.info["cmdline"] or []
    if cmd and cmd[0].startswith("ray::"):
        name = cmd[0].removeprefix("ray::")
        for actor in ("ShardLatents", "ShardEmbeddings"):
            if actor in name:
                return actor
        return "other ray workers"
    if proc.info["name"] in ("raylet", "gcs_server") or any("ray/" in c and "default_worker" not in c for c in cmd[:2]):
        return "ray system"
    return None


class PeakMemory:
    """Samples, every 2 s, the memory of this process, every Ray worker and the Ray system
    processes. Keeps the peak of the summed RSS, the peak of the summed PSS (shared pages, such as
    the object store's, split between the processes mapping them instead of counted in each), and
    each role's own peak RSS, to show which part grows. Also the CPU seconds each role used while
    sampled (a process's last reading minus its first; processes born later start from 0)."""

    def __init__(self) -> None:
        self.peak_rss = 0
        self.peak_pss = 0
        self.by_role: dict[str, int] = {}
        self._cpu: dict[int, tuple[str, float, float]] = {}  # pid -> (role, first, last)
        self.own_cpu = 0.0  # this sampler's CPU seconds (counted in the driver's)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def cpu_by_role(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for role, first, last in self._cpu.values():
            out[role] = out.get(role, 0.0) + last - first
        return out

    def _run(self) -> None:
        me = os.getpid()
        started = False
        while not self._stop.is_set():
            rss = pss = 0
            roles: dict[str, int] = {}
            for p in psutil.process_iter(["pid", "name", "cmdline"]):
                role = _role(p, me)
                if role is None:
                    continue
                try:
                    mem = p.memory_full_info()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                rss += mem.rss
                pss += getattr(mem, "pss", mem.rss)
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    used = sum(p.cpu_times()[:2])
                    first = self._cpu[p.pid][1] if p.pid in self._cpu else (used if not started else 0.0)
                    self._cpu[p.pid] = (role, first, used)
                roles[role] = roles.get(role, 0) + mem.rss
            started = True
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            for role, value in roles.items():
                self.by_role[role] = max(self.by_role.get(role, 0), value)
            self.own_cpu = time.thread_time()
            time.sleep(2.0)  # reading every process's smaps costs CPU the lake shares

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def plain_loop(texts: list[str], hook: str, context: int, batch_tokens: int) -> tuple[float, int, float]:
    """(seconds, tokens, CPU seconds) of the plain loop, run in a child process so that its model
    and buffers are not counted in the driver's memory during the lake build."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_plain_loop, (texts, hook, context, batch_tokens))


def _plain_loop(texts: list[str], hook: str, context: int, batch_tokens: int) -> tuple[float, int, float]:
    model = load_model()
    _ = model.tl
    n_tokens = 0
    start, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for batch in iter_batches(model, texts, batch_tokens, context):
            run_to_hook(model, batch, hook)
            n_tokens += int(batch.attention_mask.sum())
    return time.perf_counter() - start, n_tokens, time.process_time() - cpu


def pool_spec(size: int, sample: str, out_dir: Path) -> str:
    """The pool source for ``size`` prompts: the first ``size`` (head) or a seeded random draw
    from the whole pool, written as JSONL under ``out_dir`` (random)."""
    if sample == "head":
        return f"{POOL}#:{size}"
    texts = read_texts(str(POOL)).texts
    if size >= len(texts):
        return str(POOL)
    rows = sorted(np.random.default_rng(0).choice(len(texts), size, replace=False).tolist())
    path = out_dir / f"pool-random-{size}.jsonl"
    path.write_text("".join(json.dumps({"text": texts[i]}) + "\n" for i in rows))
    return str(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 12500])
    parser.add_argument("--sae", default="default")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--workers", type=int, default=0, help="build-lake --workers (0 = auto)")
    parser.add_argument("--cpus-per-worker", type=float, default=0.0, help="build-lake --cpus-per-worker (0 = auto)")
    parser.add_argument("--torch-threads", type=int, default=0, help="build-lake --torch-threads")
    parser.add_argument("--keep", help="write the lakes to KEEP/pool-<size> and keep them (e.g. for bench_scoring)")
    parser.add_argument(
        "--sample",
        choices=["head", "random"],
        default="head",
        help="head: the pool's first N prompts; random: N prompts drawn (seeded) from the whole pool, so a "
        "small pool has the big one's range of lengths (peak memory follows the longest prompts)",
    )
    parser.add_argument("--out", default=str(DATA / "lake.json"), help="where the numbers go (JSON)")
    args = parser.parse_args(argv)
    if not POOL.is_file():
        raise SystemExit(f"the reference pool is not beside this checkout ({POOL}); nothing to measure")
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    hook = load_sae(args.sae).cfg.metadata.hook_name
    rows = []
    records = []
    t_start = time.perf_counter()
    samples = Path(tempfile.mkdtemp(prefix="bench-lake-pools-"))
    for size in args.sizes:
        spec = pool_spec(size, args.sample, samples)
        texts = read_texts(spec).texts
        plain_s, tokens, plain_cpu = plain_loop(texts, hook, args.context, 4096)
        with tempfile.TemporaryDirectory() as tmp, PeakMemory() as mem:
            lake_dir = Path(args.keep) / f"pool-{size}" if args.keep else Path(tmp)
            if args.keep and lake_dir.exists():
                raise SystemExit(f"{lake_dir} exists; needs a fresh lake: remove it or pick another --keep")
            t0 = time.perf_counter()
            manifest = build(
                BuildLakeConfig(
                    lake=str(lake_dir),
                    sae=args.sae,
                    pool=(spec,),
                    context=args.context,
                    workers=args.workers,
                    cpus_per_worker=args.cpus_per_worker,
                    torch_threads=args.torch_threads,
                )
            )
            lake_s = time.perf_counter() - t0
        n = manifest["rows"]["prompts"]
        rows.append((size, n, tokens, plain_s, lake_s, mem))
        print(f"pool {size}: plain loop {plain_s:.1f}s wall, {plain_cpu:.1f} CPU-s; sampler {mem.own_cpu:.1f} CPU-s")
        c = manifest["config"]
        records.append(
            {
                "pool": size,
                "prompts": n,
                "tokens": tokens,
                "plain_s": plain_s,
                "plain_cpu_s": plain_cpu,
                "lake_s": lake_s,
                "plain_tokens_per_s": tokens / plain_s,
                "lake_tokens_per_s": tokens / lake_s,
                "lake_prompts_per_s": n / lake_s,
                "lake_vs_plain": plain_s / lake_s,
                "peak_rss_gib": mem.peak_rss / 2**30,
                "peak_pss_gib": mem.peak_pss / 2**30,
                "peak_rss_gib_by_role": {r: v / 2**30 for r, v in sorted(mem.by_role.items())},
                "cpu_s_by_role": dict(sorted(mem.cpu_by_role.items())),
                "sampler_cpu_s": mem.own_cpu,
                "phases_s": manifest["timings"],
                "lm_actors": c["workers"],
                "embed_actors": c["embed_workers"],
                "cpus_per_actor": c["cpus_per_worker"],
                "embed_precision": c["embed_precision"],
            }
        )
        print(
            f"pool {size}: lake phases {manifest['timings']}; {c['workers']} LM actors + {c['embed_workers']} "
            f"embedding actors at {c['cpus_per_worker']:.2f} CPUs; embeddings {c['embed_precision']}"
        )
    print(f"machine: {os.cpu_count()} CPUs; hook {hook}; SAE {args.sae}")
    print(
        f"{'pool':>6} {'tokens':>8} {'plain tok/s':>11} {'lake tok/s':>10} {'lake prompt/s':>13} "
        f"{'ratio':>6} {'lake wall':>9} {'peak RSS':>9} {'peak PSS':>9}"
    )
    for size, n, tokens, plain_s, lake_s, mem in rows:
        print(
            f"{size:>6} {tokens:>8} {tokens / plain_s:>11.0f} {tokens / lake_s:>10.0f} {n / lake_s:>13.1f} "
            f"{plain_s / lake_s:>6.2f} {lake_s / 60:>7.1f}m {mem.peak_rss / 2**30:>7.2f}G {mem.peak_pss / 2**30:>7.2f}G"
        )
    print("peak RSS by role (GiB): " + ", ".join(f"pool {r[0]}" for r in rows))
    for role in sorted({role for r in rows for role in r[5].by_role}):
        print(f"  {role:<18} " + "  ".join(f"{r[5].by_role.get(role, 0) / 2**30:>6.2f}" for r in rows))
    print("CPU seconds by role during the lake build: " + ", ".join(f"pool {r[0]}" for r in rows))
    for role in sorted({role for r in rows for role in r[5].cpu_by_role}):
        print(f"  {role:<18} " + "  ".join(f"{r[5].cpu_by_role.get(role, 0):>6.1f}" for r in rows))
    print("paper (V100, TransformerLens): set-up 12.4 min for 8K prompts")
    write_result(
        args.out,
        "tests.benchmarks.bench_lake",
        {
            "bench": {"seconds": time.perf_counter() - t_start},
            "config": {
                "pool": "the reference pool beside the checkout (reference_pool.jsonl)",
                "sample": args.sample,
                "sae": args.sae,
                "hook": hook,
                "context": args.context,
                "cpus": os.cpu_count(),
            },
            "rows": records,
            "goal": "lake tokens/s ÷ plain loop tokens/s ≥ 0.8",
            "paper": "V100, TransformerLens: set-up 12.4 min for 8K prompts",
        },
        argv,
    )


if __name__ == "__main__":
    main()
