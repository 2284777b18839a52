"""The AlignSAE protocol (docs/algorithms.md §6): the vanilla baseline, post-training, the metrics
of both SAEs and the concept-swap sweep, on collected hook activations.

``saealign align-sae`` (``workflows/align_sae.py``) reads the inputs, calls these in order and
writes the report; everything measured is computed here.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ops.alignsae.metrics import (
    ReconTally,
    best_alpha,
    best_latents,
    concept_auc,
    entanglement_index,
    geometric_mean,
    swap_success,
)
from ops.alignsae.ontology import Ontology
from ops.alignsae.swaps import (
    CentroidClassifier,
    ConceptSAE,
    SwapOutcome,
    SwapTrial,
    VanillaConceptSAE,
    concept_means,
    diffmean_specs,
    plan_swaps,
    run_trials,
    swap_specs,
)
from ops.alignsae.training import (
    AlignedSAE,
    AlignTrainConfig,
    TextActivations,
    encode_in_chunks,
    init_concept_slots,
    set_typical,
    token_mean_activations,
    train_aligned,
    typical_activations,
)
from ops.errors import SaealignError
from ops.models.lm import LanguageModel
from ops.steering.engine import SteeringSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SwapSweep:
    """The concept-swap evaluation: which α, how many prompts, how each swap is written and judged."""

    swap_alphas: tuple[float, ...] = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0)
    """Values of α for the concept-swap sweep."""
    swap_prompts: int = 24
    """Swap prompts per family (test texts); 0 skips the swap evaluation."""
    swap_max_new_tokens: int = 24
    """Tokens generated per swap."""
    swap_keep_error: bool = True
    """Add the SAE error back when writing the edited activation (only the slots change)."""
    swap_control: bool = False
    """Also run the no-SAE control at every α: add α × (target concept's mean activation − source
    concept's mean) at the hook (a DiffMean steering vector), judged the same way."""
    max_ppl_increase: float = 0.30
    """Perplexity bound for the best α: the geometric-mean perplexity of its continuations at most
    (1 + this) x that of the unsteered continuations of the same prompts."""

    def __post_init__(self) -> None:
        if not self.swap_alphas or any(a <= 0 for a in self.swap_alphas):
            raise SaealignError("--swap-alphas must be positive")


@dataclass
class ConceptData:
    """An ontology split and the hook activations of its texts (train, test, generic, generic_eval)."""

    train: Ontology
    test: Ontology
    acts: dict[str, TextActivations]


def vanilla_baseline(base: Any, data: ConceptData, concepts: list[str]) -> VanillaConceptSAE:
    """The paper's baseline: per concept, the base SAE's single best latent on the training split."""
    acts = encode_in_chunks(base.encode, data.acts["train"].pooled)
    best, train_auc = best_latents(acts, data.train.label_matrix(concepts))
    typical = typical_activations(acts[:, best], data.train.label_matrix(concepts))
    log.info("vanilla best latents: %s (train AUC %s)", best.tolist(), np.round(train_auc, 3).tolist())
    return VanillaConceptSAE(
        base, dict(zip(concepts, best.tolist(), strict=True)), dict(zip(concepts, typical.tolist(), strict=True))
    )


def post_train(
    base: Any, data: ConceptData, concepts: list[str], cfg: AlignTrainConfig, seed: int
) -> tuple[AlignedSAE, list[dict[str, float]]]:
    """AlignSAE from ``base``: concept slots appended and initialised, then both stages of
    post-training on the training split (plus generic text for reconstruction)."""
    aligned = AlignedSAE(copy.deepcopy(base), concepts, data.train.families)
    labels = data.train.label_matrix(concepts)
    pooled = data.acts["train"].pooled
    init_concept_slots(aligned, pooled, labels)
    train = data.acts["train"]
    token_labels = np.repeat(labels.argmax(1), np.diff(train.offsets.numpy()))
    tokens, token_labels_all = [train.tokens], [token_labels]
    if "generic" in data.acts:
        tokens.append(data.acts["generic"].tokens)
        token_labels_all.append(np.full(len(data.acts["generic"].tokens), -1))
    history = train_aligned(aligned, torch.cat(tokens), np.concatenate(token_labels_all), pooled, labels, cfg, seed)
    set_typical(aligned, pooled, labels)
    return aligned, history


@torch.no_grad()
def _recon(csae: ConceptSAE, data: ConceptData, chunk: int = 4096) -> ReconTally:
    tally = ReconTally()
    for key in ("test", "generic_eval"):
        if key in data.acts:
            tokens = data.acts[key].tokens
            for i in range(0, len(tokens), chunk):
                x = tokens[i : i + chunk].float()
                tally.add(x, csae.decode(csae.encode(x)))
    return tally


def sae_metrics(csae: ConceptSAE, data: ConceptData, concepts: list[str], mi_bins: int) -> dict[str, Any]:
    """Alignment AUC per concept, reconstruction (test + held-out generic text) and entanglement."""
    slots = [csae.concept_slots[c] for c in concepts]
    acts = encode_in_chunks(csae.encode, data.acts["test"].pooled)[:, slots]
    auc = concept_auc(acts, data.test.label_matrix(concepts))
    entanglement, _ = entanglement_index(acts, mi_bins)
    tally = _recon(csae, data)
    return {
        "auc_mean": float(np.nanmean(auc)),
        "auc": dict(zip(concepts, auc.round(4).tolist(), strict=True)),
        "mse": tally.mse,
        "explained_variance": tally.explained_variance,
        "entanglement": entanglement,
        "recon_tokens": tally.n,
    }


def token_mean_auc(base: Any, aligned: AlignedSAE, data: ConceptData, concepts: list[str]) -> dict[str, float]:
    """Alignment AUC with the token-mean summary instead of the pooled vector (a robustness
    check: vanilla latents re-chosen on the training split under this summary)."""
    train, test = data.train.label_matrix(concepts), data.test.label_matrix(concepts)
    best, _ = best_latents(token_mean_activations(base.encode, data.acts["train"]), train)
    vanilla = token_mean_activations(base.encode, data.acts["test"])[:, best]
    slots = token_mean_activations(lambda x: torch.relu(aligned.concept_pre(x)), data.acts["test"])
    return {
        "vanilla": float(np.nanmean(concept_auc(vanilla, test))),
        "aligned": float(np.nanmean(concept_auc(slots, test))),
    }


def _swap_row(outcome: SwapOutcome, trials: list[SwapTrial], ppl_ref: float) -> dict[str, float]:
    finite = [p for p in outcome.perplexities if np.isfinite(p)]
    return {
        "success": swap_success(outcome.predicted, [t.target for t in trials]),
        "ppl_ratio": geometric_mean(finite) / ppl_ref if finite else float("nan"),
    }


def swap_sweep(
    cfg: SwapSweep, model: LanguageModel, hook: str, data: ConceptData, saes: dict[str, ConceptSAE], seed: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Concept swaps on test prompts at every α, for each SAE of ``saes`` (and the DiffMean control
    when asked), judged by a centroid classifier fit on the training texts. Returns the summary
    (success and perplexity ratio per α, the best α within the perplexity bound) and every
    continuation as a record."""
    trials = plan_swaps(data.test.texts, data.test.labels, data.train.families, cfg.swap_prompts, seed)
    if not trials:
        return {"n_trials": 0, "note": "no family with two concepts: nothing to swap"}, []
    texts = {
        c: [t for t, lab in zip(data.train.texts, data.train.labels, strict=True) if lab == c]
        for c in data.train.concepts
    }
    classifier = CentroidClassifier.fit(texts)
    run = dict(classifier=classifier, max_new_tokens=cfg.swap_max_new_tokens, seed=seed)
    ref = run_trials(model, trials, **run)  # type: ignore[arg-type]
    ppl_ref = geometric_mean([p for p in ref.perplexities if np.isfinite(p)])
    records = [_record(t, "orig", 0.0, ref, i) for i, t in enumerate(trials)]
    # name -> (the SAE the hook runs, or None; the trials' specs at α)
    edits: dict[str, tuple[Any, Callable[[float], list[SteeringSpec]]]] = {
        name: (csae, functools.partial(swap_specs, csae, trials, keep_error=cfg.swap_keep_error))
        for name, csae in saes.items()
    }
    if cfg.swap_control:
        train = data.acts["train"]
        means = concept_means(train.tokens, train.offsets, data.train.labels)
        edits["diffmean"] = (None, functools.partial(diffmean_specs, means, trials))
    rows = []
    for alpha in cfg.swap_alphas:
        row: dict[str, Any] = {"alpha": alpha}
        for name, (sae, specs_at) in edits.items():
            outcome = run_trials(model, trials, hook=hook, sae=sae, specs=specs_at(alpha), **run)  # type: ignore[arg-type]
            row[name] = _swap_row(outcome, trials, ppl_ref)
            records += [_record(t, name, alpha, outcome, i) for i, t in enumerate(trials)]
        log.info("swap α=%s: %s", alpha, row)
        rows.append(row)
    summary = {
        "n_trials": len(trials),
        "reference_perplexity": ppl_ref,
        "orig_success": swap_success(ref.predicted, [t.target for t in trials]),
        "max_ppl_increase": cfg.max_ppl_increase,
        "by_alpha": rows,
        "best": {name: _best(rows, name, cfg.max_ppl_increase) for name in edits},
    }
    return summary, records


def _best(rows: list[dict[str, Any]], name: str, max_increase: float) -> dict[str, Any] | None:
    """``name``'s best α within the perplexity bound (None: no α stays within it)."""
    best = best_alpha([(r["alpha"], r[name]["success"], r[name]["ppl_ratio"]) for r in rows], max_increase)
    return None if best is None else dict(zip(("alpha", "success", "ppl_ratio"), best, strict=True))


def _record(trial: SwapTrial, sae: str, alpha: float, outcome: SwapOutcome, i: int) -> dict[str, Any]:
    return {
        "sae": sae,
        "alpha": alpha,
        "source": trial.source,
        "target": trial.target,
        "prompt": trial.prompt,
        "continuation": outcome.continuations[i],
        "predicted": outcome.predicted[i],
        "perplexity": outcome.perplexities[i],
    }


def vs_vanilla(report: dict[str, Any]) -> dict[str, float]:
    """AlignSAE beside the vanilla baseline, measured: AUC gain, MSE and entanglement ratios."""
    van, ali = report["vanilla"], report["aligned"]
    return {
        "auc_gain": ali["auc_mean"] - van["auc_mean"],
        "mse_ratio": ali["mse"] / van["mse"] if van["mse"] else float("nan"),
        "entanglement_ratio": ali["entanglement"] / van["entanglement"] if van["entanglement"] else float("nan"),
    }
