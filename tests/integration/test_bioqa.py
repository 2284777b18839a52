"""``saealign bioqa`` end to end on a tiny world (40 people, a 2-block GPT-2 of width 64): the LM
learns its training questions, the aligned relation slots beat the best vanilla latent on swap
success, the report and plot are written, and a second run reuses the cached LM."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration


def _config(tmp: Path, **overrides: Any) -> Any:
    from ops.alignsae.protocol import SwapSweep
    from ops.alignsae.training import AlignTrainConfig
    from ops.bioqa.lm import LMConfig
    from ops.bioqa.world import WorldConfig
    from workflows.bioqa import BioQAConfig

    values: dict[str, Any] = dict(
        out=str(tmp / "out"),
        world=WorldConfig(people=40, bios_per_person=2),
        lm=LMConfig(lm_width=64, lm_layers=2, lm_epochs=70, lm_batch_tokens=1024, lm_eval_questions=200),
        lm_cache=str(tmp / "lms"),
        sae_d_sae=256,
        sae_k=8,
        sae_epochs=3,
        ontology_people=20,
        train=AlignTrainConfig(stage1_steps=20, stage2_steps=150, lambda_token=0.0),
        swaps=SwapSweep(
            swap_alphas=(0.5, 1.0, 2.0, 5.0),
            swap_prompts=12,
            swap_max_new_tokens=5,
            swap_judge="answer",
            swap_positions="last_prompt",
            swap_greedy=True,
            swap_all_targets=True,
            swap_control=True,
        ),
        device="cpu",
    )
    values.update(overrides)
    return BioQAConfig(**values)


def test_bioqa_end_to_end_on_a_tiny_world(tmp_path: Path) -> None:
    from ops.bioqa.lm import train_or_load
    from workflows.bioqa import build, format_report

    cfg = _config(tmp_path)
    report = build(cfg)
    lm = report["lm"]
    assert not lm["reused"]
    assert lm["exact_match"]["train"]["exact_match"] >= 0.9  # it learnt the facts it was taught
    swap = report["alignsae"]["swap"]
    assert swap["judge"] == "answer" and swap["positions"] == "last_prompt"
    assert swap["n_trials"] == 12 * 5  # every prompt swapped toward each of the 5 other relations
    best = swap["best"]
    assert "diffmean" in best and all("diffmean" in row for row in swap["by_alpha"])  # the no-SAE control ran
    assert best["aligned"]["success"] > best["vanilla"]["success"]
    aligned = report["alignsae"]["aligned"]
    assert aligned["binding_accuracy"]["train"] > report["alignsae"]["vanilla"]["binding_accuracy"]["train"]
    out = Path(cfg.out)
    assert json.loads((out / "report.json").read_text())["hook"] == cfg.hook
    assert (out / "swap_success.png").stat().st_size > 0 and (out / "swap_success.svg").is_file()
    records = [json.loads(line) for line in (out / "alignsae" / "swaps.jsonl").read_text().splitlines()]
    assert {r["sae"] for r in records} == {"orig", "vanilla", "aligned", "diffmean"}
    assert "swap success vs α" in format_report(report)
    # the LM is cached by fingerprint: a second run trains nothing
    path, record, reused = train_or_load(cfg.world, cfg.lm, Path(cfg.lm_cache))
    assert reused and str(path) == lm["dir"] and record["fingerprint"] == lm["fingerprint"]
