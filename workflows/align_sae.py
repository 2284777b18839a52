"""``saealign align-sae``: AlignSAE post-training (docs/algorithms.md §6) and its report, vanilla vs aligned.

Steps: read and split the ontology (stratified, seeded), run the model once to the SAE's hook
over the ontology texts and some generic text (pooled vectors + per-token activations), pick
the vanilla baseline (best single latent per concept on the training split), post-train the
aligned SAE (``ops.alignsae.training``: appended concept slots, stage 1 reconstruction, stage 2 +
binding), save it, then measure both on the test split: alignment AUC, reconstruction MSE /
explained variance (test ontology text + held-out generic text), entanglement index, and
concept-swap success vs α (``ops.alignsae.swaps``).

Output directory: the aligned SAE (sae-lens ``cfg.json`` + ``sae_weights.safetensors`` +
``concept_slots.safetensors``; load with ``ops.alignsae.training.load_aligned_sae``), ``report.json``,
``swaps.jsonl`` (every continuation) and ``manifest.json`` (config, concept -> slot index).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

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
from ops.alignsae.ontology import Ontology, check_concepts, load_ontology, split_ontology
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
    check_base_sae,
    collect_text_activations,
    encode_in_chunks,
    init_concept_slots,
    set_typical,
    token_mean_activations,
    train_aligned,
    typical_activations,
)
from ops.errors import SaealignError
from ops.manifest import base_manifest, write_json_atomic
from ops.models.lm import EMBEDDED_MODEL, LanguageModel, load_model, resolve_device
from ops.saes.registry import check_sae_fits, load_sae
from ops.steering.engine import SteeringSpec
from ops.texts import read_many
from workflows._config import parse_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AlignSAEConfig:
    """AlignSAE: post-train an SAE so that one slot per concept binds to it; report vs vanilla."""

    out: str = "out/alignsae"
    """Output directory: aligned SAE (sae-lens files + concept_slots.safetensors), report.json, manifest.json."""
    sae: str = "default"
    """Pre-trained SAE: 'default', a sae-lens directory (saealign train-sae), or saelens:<release>/<id>."""
    model: str = EMBEDDED_MODEL
    """Language model the SAE reads (registry or TransformerLens name)."""
    hook: str | None = None
    """Hook point; default: the one recorded in the SAE."""
    ontology: str = "embedded:ontology"
    """Labelled concepts: JSONL/CSV/Parquet with text, label (and optional family), a YAML
    concept -> texts mapping, or embedded:ontology."""
    concepts: tuple[str, ...] = ()
    """Concepts to align (default: all of the ontology)."""
    test_fraction: float = 0.25
    """Share of each concept's texts held out for the test split."""
    min_texts: int = 10
    """Fewest texts a concept may have."""
    generic_sources: tuple[str, ...] = ("embedded:pool",)
    """Unlabelled text added to the reconstruction data (and held out for its evaluation)."""
    generic_texts: int = 600
    """Generic texts used for training."""
    generic_eval_texts: int = 150
    """Further generic texts held out for the reconstruction metrics."""
    pooling: Literal["mean", "last"] = "mean"
    """Text-level activation: the hook vector averaged over counted positions, or the last one."""
    context: int = 128
    """Tokens per text (longer texts are truncated)."""
    train: AlignTrainConfig = field(default_factory=AlignTrainConfig)
    """Post-training hyper-parameters (their options: --stage1-steps … --train-concept-decoder)."""
    mi_bins: int = 4
    """Bins for the entanglement index: 1 inactive bin + equal-frequency bins of active values."""
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
    activation_cache: str | None = None
    """Directory to keep the collected hook activations in (keyed by model, hook, texts); reused on reruns."""
    seed: int = 0
    """Seed for the split, the training batches, generic-text choice and sampling."""
    device: str = "auto"
    """'auto' (cuda when available), 'cpu' or 'cuda'."""

    def __post_init__(self) -> None:
        if self.context < 2:
            raise SaealignError("--context must be at least 2")
        if any(a <= 0 for a in self.swap_alphas):
            raise SaealignError("--swap-alphas must be positive")


@dataclass
class _Data:
    train: Ontology
    test: Ontology
    acts: dict[str, TextActivations]


def _generic(cfg: AlignSAEConfig) -> tuple[list[str], list[str]]:
    texts = [t for table in read_many(list(cfg.generic_sources)) for t in table.texts if t.strip()]
    random.Random(cfg.seed).shuffle(texts)
    return texts[: cfg.generic_texts], texts[cfg.generic_texts : cfg.generic_texts + cfg.generic_eval_texts]


def _ontology(cfg: AlignSAEConfig) -> tuple[Ontology, Ontology]:
    ontology = load_ontology(cfg.ontology, cfg.min_texts)
    if cfg.concepts:
        check_concepts(ontology, cfg.concepts)
        ontology = ontology.select(cfg.concepts)
    return split_ontology(ontology, cfg.test_fraction, cfg.seed)


def _collect(cfg: AlignSAEConfig, model: LanguageModel, hook: str) -> _Data:
    train, test = _ontology(cfg)
    generic_train, generic_eval = _generic(cfg)
    sets = {"train": train.texts, "test": test.texts, "generic": generic_train, "generic_eval": generic_eval}
    acts = {name: _activations(cfg, model, hook, name, texts) for name, texts in sets.items() if texts}
    return _Data(train, test, acts)


def _activations(
    cfg: AlignSAEConfig, model: LanguageModel, hook: str, name: str, texts: Sequence[str]
) -> TextActivations:
    def run() -> TextActivations:
        return collect_text_activations(model, texts, hook, cfg.context, cfg.pooling, desc=f"activations ({name})")

    if not cfg.activation_cache:
        return run()
    key = hashlib.sha1(json.dumps([model.name, hook, cfg.context, cfg.pooling, texts]).encode()).hexdigest()[:16]
    path = Path(cfg.activation_cache) / f"{name}-{key}.pt"
    if path.is_file():
        log.info("activations (%s) from %s", name, path)
        return TextActivations(**torch.load(path))
    acts = run()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"tokens": acts.tokens, "offsets": acts.offsets, "pooled": acts.pooled}, path)
    return acts


def _labels(split: Ontology, concepts: list[str]) -> np.ndarray:
    index = {c: j for j, c in enumerate(concepts)}
    out = np.zeros((len(split.texts), len(concepts)), dtype=bool)
    out[np.arange(len(split.texts)), [index[lab] for lab in split.labels]] = True
    return out


def _vanilla(base: Any, data: _Data, concepts: list[str]) -> VanillaConceptSAE:
    acts = encode_in_chunks(base.encode, data.acts["train"].pooled)
    best, train_auc = best_latents(acts, _labels(data.train, concepts))
    typical = typical_activations(acts[:, best], _labels(data.train, concepts))
    log.info("vanilla best latents: %s (train AUC %s)", best.tolist(), np.round(train_auc, 3).tolist())
    return VanillaConceptSAE(
        base, dict(zip(concepts, best.tolist(), strict=True)), dict(zip(concepts, typical.tolist(), strict=True))
    )


def _align(
    cfg: AlignSAEConfig, base: Any, data: _Data, concepts: list[str]
) -> tuple[AlignedSAE, list[dict[str, float]]]:
    aligned = AlignedSAE(copy.deepcopy(base), concepts, data.train.families)
    labels = _labels(data.train, concepts)
    pooled = data.acts["train"].pooled
    init_concept_slots(aligned, pooled, labels)
    train = data.acts["train"]
    token_labels = np.repeat(labels.argmax(1), np.diff(train.offsets.numpy()))
    tokens, token_labels_all = [train.tokens], [token_labels]
    if "generic" in data.acts:
        tokens.append(data.acts["generic"].tokens)
        token_labels_all.append(np.full(len(data.acts["generic"].tokens), -1))
    history = train_aligned(
        aligned, torch.cat(tokens), np.concatenate(token_labels_all), pooled, labels, cfg.train, cfg.seed
    )
    set_typical(aligned, pooled, labels)
    return aligned, history


@torch.no_grad()
def _recon(csae: ConceptSAE, data: _Data, chunk: int = 4096) -> ReconTally:
    tally = ReconTally()
    for key in ("test", "generic_eval"):
        if key in data.acts:
            tokens = data.acts[key].tokens
            for i in range(0, len(tokens), chunk):
                x = tokens[i : i + chunk].float()
                tally.add(x, csae.decode(csae.encode(x)))
    return tally


def _metrics(csae: ConceptSAE, data: _Data, concepts: list[str], mi_bins: int) -> dict[str, Any]:
    slots = [csae.concept_slots[c] for c in concepts]
    acts = encode_in_chunks(csae.encode, data.acts["test"].pooled)[:, slots]
    auc = concept_auc(acts, _labels(data.test, concepts))
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


def _token_mean_auc(base: Any, aligned: AlignedSAE, data: _Data, concepts: list[str]) -> dict[str, float]:
    """Alignment AUC with the token-mean summary instead of the pooled vector (a robustness
    check: vanilla latents re-chosen on the training split under this summary)."""
    train, test = _labels(data.train, concepts), _labels(data.test, concepts)
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


def _swaps(
    cfg: AlignSAEConfig, model: LanguageModel, hook: str, data: _Data, saes: dict[str, ConceptSAE]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    trials = plan_swaps(data.test.texts, data.test.labels, data.train.families, cfg.swap_prompts, cfg.seed)
    if not trials:
        return {"n_trials": 0, "note": "no family with two concepts: nothing to swap"}, []
    texts = {
        c: [t for t, lab in zip(data.train.texts, data.train.labels, strict=True) if lab == c]
        for c in data.train.concepts
    }
    classifier = CentroidClassifier.fit(texts)
    run = dict(classifier=classifier, max_new_tokens=cfg.swap_max_new_tokens, seed=cfg.seed)
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


def _vs_vanilla(report: dict[str, Any]) -> dict[str, float]:
    """AlignSAE beside the vanilla baseline, measured: AUC gain, MSE and entanglement ratios."""
    van, ali = report["vanilla"], report["aligned"]
    return {
        "auc_gain": ali["auc_mean"] - van["auc_mean"],
        "mse_ratio": ali["mse"] / van["mse"] if van["mse"] else float("nan"),
        "entanglement_ratio": ali["entanglement"] / van["entanglement"] if van["entanglement"] else float("nan"),
    }


def build(cfg: AlignSAEConfig) -> dict[str, Any]:
    """Run the job; returns the report (also written to <out>/report.json)."""
    wall = time.perf_counter()
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model, device=device)
    base = load_sae(cfg.sae, device=device)
    hook = check_sae_fits(base, model, cfg.hook)
    check_base_sae(base)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    data = _collect(cfg, model, hook)
    concepts = data.train.concepts
    timings["activations_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    vanilla = _vanilla(base, data, concepts)
    aligned, history = _align(cfg, base, data, concepts)
    timings["train_s"] = time.perf_counter() - t0
    out = Path(cfg.out)
    aligned.save(out)
    t0 = time.perf_counter()
    saes: dict[str, ConceptSAE] = {"vanilla": vanilla, "aligned": aligned}
    report: dict[str, Any] = {name: _metrics(s, data, concepts, cfg.mi_bins) for name, s in saes.items()}
    report["token_mean_auc"] = _token_mean_auc(base, aligned, data, concepts)
    records: list[dict[str, Any]] = []
    if cfg.swap_prompts > 0:
        report["swap"], records = _swaps(cfg, model, hook, data, saes)
    timings["eval_s"] = time.perf_counter() - t0
    timings["wall_s"] = time.perf_counter() - wall
    report.update(
        concepts=concepts,
        concept_slots=aligned.concept_slots,
        vanilla_latents=vanilla.slots,
        typical={"aligned": aligned.typical.tolist(), "vanilla": vanilla.typical},
        n_train=len(data.train.texts),
        n_test=len(data.test.texts),
        loss_first=history[0],
        loss_last=history[-1],
        timings=timings,
    )
    report["vs_vanilla"] = _vs_vanilla(report)
    _write(cfg, out, report, records, hook, device)
    return report


def _write(
    cfg: AlignSAEConfig, out: Path, report: dict[str, Any], records: list[dict[str, Any]], hook: str, device: str
) -> None:
    write_json_atomic(out / "report.json", report)
    with (out / "swaps.jsonl").open("w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
    manifest = base_manifest("alignsae", asdict(cfg))
    manifest.update(
        device=device,
        hook_name=hook,
        base_sae=cfg.sae,
        concept_slots=report["concept_slots"],
        n_train=report["n_train"],
        n_test=report["n_test"],
        report=report,
    )
    write_json_atomic(out / "manifest.json", manifest)


def format_report(report: dict[str, Any]) -> str:
    """The paper-style table (vanilla vs AlignSAE) and swap success vs α, as plain text."""
    van, ali, tm = report["vanilla"], report["aligned"], report["token_mean_auc"]
    lines = [
        f"{'metric (test split)':<34}{'vanilla SAE':>14}{'AlignSAE':>14}",
        f"{'concept alignment AUC (mean)':<34}{van['auc_mean']:>14.3f}{ali['auc_mean']:>14.3f}",
        f"{'  (token-mean summary)':<34}{tm['vanilla']:>14.3f}{tm['aligned']:>14.3f}",
        f"{'reconstruction MSE':<34}{van['mse']:>14.5f}{ali['mse']:>14.5f}",
        f"{'explained variance':<34}{van['explained_variance']:>14.3f}{ali['explained_variance']:>14.3f}",
        f"{'entanglement index (MI, nats)':<34}{van['entanglement']:>14.4f}{ali['entanglement']:>14.4f}",
    ]
    swap = report.get("swap", {})
    if swap.get("by_alpha"):
        bound = f"perplexity ×≤ {1 + swap['max_ppl_increase']:g}"
        best = [swap["best"]["vanilla"], swap["best"]["aligned"]]
        cells = [f"{_pct(b['success'])} (α={_g(b['alpha'])})" if b else "none" for b in best]
        lines.append(f"{'swap success at best α':<34}{cells[0]:>14}{cells[1]:>14}")
        ratios = [f"{b['ppl_ratio']:.3f}" if b else "-" for b in best]
        lines.append(f"{'  perplexity ratio at best α':<34}{ratios[0]:>14}{ratios[1]:>14}")
        titles = {"vanilla": "vanilla", "aligned": "AlignSAE", "diffmean": "DiffMean control"}
        names = [n for n in titles if n in swap["best"]]
        lines += [
            "",
            f"swap success vs α ({swap['n_trials']} trials; success = continuation classified as the "
            f"target; best α = highest success with {bound}; unsteered: success "
            f"{_pct(swap['orig_success'])}, perplexity {swap['reference_perplexity']:.2f})",
        ]
        lines.append(f"{'α':>6}" + "".join(f"  {titles[n] + ' success / ppl×':>32}" for n in names))
        for row in swap["by_alpha"]:
            cells = [f"{_pct(row[n]['success'])} / {row[n]['ppl_ratio']:.3f}" for n in names]
            lines.append(f"{_g(row['alpha']):>6}" + "".join(f"  {c:>32}" for c in cells))
        if "diffmean" in names:
            b = swap["best"]["diffmean"]
            cell = f"{_pct(b['success'])} (α={_g(b['alpha'])}, ppl× {b['ppl_ratio']:.3f})" if b else "none"
            lines.append(f"DiffMean control (no SAE) at its best α within the bound: {cell}")
    lines += ["", "per-concept AUC (vanilla -> AlignSAE):"]
    lines += [f"  {c:<28}{van['auc'][c]:.3f} -> {ali['auc'][c]:.3f}" for c in report["concepts"]]
    lines += ["", "AlignSAE vs vanilla:"] + [f"  {name}: {value:+.3f}" for name, value in report["vs_vanilla"].items()]
    return "\n".join(lines)


def _pct(x: float) -> str:
    return f"{100 * x:.0f} %" if np.isfinite(x) else "n/a"


def _g(x: float) -> str:
    return f"{x:g}"


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(AlignSAEConfig, argv, "saealign align-sae")
    report = build(cfg)
    print(format_report(report))
    print(f"aligned SAE written to {cfg.out} (concept slots: {report['concept_slots']})")
    return 0
