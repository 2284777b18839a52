"""``saealign``: one entry point, one sub-command per job (modules imported lazily)."""

from __future__ import annotations

import importlib
import logging
import sys

from ops.errors import SaealignError

# job name -> (module in workflows/, one-line summary)
JOBS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "run the main job on the embedded default: lake, medical scores, evaluation report"),
    "train-sae": ("train_sae", "train an SAE on a model's hook activations (sae-lens), with an eval report"),
    "build-lake": ("build_lake", "Ray Data job: embeddings + sparse prompt-level SAE activations -> Parquet"),
    "score": ("score", "score every SAE latent for a topic with DuckDB; --check runs the top-k check"),
    "query": ("query", "read-only SQL over the lake's tables"),
    "generate": ("generate", "steered generation (orig, sae, clamp, swap, weight) with contamination"),
    "serve": ("serve", "Ray Serve aligned-generation service and web page"),
    "submit": ("submit", "submit a job to a Ray cluster and stream its logs"),
    "jobs": ("submit", "list the jobs of a Ray cluster"),
    "align-sae": ("align_sae", "AlignSAE: post-train an SAE so that slots bind to concepts"),
    "bioqa": ("bioqa", "AlignSAE on the bio-QA task: world, LM, vanilla SAE, relation slots, swaps, report"),
    "evaluate": ("evaluate", "evaluate steering methods on prompts; JSON + HTML report"),
}


def _usage() -> str:
    width = max(map(len, JOBS))
    lines = [
        "usage: saealign <job> [options]   (saealign <job> --help for the job's options)",
        "",
        "jobs:",
    ]
    lines += [f"  {name.ljust(width)}  {summary}" for name, (_, summary) in JOBS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    job, rest = args[0], args[1:]
    if job not in JOBS:
        print(f"saealign: unknown job '{job}'\n\n{_usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    module_name, _ = JOBS[job]
    module = importlib.import_module(f"workflows.{module_name}")
    entry = getattr(module, "main_" + job.replace("-", "_"), None) or module.main
    try:
        return int(entry(rest) or 0)
    except SaealignError as exc:
        print(f"saealign {job}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
