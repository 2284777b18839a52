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
from typing import Any, Literal

import numpy as np
import torch

from ops.alignsae.metrics import (
    ReconTally,
    best_alpha,
    best_latents,
    binding_accuracy,
    concept_auc,
    entanglement_index,
    geometric_mean,
    swap_success,
)
from ops.alignsae.ontology import Ontology
from ops.alignsae.swaps import (
    AnswerJudge,
    CentroidClassifier,
    ConceptSAE,
    SwapJudge,
    SwapOutcome,
    SwapTrial,
    VanillaConceptSAE,
    answer_of,
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
from ops.steering.engine import Positions, SteeringSpec

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
    """Also run the no-SAE control at every α: add α × (target concept's mean pooled activation −
    source concept's) at the hook (a DiffMean steering vector), judged the same way."""
    max_ppl_increase: float = 0.30
    """Perplexity bound for the best α: the geometric-mean perplexity of its continuations at most
    (1 + this) x that of the unsteered continuations of the same prompts (centroid judge only: an
    exact answer is judged by itself, and its best α is the one of highest success)."""
    swap_judge: Literal["centroid", "answer"] = "centroid"
    """How a swap is judged: 'centroid' (the continuation's nearest concept centroid, MiniLM) or
    'answer' (exact match of the answer with the target concept's answer for the same prompt;
    needs an ontology 'answers' column)."""
    swap_positions: Positions = "all"
    """Where the slot edit is written: 'all' steered positions, or only the 'last_prompt' token."""
    swap_greedy: bool = False
    """Greedy decoding of the swaps (default: top-5 sampling, seeded)."""
    swap_all_targets: bool = False
    """One trial per other concept of the family for each swap prompt (every ordered pair),
    instead of one random target per prompt."""

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
    base: Any,
    data: ConceptData,
    concepts: list[str],
    cfg: AlignTrainConfig,
    seed: int,
    vanilla: VanillaConceptSAE,
) -> tuple[AlignedSAE, list[dict[str, float]]]:
    """AlignSAE from ``base``: concept slots appended and initialised (from ``vanilla``'s latents
    under ``slot_init="vanilla_latent"``), then both stages of
    post-training on the training split (plus generic text for reconstruction)."""
    aligned = AlignedSAE(copy.deepcopy(base), concepts, data.train.families)
    labels = data.train.label_matrix(concepts)
    pooled = data.acts["train"].pooled
    latents = [vanilla.slots[c] for c in concepts] if cfg.slot_init == "vanilla_latent" else None
    init_concept_slots(aligned, pooled, labels, latents)
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
    """Alignment AUC per concept, binding accuracy (train and test: the own slot, over its
    typical activation, is the family's most active), reconstruction (test + held-out generic
    text) and entanglement."""
    slots = [csae.concept_slots[c] for c in concepts]
    acts = encode_in_chunks(csae.encode, data.acts["test"].pooled)[:, slots]
    auc = concept_auc(acts, data.test.label_matrix(concepts))
    entanglement, _ = entanglement_index(acts, mi_bins)
    tally = _recon(csae, data)
    typical = np.array([max(csae.typical_activation(c), 1e-6) for c in concepts])
    families = [data.train.families[c] for c in concepts]
    train_acts = encode_in_chunks(csae.encode, data.acts["train"].pooled)[:, slots]
    binding = {
        "train": binding_accuracy(train_acts / typical, data.train.label_matrix(concepts), families),
        "test": binding_accuracy(acts / typical, data.test.label_matrix(concepts), families),
    }
    return {
        "binding_accuracy": binding,
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
    if cfg.swap_judge == "answer" and data.test.answers is None:
        raise SaealignError("--swap-judge answer needs expected answers; fix: give the ontology an 'answers' column")
    trials = plan_swaps(
        data.test.texts,
        data.test.labels,
        data.train.families,
        cfg.swap_prompts,
        seed,
        answers=data.test.answers,
        all_targets=cfg.swap_all_targets,
    )
    if not trials:
        return {"n_trials": 0, "note": "no family with two concepts: nothing to swap"}, []
    judge: SwapJudge
    if cfg.swap_judge == "answer":
        judge = AnswerJudge()
    else:
        texts = {
            c: [t for t, lab in zip(data.train.texts, data.train.labels, strict=True) if lab == c]
            for c in data.train.concepts
        }
        judge = CentroidClassifier.fit(texts)
    bound = cfg.max_ppl_increase if cfg.swap_judge == "centroid" else None
    run = dict(classifier=judge, max_new_tokens=cfg.swap_max_new_tokens, seed=None if cfg.swap_greedy else seed)
    ref = run_trials(model, trials, **run)  # type: ignore[arg-type]
    ppl_ref = geometric_mean([p for p in ref.perplexities if np.isfinite(p)])
    records = [_record(t, "orig", 0.0, ref, i) for i, t in enumerate(trials)]
    # name -> (the SAE the hook runs, or None; the trials' specs at α)
    where: Positions = cfg.swap_positions
    edits: dict[str, tuple[Any, Callable[[float], list[SteeringSpec]]]] = {
        name: (csae, functools.partial(swap_specs, csae, trials, keep_error=cfg.swap_keep_error, positions=where))
        for name, csae in saes.items()
    }
    if cfg.swap_control:
        # the means of the representation the slots are trained on: one pooled vector per text
        # (the last prompt token under --pooling last, the text's token mean under mean pooling)
        pooled = data.acts["train"].pooled
        means = concept_means(pooled, torch.arange(len(pooled) + 1), data.train.labels)
        edits["diffmean"] = (None, functools.partial(diffmean_specs, means, trials, positions=where))
    rows = []
    for alpha in cfg.swap_alphas:
        row: dict[str, Any] = {"alpha": alpha}
        for name, (sae, specs_at) in edits.items():
            outcome = run_trials(model, trials, hook=hook, sae=sae, specs=specs_at(alpha), **run)  # type: ignore[arg-type]
            row[name] = _swap_row(outcome, trials, ppl_ref)
            if cfg.swap_judge == "answer":
                row[name].update(_answer_stats(outcome, trials))
            records += [_record(t, name, alpha, outcome, i) for i, t in enumerate(trials)]
        log.info("swap α=%s: %s", alpha, row)
        rows.append(row)
    summary: dict[str, Any] = {
        "n_trials": len(trials),
        "judge": cfg.swap_judge,
        "positions": cfg.swap_positions,
        "greedy": cfg.swap_greedy,
        "reference_perplexity": ppl_ref,
        "orig_success": swap_success(ref.predicted, [t.target for t in trials]),
        "max_ppl_increase": bound,
        "by_alpha": rows,
        "best": {name: _best(rows, name, bound) for name in edits},
    }
    if cfg.swap_judge == "answer":
        summary["orig"] = _answer_stats(ref, trials)
        summary["by_pair"] = {
            name: _by_pair(records, name, best["alpha"]) for name, best in summary["best"].items() if best
        }
    return summary, records


def _answer_stats(outcome: SwapOutcome, trials: list[SwapTrial]) -> dict[str, float]:
    """Exact-answer judge: the share of answers still the source concept's (the swap did nothing),
    and the share that are one of the same prompt's answers at all (the rest kept: the same person)."""
    said = [answer_of(t) for t in outcome.continuations]
    pairs = list(zip(said, trials, strict=True))
    return {
        "source_kept": float(np.mean([s == (t.answers or {}).get(t.source) for s, t in pairs])),
        "same_person": float(np.mean([s in (t.answers or {}).values() for s, t in pairs])),
    }


def _by_pair(records: list[dict[str, Any]], name: str, alpha: float) -> dict[str, float]:
    """Success per 'source -> target' pair of ``name``'s swaps at ``alpha``."""
    hits: dict[str, list[bool]] = {}
    for r in records:
        if r["sae"] == name and r["alpha"] == alpha:
            hits.setdefault(f"{r['source']} -> {r['target']}", []).append(r["predicted"] == r["target"])
    return {pair: float(np.mean(v)) for pair, v in hits.items()}


def _best(rows: list[dict[str, Any]], name: str, max_increase: float | None) -> dict[str, Any] | None:
    """``name``'s best α within the perplexity bound (None: no α stays within it); without a
    bound (``max_increase`` None), the α of highest success."""
    if max_increase is None:
        top = max(rows, key=lambda r: (r[name]["success"], -r["alpha"]))
        return {"alpha": top["alpha"], "success": top[name]["success"], "ppl_ratio": top[name]["ppl_ratio"]}
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
