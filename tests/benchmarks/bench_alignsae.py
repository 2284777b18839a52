"""Benchmark: AlignSAE vs the vanilla SAE on ``../shared/data/concepts.jsonl`` (12 concepts in
3 families, fixed seeded 75/25 split per concept), in the paper's table form, plus swap
success vs α. Not a test: run it by hand and read the table::

    .venv/bin/python tests/benchmarks/bench_alignsae.py [--sae DIR] [--out DIR] [--swap-prompts N]

The swap sweep also runs the no-SAE control (``--no-swap-control`` skips it): a DiffMean steering
vector, α × (target concept's mean activation − source concept's mean), judged the same way.

The SAE defaults to the shipped default (``ops/data/sae/default``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONCEPTS = ROOT.parent / "shared" / "data" / "concepts.jsonl"


def _default_sae() -> str:
    from ops.saes.registry import DEFAULT_SAE_DIR

    if (DEFAULT_SAE_DIR / "cfg.json").is_file():
        return "default"
    raise SystemExit("no default SAE: pass --sae DIR (a directory written by saealign train-sae)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sae", default=None, help="base SAE (default: the shipped default SAE)")
    parser.add_argument("--out", default="out/bench_alignsae", help="output directory")
    parser.add_argument("--swap-prompts", type=int, default=16, help="swap prompts per family")
    parser.add_argument("--swap-max-new-tokens", type=int, default=24)
    parser.add_argument("--stage1-steps", type=int, default=100)
    parser.add_argument("--stage2-steps", type=int, default=400)
    parser.add_argument("--lambda-indep", type=float, default=0.0)
    parser.add_argument("--activation-cache", default="out/bench_alignsae_cache")
    parser.add_argument(
        "--swap-control",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the no-SAE DiffMean control at every α (default: on)",
    )
    args = parser.parse_args(argv)
    if not CONCEPTS.is_file():
        raise SystemExit(f"{CONCEPTS} not found: the benchmark needs ../shared/data beside the checkout")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from ops.alignsae.protocol import SwapSweep
    from ops.alignsae.training import AlignTrainConfig
    from workflows.align_sae import AlignSAEConfig, build, format_report

    sae = args.sae or _default_sae()
    cfg = AlignSAEConfig(
        out=args.out,
        sae=sae,
        ontology=str(CONCEPTS),
        swaps=SwapSweep(
            swap_prompts=args.swap_prompts,
            swap_max_new_tokens=args.swap_max_new_tokens,
            swap_control=args.swap_control,
        ),
        train=AlignTrainConfig(
            stage1_steps=args.stage1_steps, stage2_steps=args.stage2_steps, lambda_indep=args.lambda_indep
        ),
        activation_cache=args.activation_cache,
    )
    report = build(cfg)
    table = format_report(report)
    print(f"\nAlignSAE on {CONCEPTS.name} (train {report['n_train']}, test {report['n_test']}), base SAE {sae}")
    print(f"timings: { {k: round(v) for k, v in report['timings'].items()} }\n")
    print(table)
    (Path(args.out) / "table.txt").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
