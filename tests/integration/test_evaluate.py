"""``saealign evaluate`` end to end on a small lake (shipped SAE, 96 embedded pool prompts):
every setting runs, the JSON holds every number, and the HTML report renders in headless
Chromium with its plots and tables."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

from ops.scoring.scores import score_topic
from ops.texts import read_texts
from tests.integration.test_browser import chromium, require_chromium
from workflows import evaluate
from workflows.build_lake import BuildLakeConfig, build

pytestmark = pytest.mark.integration

SETTINGS = {"orig", "sae", "sae+err", "clamp", "clamp+err", "swap", "swap+err", "weight", "weight+err"}
SETTINGS |= {"prompting", "diffmean"}


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("evaluate")
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    try:
        build(BuildLakeConfig(lake=str(root / "lake"), pool=("embedded:pool#:96",), shard_size=48, context=128))
    finally:
        ray.shutdown()
    texts = read_texts("embedded:topic:medical").texts
    score_topic(str(root / "lake"), "medical", texts, min_support=2, align_source="embedded:topic:medical")
    evaluate.build(
        evaluate.EvaluateConfig(
            lake=str(root / "lake"), topic="medical", n_prompts=2, max_new_tokens=6, k_max=10, out=str(root / "report")
        )
    )
    yield root / "report"


def test_report_json_has_every_setting_and_number(report_dir: Path) -> None:
    report: dict[str, Any] = json.loads((report_dir / "report.json").read_text())
    rows = {row["method"]: row for row in report["summary"]}
    assert set(rows) == SETTINGS
    for method, row in rows.items():
        assert row["n"] == 2, method
        assert math.isfinite(row["distance"]) and row["median_perplexity"] > 1.0, method
    # sae + its own error is the unsteered activation: same tokens as orig
    assert [g["text"] for g in report["generations"]["sae+err"]] == [g["text"] for g in report["generations"]["orig"]]
    assert rows["orig"]["latents_changed"] == 0 and rows["swap"]["latents_changed"] > 0
    vs = report["swap_vs_orig"]
    assert 0.0 <= vs["swap_closer_than_orig_share"] <= 1.0 and vs["swap_perplexity_ratio"] > 0
    assert report["recommendation"]["method"] in SETTINGS
    assert report["topk_check"]["ks"] == list(range(1, 11))
    assert {"set_up", "per_topic", "per_token"} <= set(report["costs"])
    assert report["costs"]["per_token_batch"] == 2  # n_prompts 2 x one seed: both rows in one batch


def test_report_html_renders_plots_and_tables(report_dir: Path, tmp_path: Path) -> None:
    require_chromium()
    with chromium(tmp_path / "profile") as tools:
        tools.call("Page.navigate", url=(report_dir / "report.html").resolve().as_uri())
        tools.wait_for("document.readyState === 'complete'")
        plots = tools.wait_for(
            "(() => { const imgs = [...document.querySelectorAll('img.plot')];"
            " return imgs.length && imgs.every(i => i.complete) && imgs.map(i => [i.alt, i.naturalWidth]); })()"
        )
        summary_rows = tools.js("document.querySelectorAll('#summary tbody tr').length")
        text = tools.js("document.body.innerText")
    assert {alt for alt, _ in plots} >= {"trade-off", "latents changed", "contamination", "top-k check", "coverage"}
    assert all(width > 100 for _, width in plots), plots
    assert summary_rows == len(SETTINGS)
    assert "recommended" in text.lower() and "swap" in text


def test_orig_alone_reports_that_no_recommendation_is_possible(report_dir: Path, capsys: pytest.CaptureFixture) -> None:
    lake, out = report_dir.parent / "lake", report_dir.parent / "orig-only"
    argv = ["--lake", str(lake), "--topic", "medical", "--methods", "orig", "--n-prompts", "2"]
    argv += ["--max-new-tokens", "4", "--k-max", "3", "--out", str(out)]
    assert evaluate.main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert [row["method"] for row in report["summary"]] == ["orig"]
    assert report["recommendation"]["method"] is None
    assert "no recommendation possible" in report["recommendation"]["reason"]
    assert "recommended: none" in capsys.readouterr().out
    assert "Recommended default:</b> none" in (out / "report.html").read_text()


@pytest.fixture(scope="module")
def suite_report(report_dir: Path) -> dict[str, Any]:
    from tests.unit.test_judges import tiny_judge_dir

    root = report_dir.parent
    lake = str(root / "lake")
    texts = read_texts("embedded:topic:shoes").texts
    score_topic(lake, "shoes", texts, min_support=2, align_source="embedded:topic:shoes")
    cfg = evaluate.EvaluateConfig(
        lake=lake,
        topics=("medical", "shoes"),
        n_prompts=5,
        seeds=(0, 1),
        max_new_tokens=4,
        bootstrap=50,
        judge=f"path:{tiny_judge_dir(root / 'judge')}",
        out=str(root / "suite"),
    )
    evaluate.build(cfg)
    return json.loads((root / "suite" / "report.json").read_text())


def test_suite_reports_every_setting_per_topic_and_pooled(suite_report: dict[str, Any]) -> None:
    from ops.evals.topic_suite import DEFAULT_SETTINGS

    proto = suite_report["protocol"]
    assert sorted(proto["dev_prompts"] + proto["test_prompts"]) == list(range(5))
    assert suite_report["config"]["prompts_file"] == "" and len(suite_report["prompts"]) == 5  # neutral prompts
    assert set(suite_report["per_topic"]) == {"medical", "shoes"}
    for rows in [*suite_report["per_topic"].values(), suite_report["pooled"]]:
        assert [r["setting"] for r in rows] == list(DEFAULT_SETTINGS)
        for r in rows:
            for key in ("shift", "closer", "ppl_ratio"):
                stat = r[key]
                assert stat["lo"] - 1e-9 <= stat["value"] <= stat["hi"] + 1e-9, (r["setting"], key, stat)
            assert 0.0 <= r["closer"]["value"] <= 1.0
    orig = suite_report["pooled"][0]
    assert orig["shift"]["value"] == 0.0 and orig["ppl_ratio"]["value"] == pytest.approx(1.0)
    by = {s["label"]: s for s in suite_report["settings"]}
    for s in by.values():
        if s["grid"]:
            assert s["chosen"] in s["grid"], s
        elif s["knob_from"]:
            assert s["chosen"] == by[s["knob_from"]]["chosen"], s
        else:
            assert s["chosen"] is None, s
    assert suite_report["best_sae_setting"] in {s["label"] for s in suite_report["settings"] if s["uses_sae"]}
    assert suite_report["judge"]["name"].startswith("path:")


def test_suite_html_has_a_plot_per_topic(report_dir: Path, suite_report: dict[str, Any]) -> None:
    page = (report_dir.parent / "suite" / "report.html").read_text()
    for topic in ("medical", "shoes"):
        assert f'alt="topic {topic}"' in page
    assert 'alt="pooled"' in page and "Knobs chosen on the dev half" in page


def test_generate_with_diffmean_steers_through_the_engine(report_dir: Path) -> None:
    from ops.steering.generation import SamplingParams
    from workflows.generate import GenerateConfig
    from workflows.generate import build as generate

    def tokens(scale: float) -> dict[str, list[list[int]]]:
        cfg = GenerateConfig(
            prompt=("The weather today", "My plan for the weekend"),
            topic="medical",
            method=("diffmean",),
            compare=True,
            lake=str(report_dir.parent / "lake"),
            sampling=SamplingParams(max_new_tokens=6, greedy=True),
            diffmean_scale=scale,
        )
        out = generate(cfg)
        by: dict[str, list[list[int]]] = {}
        for r in out["results"]:
            by.setdefault(r.method, []).append(r.token_ids)
        return by

    zero, steered = tokens(0.0), tokens(8.0)
    assert zero["diffmean"] == zero["orig"]  # a zero vector changes nothing
    assert steered["diffmean"] != steered["orig"]
