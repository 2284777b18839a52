"""Lake throughput vs a plain loop over the same model, layer and tokens (issue: reference lake).

Run by hand (not in CI), from the repository root with ../shared/data present:

    .venv/bin/python tests/benchmarks/bench_lake.py [--sizes 2000 12500] [--sae default]

For each pool size, in one run on one machine: (a) a plain loop that runs the LM to the SAE's
hook over the pool's tokens (same batching, no SAE, no embeddings, no writes); (b) the build-lake
job on a local Ray (LM + SAE + summaries + MiniLM embeddings + Parquet writes). Prints prompts/s,
tokens/s, their ratio, the lake's wall time next to the paper's set-up time (12.4 min for 8K
prompts on a V100), and the peak resident memory of the driver plus Ray workers.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from ops.activations import iter_batches, run_to_hook
from ops.models import load_model
from ops.saes import load_sae
from ops.texts import read_texts
from workflows.build_lake import BuildLakeConfig, build

POOL = Path(__file__).resolve().parents[3] / "shared" / "data" / "reference_pool.jsonl"


class PeakRSS:
    """Samples the summed RSS of this process and every Ray worker process every 0.5 s."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            total = 0
            for p in psutil.process_iter(["pid", "cmdline", "memory_info"]):
                cmd = " ".join(p.info["cmdline"] or [])
                if p.info["pid"] == me or cmd.startswith("ray::"):
                    total += p.info["memory_info"].rss if p.info["memory_info"] else 0
            self.peak = max(self.peak, total)
            time.sleep(0.5)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def plain_loop(texts: list[str], hook: str, context: int, batch_tokens: int) -> tuple[float, int]:
    model = load_model()
    _ = model.tl
    n_tokens = 0
    start = time.perf_counter()
    with torch.no_grad():
        for batch in iter_batches(model, texts, batch_tokens, context):
            run_to_hook(model, batch, hook)
            n_tokens += int(batch.attention_mask.sum())
    return time.perf_counter() - start, n_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 12500])
    parser.add_argument("--sae", default="default")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--torch-threads", type=int, default=0, help="build-lake --torch-threads")
    parser.add_argument("--keep", help="write the lakes to KEEP/pool-<size> and keep them (e.g. for bench_scoring)")
    args = parser.parse_args()
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    hook = load_sae(args.sae).cfg.metadata.hook_name
    rows = []
    for size in args.sizes:
        spec = f"{POOL}#:{size}"
        texts = read_texts(spec).texts
        plain_s, tokens = plain_loop(texts, hook, args.context, 4096)
        with tempfile.TemporaryDirectory() as tmp, PeakRSS() as rss:
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
                    torch_threads=args.torch_threads,
                )
            )
            lake_s = time.perf_counter() - t0
        n = manifest["rows"]["prompts"]
        rows.append((size, n, tokens, plain_s, lake_s, rss.peak))
    print(f"machine: {os.cpu_count()} CPUs; hook {hook}; SAE {args.sae}")
    print(
        f"{'pool':>6} {'tokens':>8} {'plain tok/s':>11} {'lake tok/s':>10} {'lake prompt/s':>13} "
        f"{'ratio':>6} {'lake wall':>9} {'peak RSS':>9}"
    )
    for size, n, tokens, plain_s, lake_s, peak in rows:
        print(
            f"{size:>6} {tokens:>8} {tokens / plain_s:>11.0f} {tokens / lake_s:>10.0f} {n / lake_s:>13.1f} "
            f"{plain_s / lake_s:>6.2f} {lake_s / 60:>7.1f}m {peak / 2**30:>7.2f}G"
        )
    print("paper (V100, TransformerLens): set-up 12.4 min for 8K prompts")


if __name__ == "__main__":
    main()
