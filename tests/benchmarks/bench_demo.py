"""The demo's numbers with the machine, date and command (not a test; the demo itself, minutes on a CPU)::

    .venv/bin/python -m tests.benchmarks.bench_demo            # then: make docs
    .venv/bin/python -m tests.benchmarks.bench_demo --out /tmp/demo-cold --json /tmp/demo.json

Runs the job of ``make demo`` (``saealign demo``: the lake from the embedded pool with the shipped
SAE, the embedded medical topic, every setting on the embedded demo prompts) and writes its numbers
(no generated text) to ``docs/data/demo.json`` (``--json``), from which ``make docs`` renders the
demo section of ``docs/results.md``. Every other option is the demo's own (``saealign demo
--help``).

The demo reuses a complete lake and a scored topic from an earlier run in ``--out``; its set-up
costs are then those of the earlier build (recorded in the lake's manifest). For a cold run, point
``--out`` at an empty directory. Nothing is tuned on the demo prompts: the recommendation rule
(lowest distance within 1.5× orig's median perplexity) is fixed in ``ops.evals.methods``.

The perplexity ratio is the noisiest number: top-k sampling over many tokens amplifies any small
change in the logits (another lake's embeddings, another revision), so one seed can move it
across a goal's line. To judge a change, run several seeds (``--seeds 0 1 2``) on the same
machine; ``saealign evaluate --topics`` (``bench_topics``) adds a dev/test split and bootstrap
intervals.
"""

from __future__ import annotations

import argparse
import time

from tests.benchmarks.machine import DATA, write_result
from workflows import demo, evaluate
from workflows._config import parse_config

KEEP = ("config", "topic", "dataset", "summary", "recommendation", "goals", "costs", "coverage", "topk_check")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
    parser.add_argument("--json", default=str(DATA / "demo.json"), help="where the numbers go (JSON)")
    args, rest = parser.parse_known_args(argv)
    cfg = parse_config(demo.DemoConfig, rest, "python -m tests.benchmarks.bench_demo")
    t0 = time.perf_counter()
    report = demo.build(cfg)
    evaluate.print_summary(report)
    payload = {k: report[k] for k in KEEP if k in report}
    payload["bench"] = {"seconds": time.perf_counter() - t0, "n_prompts": len(report["prompts"])}
    write_result(args.json, "tests.benchmarks.bench_demo", payload, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
