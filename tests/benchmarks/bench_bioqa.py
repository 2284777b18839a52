"""Benchmark: AlignSAE on the paper's own task (bio-QA relation slots), written to
``docs/data/bioqa.json`` for ``make docs`` (docs/results.md). Runs ``saealign bioqa`` with its
defaults (the trained LM is reused from the cache when present), or reads the report of a run
already made::

    .venv/bin/python -m tests.benchmarks.bench_bioqa [--out out/bioqa] [--from-report out/bioqa/report.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from tests.benchmarks.machine import DATA, write_result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out/bioqa", help="output directory of the run")
    parser.add_argument("--from-report", default=None, help="report.json of a finished `saealign bioqa` run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from workflows.bioqa import BioQAConfig, build, format_report

    done = Path(args.from_report) if args.from_report else None
    report = json.loads(done.read_text()) if done else build(BioQAConfig(out=args.out))
    print(format_report(report))
    swap = report["alignsae"]["swap"]
    payload = {
        "bench": {"wall_s": report["timings"]["wall_s"], "lm_reused": report["lm"]["reused"]},
        "hook": report["hook"],
        "lm": {k: report["lm"][k] for k in ("parameters", "steps", "exact_match", "timings", "world", "lm")},
        "vanilla_sae": report["vanilla_sae"],
        "metrics": {name: report["alignsae"][name] for name in ("vanilla", "aligned")},
        "swap": {k: swap[k] for k in ("n_trials", "by_alpha", "best", "orig", "by_pair") if k in swap},
        "timings": report["timings"],
    }
    write_result(DATA / "bioqa.json", "tests.benchmarks.bench_bioqa", payload, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
