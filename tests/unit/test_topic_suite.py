"""The multi-topic protocol's pieces: the dev/test split, each setting's spec, the selection rule
and the bootstrap summaries (on synthetic per-prompt numbers)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ops.errors import SaealignError
from ops.evals import topic_suite as ts


def _topic(name: str = "t", d_sae: int = 8, d_model: int = 4) -> ts.SuiteTopic:
    scores = torch.linspace(0, 1, d_sae)
    return ts.SuiteTopic(name, scores, np.eye(2, dtype=np.float32), diffmean=torch.ones(d_model))


def test_split_is_a_seeded_partition() -> None:
    dev, test = ts.split_prompts(9, seed=3)
    assert sorted(dev + test) == list(range(9)) and len(dev) == 4 and len(test) == 5
    assert ts.split_prompts(9, seed=3) == (dev, test)
    assert ts.split_prompts(9, seed=4) != (dev, test)
    with pytest.raises(SaealignError, match="at least 4 prompts"):
        ts.split_prompts(3, 0)


def test_settings_are_selected_by_name_and_orig_always_runs() -> None:
    assert [s.label for s in ts.select_settings(["swap"])] == ["orig", "swap"]
    assert [s.label for s in ts.select_settings([])] == list(ts.DEFAULT_SETTINGS)
    assert "clamp" not in ts.DEFAULT_SETTINGS and "clamp" in [s.label for s in ts.select_settings(["clamp"])]
    with pytest.raises(SaealignError, match="unknown setting"):
        ts.select_settings(["swap", "teleport"])


def test_each_setting_becomes_its_spec() -> None:
    by = {s.label: s for s in ts.SETTINGS}
    topic = _topic()
    assert ts.spec_for(by["orig"], None, None).scores is None
    swap = ts.spec_for(by["swap+err"], topic, None)
    assert swap.method == "swap" and swap.keep_error and torch.equal(swap.scores, topic.scores)
    clamp = ts.spec_for(by["clamp-add+err"], topic, 0.25, hook_norm=80.0)  # a share of the hook's norm
    assert (clamp.method, clamp.clamp_mode, clamp.clamp_factor, clamp.keep_error) == ("clamp", "add", 20.0, True)
    diffmean = ts.spec_for(by["diffmean"], topic, 4.0)
    assert diffmean.method == "orig" and diffmean.scores is None
    assert torch.equal(diffmean.vector, 4.0 * torch.ones(4))
    assert by["swap+prompt"].prompted and not by["swap+prompt"].topic_free and by["sae"].topic_free
    assert {s.label for s in ts.SETTINGS if s.on_dev} >= {"orig", "swap", "clamp-add+err", "diffmean"}
    assert not by["prompting"].on_dev and not by["sae"].steers_with_sae


def test_choice_keeps_the_largest_drop_within_the_perplexity_budget() -> None:
    suite = object.__new__(ts.Suite)
    suite.options = SimpleNamespace(ppl_budget=1.5)  # type: ignore[assignment]
    tried = [
        {"value": 1, "shift": -0.01, "ppl_ratio": 1.1},
        {"value": 2, "shift": -0.05, "ppl_ratio": 1.4},
        {"value": 3, "shift": -0.20, "ppl_ratio": 3.0},
    ]
    assert suite._choose(tried)["value"] == 2
    over = [{"value": 5, "shift": -0.3, "ppl_ratio": 2.0}, {"value": 6, "shift": -0.4, "ppl_ratio": 1.8}]
    assert suite._choose(over)["value"] == 6  # none within budget: the lowest perplexity


def _per(distance: np.ndarray, log_ppl: np.ndarray | None = None) -> dict[str, np.ndarray]:
    n = len(distance)
    zeros = np.zeros(n)
    return {
        "distance": distance,
        "log_ppl": zeros if log_ppl is None else log_ppl,
        "distinct2": np.ones(n),
        "contamination": np.full(n, np.nan),
        "latents_changed": zeros,
    }


def test_summary_statistics_and_intervals() -> None:
    rng = np.random.default_rng(0)
    n = 40
    orig = rng.normal(1.3, 0.05, n)
    steered = orig - 0.1  # every prompt 0.1 closer
    prompting = orig - 0.05
    per = {
        "orig": {"a": _per(orig)},
        "x": {"a": _per(steered, np.full(n, np.log(2.0)))},
        "prompting": {"a": _per(prompting)},
    }
    boot = {"a": rng.integers(0, n, size=(200, n))}
    setting = ts.Setting("x", "test")
    row = ts._summary(setting, per["x"], per, boot)
    assert row["shift"]["value"] == pytest.approx(-0.1) and row["shift"]["lo"] == pytest.approx(-0.1)
    assert row["closer"]["value"] == 1.0 and row["win_vs_prompting"]["value"] == 1.0
    assert row["ppl_ratio"]["value"] == pytest.approx(2.0)
    assert row["contamination"] is None and row["distinct2"] == 1.0
    # a noisy shift: the interval brackets the value and has width
    noisy = {"a": _per(orig + rng.normal(0, 0.05, n))}
    row = ts._summary(setting, noisy, per | {"x": noisy}, boot)
    assert row["shift"]["lo"] < row["shift"]["value"] < row["shift"]["hi"]
    assert 0.0 < row["closer"]["value"] < 1.0
