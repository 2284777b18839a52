"""``saealign align-sae``: AlignSAE post-training (docs/algorithms.md §6) and its report, vanilla vs aligned.

Steps: read and split the ontology (stratified, seeded), run the model once to the SAE's hook
over the ontology texts and some generic text (pooled vectors + per-token activations), pick
the vanilla baseline (best single latent per concept on the training split), post-train the
aligned SAE (``ops.alignsae.training``: appended concept slots, stage 1 reconstruction, stage 2 +
binding), save it, then measure both on the test split: alignment AUC, reconstruction MSE /
explained variance (test ontology text + held-out generic text), entanglement index, and
concept-swap success vs α. The protocol (baseline, post-training, metrics, swap sweep) is
``ops.alignsae.protocol``; this module reads the inputs, calls it and writes the outputs.

Output directory: the aligned SAE (sae-lens ``cfg.json`` + ``sae_weights.safetensors`` +
``concept_slots.safetensors``; load with ``ops.alignsae.training.load_aligned_sae``), ``report.json``,
``swaps.jsonl`` (every continuation) and ``manifest.json`` (config, concept -> slot index).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ops.alignsae.ontology import Ontology, check_concepts, load_ontology, split_ontology
from ops.alignsae.protocol import (
    ConceptData,
    SwapSweep,
    post_train,
    sae_metrics,
    swap_sweep,
    token_mean_auc,
    vanilla_baseline,
    vs_vanilla,
)
from ops.alignsae.swaps import (
    ConceptSAE,
)
from ops.alignsae.training import (
    AlignTrainConfig,
    TextActivations,
    check_base_sae,
    collect_text_activations,
)
from ops.errors import SaealignError
from ops.manifest import base_manifest, write_json_atomic
from ops.models.lm import EMBEDDED_MODEL, LanguageModel, load_model, resolve_device
from ops.saes.registry import check_sae_fits, load_sae
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
    swaps: SwapSweep = field(default_factory=SwapSweep)
    """The concept-swap sweep (its options: --swap-alphas … --max-ppl-increase)."""
    activation_cache: str | None = None
    """Directory to keep the collected hook activations in (keyed by model, hook, texts); reused on reruns."""
    seed: int = 0
    """Seed for the split, the training batches, generic-text choice and sampling."""
    device: str = "auto"
    """'auto' (cuda when available), 'cpu' or 'cuda'."""

    def __post_init__(self) -> None:
        if self.context < 2:
            raise SaealignError("--context must be at least 2")


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


def _collect(cfg: AlignSAEConfig, model: LanguageModel, hook: str) -> ConceptData:
    train, test = _ontology(cfg)
    generic_train, generic_eval = _generic(cfg)
    sets = {"train": train.texts, "test": test.texts, "generic": generic_train, "generic_eval": generic_eval}
    acts = {name: _activations(cfg, model, hook, name, texts) for name, texts in sets.items() if texts}
    return ConceptData(train, test, acts)


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
    vanilla = vanilla_baseline(base, data, concepts)
    aligned, history = post_train(base, data, concepts, cfg.train, cfg.seed, vanilla)
    timings["train_s"] = time.perf_counter() - t0
    out = Path(cfg.out)
    aligned.save(out)
    t0 = time.perf_counter()
    saes: dict[str, ConceptSAE] = {"vanilla": vanilla, "aligned": aligned}
    report: dict[str, Any] = {name: sae_metrics(s, data, concepts, cfg.mi_bins) for name, s in saes.items()}
    report["token_mean_auc"] = token_mean_auc(base, aligned, data, concepts)
    records: list[dict[str, Any]] = []
    if cfg.swaps.swap_prompts > 0:
        report["swap"], records = swap_sweep(cfg.swaps, model, hook, data, saes, cfg.seed)
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
    report["vs_vanilla"] = vs_vanilla(report)
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
    for split in ("train", "test"):
        b_van, b_ali = van["binding_accuracy"][split], ali["binding_accuracy"][split]
        lines.append(f"{'binding accuracy (' + split + ')':<34}{b_van:>14.3f}{b_ali:>14.3f}")
    swap = report.get("swap", {})
    if swap.get("by_alpha"):
        limit = swap["max_ppl_increase"]
        bound = "no perplexity bound" if limit is None else f"perplexity ×≤ {1 + limit:g}"
        judged = (
            "answer is the target's value for the same prompt"
            if swap.get("judge") == "answer"
            else ("continuation classified as the target")
        )
        best = [swap["best"]["vanilla"], swap["best"]["aligned"]]
        cells = [f"{_pct(b['success'])} (α={_g(b['alpha'])})" if b else "none" for b in best]
        lines.append(f"{'swap success at best α':<34}{cells[0]:>14}{cells[1]:>14}")
        ratios = [f"{b['ppl_ratio']:.3f}" if b else "-" for b in best]
        lines.append(f"{'  perplexity ratio at best α':<34}{ratios[0]:>14}{ratios[1]:>14}")
        titles = {"vanilla": "vanilla", "aligned": "AlignSAE", "diffmean": "DiffMean control"}
        names = [n for n in titles if n in swap["best"]]
        lines += [
            "",
            f"swap success vs α ({swap['n_trials']} trials; success = {judged}; "
            f"best α = highest success with {bound}; unsteered: success "
            f"{_pct(swap['orig_success'])}, perplexity {swap['reference_perplexity']:.2f})",
        ]
        lines.append(f"{'α':>6}" + "".join(f"  {titles[n] + ' success / ppl×':>32}" for n in names))
        for row in swap["by_alpha"]:
            cells = [f"{_pct(row[n]['success'])} / {row[n]['ppl_ratio']:.3f}" for n in names]
            lines.append(f"{_g(row['alpha']):>6}" + "".join(f"  {c:>32}" for c in cells))
        if swap.get("judge") == "answer":
            lines.append("rest unchanged (answer is one of the same person's values) / source answer kept:")
            for row in swap["by_alpha"]:
                cells = [f"{_pct(row[n]['same_person'])} / {_pct(row[n]['source_kept'])}" for n in names]
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
