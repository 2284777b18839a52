"""Benchmark: steered generation vs plain generation, side by side in one run (not a test).

    .venv/bin/python -m tests.benchmarks.bench_generation [--sae DIR] [--tokens 64] [--repeats 3]

Every row generates ``--tokens`` new tokens (top-k 5 sampling, seed 0, no stop at EOS) for the
same prompt. Time per token = wall time of the whole call (tokenize, prefill, decode) / tokens;
the median of ``--repeats`` round-robin runs (TransformerLens rows: one run, they are slow). Ratios are
against Hugging Face ``generate`` with no hook. Acceptance (issue): Swap ÷ plain ≤ 1.25 at
batch 1; batch 8 throughput ≥ 4× batch 1.

The SAE defaults to the shipped one, else a random TopK SAE of the same shape (d_sae 4,608,
k 32): the cost of the hook does not depend on the trained weights. Scores are random.
Writes the table with the machine, date and command to ``docs/data/generation.json`` (``--out``),
from which ``make docs`` renders ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ops.models.lm import load_model
from ops.saes.registry import DEFAULT_SAE_DIR, load_sae
from ops.steering.engine import SteeringSpec, special_ids_of, steering_hook, tl_steering_hook
from ops.steering.generation import SamplingParams, generate
from tests.benchmarks.machine import DATA, write_result

PROMPT = "My heart is broken, so I should"
HOOK = "blocks.6.hook_resid_post"


def _sae(path: str | None, d_in: int) -> tuple[Any, str]:
    for candidate in [path, str(DEFAULT_SAE_DIR)]:
        if candidate and (Path(candidate) / "cfg.json").is_file():
            return load_sae(candidate), candidate
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    torch.manual_seed(0)
    cfg = TopKSAEConfig(d_in=d_in, d_sae=4608, k=32, metadata=SAEMetadata(hook_name=HOOK))
    sae = TopKSAE(cfg)
    with torch.no_grad():
        sae.W_enc.normal_(0, d_in**-0.5)
        sae.W_dec.copy_(sae.W_enc.T)
    return sae.eval(), "random TopK d_sae=4608 k=32"


def _time(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sae", default=None, help="sae-lens directory (default: the shipped SAE, else random)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--skip-tl", action="store_true", help="skip the slow TransformerLens rows")
    ap.add_argument("--out", default=str(DATA / "generation.json"), help="where the numbers go (JSON)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    model = load_model()
    sae, sae_name = _sae(args.sae, model.d_model)
    hook = getattr(sae.cfg.metadata, "hook_name", None) or HOOK
    scores = torch.rand(sae.cfg.d_sae, generator=torch.Generator().manual_seed(0))
    specs = {m: SteeringSpec(m, scores) for m in ("sae", "clamp", "swap", "weight")}  # type: ignore[arg-type]
    n, params = args.tokens, SamplingParams(max_new_tokens=args.tokens, seed=0, stop_at_eos=False)
    ids = torch.tensor([model.tokenize([PROMPT])[0]])
    special = special_ids_of(model.tokenizer)

    def hf_generate(spec: SteeringSpec | None) -> Callable[[], Any]:
        kw = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": True, "top_k": 5}

        def run() -> Any:
            torch.manual_seed(0)
            if spec is None:
                return model.hf.generate(ids, attention_mask=torch.ones_like(ids), **kw)
            with steering_hook(model.hf, sae, hook, spec, special):
                return model.hf.generate(ids, attention_mask=torch.ones_like(ids), **kw)

        return run

    def ours(spec: SteeringSpec | None, batch: int = 1) -> Callable[[], Any]:
        return lambda: generate(model, sae, [PROMPT] * batch, spec, hook_name=hook, params=params, batch_size=batch)

    def tl_generate(spec: SteeringSpec | None) -> Callable[[], Any]:
        def run() -> Any:
            kw = {"max_new_tokens": n, "top_k": 5, "do_sample": True, "stop_at_eos": False, "verbose": False}
            if spec is None:
                return model.tl.generate(ids, **kw)
            fn, _ = tl_steering_hook(sae, spec)
            with model.tl.hooks(fwd_hooks=[(hook, fn)]):
                return model.tl.generate(ids, **kw)

        return run

    ours(specs["swap"])()  # warm-up: kernels, caches
    hf_generate(None)()
    rows: list[tuple[str, int, float]] = []  # (label, batch, seconds per call)
    cases: list[tuple[str, int, Callable[[], Any]]] = [
        ("HF generate, no hook", 1, hf_generate(None)),
        ("HF generate + swap hook", 1, hf_generate(specs["swap"])),
        ("ops.steering.generation, no hook", 1, ours(None)),
        ("ops.steering.generation, orig (no SAE work)", 1, ours(SteeringSpec("orig"))),
        *[(f"ops.steering.generation, {m}", 1, ours(s)) for m, s in specs.items()],
        (f"ops.steering.generation, no hook, batch {args.batch}", args.batch, ours(None, args.batch)),
        (f"ops.steering.generation, swap, batch {args.batch}", args.batch, ours(specs["swap"], args.batch)),
    ]
    times: dict[str, list[float]] = {label: [] for label, _, _ in cases}
    for _ in range(args.repeats):  # round-robin, so that load drift hits every case alike
        for label, _, fn in cases:
            times[label].append(_time(fn, 1))
            print(f"  {label}: {times[label][-1]:.1f}s", file=sys.stderr, flush=True)
    rows += [(label, batch, statistics.median(times[label])) for label, batch, _ in cases]
    if not args.skip_tl:
        model.tl  # noqa: B018 - build the TransformerLens view outside the timed region
        for label, spec in (
            ("TransformerLens generate, no hook", None),
            ("TransformerLens generate, swap", specs["swap"]),
        ):
            rows.append((label, 1, _time(tl_generate(spec), 1)))

    base = rows[0][2] / n
    print(
        f"\nSAE: {sae_name}; hook {hook}; {n} new tokens; threads {torch.get_num_threads()}; median of {args.repeats}"
    )
    print(f"{'path':<42} {'batch':>5} {'s/token':>9} {'tokens/s':>9} {'÷ HF plain':>11}")
    for label, batch, sec in rows:
        spt = sec / n
        print(f"{label:<42} {batch:>5} {spt:>9.4f} {batch * n / sec:>9.1f} {spt / base:>11.2f}")
    by = {label: sec for label, _, sec in rows}
    swap_ratio = by["ops.steering.generation, swap"] / rows[0][2]
    tput1 = n / by["ops.steering.generation, swap"]
    tput8 = args.batch * n / by[f"ops.steering.generation, swap, batch {args.batch}"]
    print(f"\nswap (ops.steering.generation) ÷ HF generate plain, batch 1: {swap_ratio:.3f}  (target ≤ 1.25)")
    print(f"swap throughput batch {args.batch} ÷ batch 1: {tput8 / tput1:.2f}×  (target ≥ 4)")
    write_result(
        args.out,
        "tests.benchmarks.bench_generation",
        {
            "bench": {"seconds": time.perf_counter() - t_start},
            "config": {
                "sae": sae_name,
                "hook": hook,
                "prompt": PROMPT,
                "tokens": n,
                "repeats": args.repeats,
                "batch": args.batch,
                "threads": torch.get_num_threads(),
                "sampling": "top-k 5, seed 0, no stop at EOS",
            },
            "rows": [
                {
                    "path": label,
                    "batch": batch,
                    "seconds": sec,
                    "s_per_token": sec / n,
                    "tokens_per_s": batch * n / sec,
                    "vs_hf_plain": (sec / n) / base,
                    "median_of": 1 if label.startswith("TransformerLens") else args.repeats,
                }
                for label, batch, sec in rows
            ],
            "ratios": [
                {
                    "what": "Swap (ops.steering.generation) ÷ HF generate with no hook, s/token, batch 1",
                    "value": swap_ratio,
                    "goal": "≤ 1.25",
                    "met": swap_ratio <= 1.25,
                },
                {
                    "what": f"Swap tokens/s, batch {args.batch} ÷ batch 1",
                    "value": tput8 / tput1,
                    "goal": "≥ 4",
                    "met": tput8 / tput1 >= 4,
                },
            ],
        },
        argv,
    )


if __name__ == "__main__":
    main()
