"""Benchmark: the no-SAE concept-swap control at several layers of the embedded model.

The AlignSAE benchmark judges concept swaps at the shipped SAE's layer (6). This one asks whether
another layer would do better before an SAE is trained there: for each layer it adds the DiffMean
steering vector α × (mean activation of the target concept's training texts − that of the
source's) at ``blocks.L.hook_resid_post``, on the same 48 trials, classifier and perplexity bound
as ``saealign align-sae`` (``../shared/data/concepts.jsonl``, seeded 75/25 split). Not a test::

    .venv/bin/python tests/benchmarks/bench_swap_layers.py [--layers 6 15 24] [--alphas 0.5 1 2 3 5]

Prints success and perplexity ratio per (layer, α) and the best α within the bound per layer.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONCEPTS = ROOT.parent / "shared" / "data" / "concepts.jsonl"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[6, 15, 24])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.5, 1.0, 2.0, 3.0, 5.0])
    parser.add_argument("--swap-prompts", type=int, default=16, help="swap prompts per family")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--max-ppl-increase", type=float, default=0.30)
    parser.add_argument("--out", default="out/bench_swap_layers.json")
    args = parser.parse_args(argv)
    if not CONCEPTS.is_file():
        raise SystemExit(f"{CONCEPTS} not found: the benchmark needs ../shared/data beside the checkout")

    import numpy as np

    from ops.alignsae.metrics import best_alpha, geometric_mean, swap_success
    from ops.alignsae.ontology import load_ontology, split_ontology
    from ops.alignsae.swaps import CentroidClassifier, concept_means, diffmean_specs, plan_swaps, run_trials
    from ops.alignsae.training import collect_text_activations
    from ops.models.lm import load_model

    train, test = split_ontology(load_ontology(str(CONCEPTS)), 0.25, seed=0)
    model = load_model("smollm2-135m")
    trials = plan_swaps(test.texts, test.labels, train.families, args.swap_prompts, seed=0)
    texts = {c: [t for t, lab in zip(train.texts, train.labels, strict=True) if lab == c] for c in train.concepts}
    run = dict(classifier=CentroidClassifier.fit(texts), max_new_tokens=args.max_new_tokens, seed=0)
    targets = [t.target for t in trials]
    ref = run_trials(model, trials, **run)  # type: ignore[arg-type]
    ppl_ref = geometric_mean([p for p in ref.perplexities if np.isfinite(p)])
    print(
        f"{len(trials)} trials; unsteered success {swap_success(ref.predicted, targets):.0%}, perplexity {ppl_ref:.2f}"
    )
    report: dict[str, object] = {"n_trials": len(trials), "reference_perplexity": ppl_ref, "layers": {}}
    for layer in args.layers:
        t0 = time.perf_counter()
        hook = f"blocks.{layer}.hook_resid_post"
        acts = collect_text_activations(model, train.texts, hook)
        means = concept_means(acts.tokens, acts.offsets, train.labels)
        rows = []
        for alpha in args.alphas:
            out = run_trials(model, trials, hook=hook, specs=diffmean_specs(means, trials, alpha), **run)  # type: ignore[arg-type]
            ppl = geometric_mean([p for p in out.perplexities if np.isfinite(p)]) / ppl_ref
            rows.append((alpha, swap_success(out.predicted, targets), ppl))
            print(f"layer {layer:>2}  α {alpha:<4g} success {rows[-1][1]:>4.0%}  perplexity × {ppl:.2f}", flush=True)
        best = best_alpha(rows, args.max_ppl_increase)
        cell = f"{best[1]:.0%} at α {best[0]:g} (× {best[2]:.2f})" if best else "none"
        print(
            f"layer {layer:>2}  best within × {1 + args.max_ppl_increase:g}: {cell}  [{time.perf_counter() - t0:.0f}s]"
        )
        report["layers"][str(layer)] = {"rows": rows, "best": best}  # type: ignore[index]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
