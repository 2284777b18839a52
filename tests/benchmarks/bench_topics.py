"""Steering on four real topics nobody tuned on (not a test; run by hand, minutes on a CPU)::

    .venv/bin/python -m tests.benchmarks.bench_topics            # then: make docs

Builds (or reuses) the embedded demo lake, scores sports, finance and cooking from
``../shared/data/topics/`` and medicine from ``../shared/data/medical.jsonl`` (a seeded sample of
20 texts each; real third-party text beside a development checkout, read in place, never copied),
then runs ``saealign evaluate --topics`` on the first 40 of the embedded neutral prompts with two
seeds and 32 tokens (so that it fits 20 minutes on a 2-core CPU). Writes
the full report to ``out/bench_topics/`` (``--out``) and its numbers (no generated text) with the
machine, date, revision, command and wall time to ``docs/data/topics.json`` (``--json``), from which
``make docs`` renders ``docs/results.md``.

The protocol is that of ``saealign evaluate --topics``: knobs and the best SAE setting are chosen
on one half of the prompts (dev) and only the other half (test) is reported, with bootstrap
intervals over prompts. The topics are never tuned on; to compare two revisions, run both on the
same machine and compare the JSON, not a number from another machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tests.benchmarks.machine import write_result
from workflows import evaluate, score
from workflows.build_lake import BuildLakeConfig, build

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"
TOPICS = {
    "sports": DATA / "topics" / "sports.jsonl",
    "finance": DATA / "topics" / "finance.jsonl",
    "cooking": DATA / "topics" / "cooking.jsonl",
    "medicine": DATA / "medical.jsonl",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lake", default="out/demo/lake")
    parser.add_argument("--out", default="out/bench_topics", help="directory of the full report")
    parser.add_argument(
        "--json", default=str(ROOT / "docs" / "data" / "topics.json"), help="where the numbers go (JSON)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--n-prompts", type=int, default=40)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--align-sample", type=int, default=20)
    args = parser.parse_args(argv)
    missing = [str(p) for p in TOPICS.values() if not p.is_file()]
    if missing:
        print(f"the real topic texts are not beside this checkout ({', '.join(missing)}); nothing to measure")
        return 1
    t0 = time.perf_counter()
    if not (Path(args.lake) / "manifests").is_dir():
        build(BuildLakeConfig(lake=args.lake))
    for topic, path in TOPICS.items():
        score_cfg = score.ScoreConfig(
            lake=args.lake, topic=topic, align_file=(str(path),), align_sample=args.align_sample, replace=True
        )
        score.build(score_cfg)
    t1 = time.perf_counter()
    cfg = evaluate.EvaluateConfig(
        lake=args.lake,
        topics=tuple(TOPICS),
        seeds=tuple(args.seeds),
        n_prompts=args.n_prompts,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        out=args.out,
    )
    report = evaluate.build(cfg)
    t2 = time.perf_counter()
    evaluate.print_suite(report)
    keep = {k: v for k, v in report.items() if k not in ("generations", "prompts")}
    keep["bench"] = {
        "score_topics_s": t1 - t0,
        "evaluate_s": t2 - t1,
        "align_sample": args.align_sample,
        "sources": {t: "../" + str(p.relative_to(ROOT.parent)) for t, p in TOPICS.items()},
    }
    write_result(args.json, "tests.benchmarks.bench_topics", keep, argv)
    print(f"evaluate took {t2 - t1:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
