"""``saealign bioqa``: AlignSAE on the paper's own task (docs/algorithms.md §6), end to end.

Steps: build the seeded biography world (``ops.bioqa.world``) and write its texts; train the
bio-QA LM from scratch or reuse the cached one with the same fingerprint (``ops.bioqa.lm``);
train the vanilla SAE at a middle layer on the LM's activations of biographies and QA text
(``saealign train-sae``'s own ``build``); then run ``saealign align-sae``'s ``build`` on the QA
prompts labelled by relation (train templates for training, held-out templates for the test),
activations at the last prompt token, swaps written at the last prompt position, decoded
greedily and judged by exact match with the target relation's value for the same person.

Output directory: ``world/`` (bios.jsonl, qa.jsonl, ontology.jsonl), ``sae/`` (the vanilla SAE),
``alignsae/`` (align-sae's outputs), ``report.json`` (LM exact match, SAE quality, the AlignSAE
report, timings) and ``swap_success.png`` / ``swap_success.svg`` (success vs α).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ops.alignsae.protocol import SwapSweep
from ops.alignsae.training import AlignTrainConfig
from ops.bioqa.lm import LMConfig, default_cache_root, train_or_load
from ops.bioqa.world import WorldConfig, answer_text_of, build_world, ontology_rows
from ops.errors import SaealignError
from ops.manifest import base_manifest, write_json_atomic
from workflows._config import parse_config

log = logging.getLogger(__name__)


def _bio_swaps() -> SwapSweep:
    return SwapSweep(
        swap_alphas=(0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0),
        swap_prompts=60,
        swap_max_new_tokens=5,
        swap_judge="answer",
        swap_positions="last_prompt",
        swap_greedy=True,
        swap_all_targets=True,
        swap_control=True,
    )


def _bio_train() -> AlignTrainConfig:
    return AlignTrainConfig(lambda_token=0.0, slot_init="vanilla_latent")


@dataclass(frozen=True)
class BioQAConfig:
    """AlignSAE on the biography-QA task: world -> LM -> vanilla SAE -> AlignSAE -> swaps -> report."""

    out: str = "out/bioqa"
    """Output directory (world texts, vanilla SAE, AlignSAE, report.json, swap_success.png/.svg)."""
    world: WorldConfig = field(default_factory=WorldConfig)
    """The biography world (its options: --people, --bios-per-person, --world-seed)."""
    lm: LMConfig = field(default_factory=LMConfig)
    """The LM and its training (its options: --lm-width … --lm-eval-questions)."""
    lm_cache: str = ""
    """Directory of trained LMs, one per fingerprint (default: $SAEALIGN_CACHE/bioqa)."""
    layer: int = -1
    """Block whose resid_post the SAEs read (-1: the middle of the LM, lm_layers // 2 - 1)."""
    sae_d_sae: int = 1024
    """Latents of the vanilla SAE (a TopK SAE trained by train-sae's build)."""
    sae_k: int = 16
    """Active latents per token of the vanilla SAE."""
    sae_epochs: float = 4.0
    """Passes of the vanilla SAE's training over the collected activations."""
    ontology_people: int = 200
    """People whose questions form the AlignSAE ontology, per split (train / held-out templates)."""
    train: AlignTrainConfig = field(default_factory=_bio_train)
    """AlignSAE post-training (its options: --stage1-steps … --train-concept-decoder)."""
    swaps: SwapSweep = field(default_factory=_bio_swaps)
    """The swap sweep (its options: --swap-alphas … --swap-all-targets)."""
    seed: int = 0
    """Seed of the SAEs, the ontology's people and the swap prompts."""
    device: str = "auto"
    """'auto' (cuda when available), 'cpu' or 'cuda'."""

    def __post_init__(self) -> None:
        if self.layer >= self.lm.lm_layers:
            raise SaealignError(
                f"--layer {self.layer} is past the LM's {self.lm.lm_layers} blocks; fix: use a smaller one"
            )
        if self.ontology_people < 2:
            raise SaealignError("--ontology-people must be at least 2")

    @property
    def hook(self) -> str:
        layer = self.layer if self.layer >= 0 else max(0, self.lm.lm_layers // 2 - 1)
        return f"blocks.{layer}.hook_resid_post"


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def write_world(cfg: BioQAConfig, out: Path) -> dict[str, str]:
    """The world's texts as files: biographies, train-template QA text, the AlignSAE ontology."""
    world = build_world(cfg.world)
    qa = [{"text": answer_text_of(q)} for q in world.questions("train")]
    return {
        "bios": _write_jsonl(out / "bios.jsonl", [{"text": b} for b in world.bios]),
        "qa": _write_jsonl(out / "qa.jsonl", qa),
        "ontology": _write_jsonl(out / "ontology.jsonl", list(ontology_rows(world, cfg.ontology_people, cfg.seed))),
    }


def build(cfg: BioQAConfig) -> dict[str, Any]:
    """Run the whole task; returns the report (also written to <out>/report.json)."""
    from workflows import align_sae, train_sae

    wall = time.perf_counter()
    out = Path(cfg.out)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    files = write_world(cfg, out / "world")
    root = Path(cfg.lm_cache).expanduser() if cfg.lm_cache else default_cache_root()
    lm_path, lm_record, reused = train_or_load(cfg.world, cfg.lm, root)
    timings["lm_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    sae_cfg = train_sae.TrainSAEConfig(
        out=str(out / "sae"),
        model=str(lm_path),
        hook=cfg.hook,
        architecture="topk",
        k=cfg.sae_k,
        d_sae=cfg.sae_d_sae,
        sources=(files["bios"], files["qa"]),
        eval_holdout=min(200, max(10, cfg.world.people // 5)),
        epochs=cfg.sae_epochs,
        context=64,
        batch_size=1024,
        lr=1e-3,
        seed=cfg.seed,
        device=cfg.device,
        ce_texts=200,
    )
    sae_eval = train_sae.build(sae_cfg)
    sae_eval.pop("losses", None)
    timings["vanilla_sae_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    align_cfg = align_sae.AlignSAEConfig(
        out=str(out / "alignsae"),
        sae=str(out / "sae"),
        model=str(lm_path),
        hook=cfg.hook,
        ontology=files["ontology"],
        min_texts=2,
        generic_sources=(files["bios"],),
        generic_texts=min(600, cfg.world.people * cfg.world.bios_per_person // 2),
        generic_eval_texts=min(150, cfg.world.people * cfg.world.bios_per_person // 4),
        pooling="last",
        context=64,
        train=cfg.train,
        swaps=cfg.swaps,
        seed=cfg.seed,
        device=cfg.device,
    )
    align = align_sae.build(align_cfg)
    timings["alignsae_s"] = time.perf_counter() - t0
    timings["wall_s"] = time.perf_counter() - wall
    report: dict[str, Any] = {
        "hook": cfg.hook,
        "lm": {"dir": str(lm_path), "reused": reused, **lm_record},
        "vanilla_sae": sae_eval,
        "alignsae": align,
        "timings": timings,
    }
    write_json_atomic(out / "report.json", report)
    manifest = base_manifest("bioqa", asdict(cfg))
    manifest.update(hook_name=cfg.hook, lm_dir=str(lm_path), lm_reused=reused)
    write_json_atomic(out / "manifest.json", manifest)
    plot_success(report, out)
    return report


def plot_success(report: dict[str, Any], out: Path) -> list[Path]:
    """Swap success vs α (aligned, vanilla, and the DiffMean control when run) as PNG and SVG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    swap = report["alignsae"].get("swap", {})
    rows = swap.get("by_alpha", [])
    if not rows:
        return []
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    labels = {"aligned": "AlignSAE slots", "vanilla": "vanilla SAE (best latent)", "diffmean": "DiffMean control"}
    alphas = [r["alpha"] for r in rows]
    for name, label in labels.items():
        if name in rows[0]:
            ax.plot(alphas, [100 * r[name]["success"] for r in rows], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("α (slot set to α × its typical activation; DiffMean: α × mean difference)", fontsize=8)
    ax.set_ylabel("swap success (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"bio-QA concept swaps ({swap['n_trials']} trials, {report['hook']})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths = [out / "swap_success.png", out / "swap_success.svg"]
    for p in paths:
        fig.savefig(p)
    plt.close(fig)
    return paths


def format_report(report: dict[str, Any]) -> str:
    """The LM's exact match, then align-sae's paper-style table and per-pair success."""
    from workflows.align_sae import format_report as align_table

    em = report["lm"]["exact_match"]
    lines = [
        f"bio-QA LM ({report['lm']['parameters']:,} parameters, "
        f"{'reused from cache' if report['lm']['reused'] else 'trained now'}): greedy exact match "
        f"train templates {em['train']['exact_match']:.3f}, held-out templates {em['test']['exact_match']:.3f}",
        f"vanilla SAE at {report['hook']}: explained variance {report['vanilla_sae']['explained_variance']:.3f}",
        "",
        align_table(report["alignsae"]),
    ]
    pairs = report["alignsae"].get("swap", {}).get("by_pair", {})
    for name, table in pairs.items():
        lines += ["", f"{name}: success per relation pair at its best α"]
        lines += [f"  {pair.replace('relation:', ''):<34}{100 * v:5.0f} %" for pair, v in sorted(table.items())]
    lines += ["", "timings: " + ", ".join(f"{k} {v:.0f}" for k, v in report["timings"].items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(BioQAConfig, argv, "saealign bioqa")
    report = build(cfg)
    print(format_report(report))
    print(f"report: {Path(cfg.out) / 'report.json'}; plot: {Path(cfg.out) / 'swap_success.png'}")
    return 0
