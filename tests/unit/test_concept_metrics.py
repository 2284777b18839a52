"""AlignSAE metrics on crafted cases with known answers."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from ops.alignsae.metrics import (
    ReconTally,
    auc_matrix,
    best_alpha,
    best_latents,
    concept_auc,
    discretise,
    entanglement_index,
    geometric_mean,
    mutual_information,
    swap_success,
)


def _brute_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    pos, neg = scores[positive], scores[~positive]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auc_perfect_reversed_constant() -> None:
    labels = np.array([[True], [True], [False], [False]])
    scores = np.array([[3.0, 0.0, 1.0], [2.0, 0.5, 1.0], [1.0, 2.0, 1.0], [0.0, 3.0, 1.0]])
    np.testing.assert_allclose(auc_matrix(scores, labels)[:, 0], [1.0, 0.0, 0.5])


def test_auc_ties_count_half_and_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(40, 5)).astype(np.float32)  # many ties, many zeros
    labels = rng.random((40, 3)) < 0.3
    got = auc_matrix(scores, labels, chunk=2)
    for m, c in itertools.product(range(5), range(3)):
        assert got[m, c] == pytest.approx(_brute_auc(scores[:, m], labels[:, c]))


def test_auc_nan_without_negatives() -> None:
    assert np.isnan(auc_matrix(np.ones((3, 1)), np.ones((3, 1), dtype=bool))[0, 0])


def test_concept_auc_reads_each_concepts_own_slot() -> None:
    labels = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=bool)
    slots = np.array([[1.0, 0.0], [0.9, 0.0], [0.0, 0.7], [0.0, 0.8]])
    np.testing.assert_allclose(concept_auc(slots, labels), [1.0, 1.0])
    np.testing.assert_allclose(concept_auc(slots[:, ::-1], labels), [0.0, 0.0])


def test_best_latents_finds_planted_latent() -> None:
    rng = np.random.default_rng(1)
    labels = np.zeros((60, 2), dtype=bool)
    labels[:30, 0] = labels[30:, 1] = True
    acts = rng.random((60, 10)).astype(np.float32) * 0.5
    acts[:30, 7] += 1.0  # latent 7 fires on concept 0
    acts[30:, 2] += 1.0  # latent 2 fires on concept 1
    best, auc = best_latents(acts, labels)
    assert best.tolist() == [7, 2]
    np.testing.assert_allclose(auc, [1.0, 1.0])


def _tally(x: torch.Tensor, x_hat: torch.Tensor) -> ReconTally:
    tally = ReconTally()
    tally.add(x, x_hat)
    return tally


def test_reconstruction_perfect_and_mean() -> None:
    x = torch.randn(50, 8)
    perfect = _tally(x, x)
    assert perfect.mse == pytest.approx(0.0)
    assert perfect.explained_variance == pytest.approx(1.0)
    mean = _tally(x, x.mean(0).expand_as(x))
    assert mean.explained_variance == pytest.approx(0.0, abs=1e-6)
    assert mean.mse == pytest.approx(float(x.var(0, unbiased=False).mean()), rel=1e-5)


def test_recon_tally_streams_like_one_shot() -> None:
    x, x_hat = torch.randn(30, 4), torch.randn(30, 4)
    tally = ReconTally()
    for i in range(0, 30, 7):
        tally.add(x[i : i + 7], x_hat[i : i + 7])
    one = _tally(x, x_hat)
    assert tally.mse == pytest.approx(one.mse)
    assert tally.explained_variance == pytest.approx(one.explained_variance)
    assert tally.mse == pytest.approx(float((x - x_hat).pow(2).mean()), rel=1e-6)


def test_discretise_inactive_bin_and_equal_frequency() -> None:
    values = np.array([0.0, -1.0, 0.0, 1, 2, 3, 4, 5, 6])
    codes = discretise(values, n_bins=4)
    assert codes[:3].tolist() == [0, 0, 0]
    assert sorted(np.bincount(codes[3:])[1:].tolist()) == [2, 2, 2]
    assert discretise(np.zeros(5)).tolist() == [0] * 5


def test_mutual_information_known_values() -> None:
    a = np.array([0, 1] * 50)
    assert mutual_information(a, a) == pytest.approx(math.log(2))
    assert mutual_information(a, np.array([0, 0, 1, 1] * 25)) == pytest.approx(0.0, abs=1e-12)
    # two mutually exclusive events with p = q = 1/4: MI = -2p ln(1-q) + (1-2p) ln((1-2p)/(1-p)^2)
    x = np.array([1, 0, 0, 0] * 25)
    y = np.array([0, 1, 0, 0] * 25)
    p = 0.25
    expected = -2 * p * math.log(1 - p) + (1 - 2 * p) * math.log((1 - 2 * p) / (1 - p) ** 2)
    assert mutual_information(x, y) == pytest.approx(expected)


def test_entanglement_identical_vs_disjoint_slots() -> None:
    rng = np.random.default_rng(2)
    base = rng.random(400)
    entangled, mi = entanglement_index(np.stack([base, base, base], 1))
    assert entangled == pytest.approx(math.log(3), rel=1e-3)  # all active: 3 equal-frequency bins, shared
    assert mi.shape == (3, 3) and mi[0, 0] == 0.0
    disjoint = np.zeros((400, 3))
    for j in range(3):
        disjoint[j::3, j] = rng.random(len(disjoint[j::3]))  # each text activates one slot
    low, _ = entanglement_index(disjoint)
    assert low < 0.2 * entangled
    assert entanglement_index(base[:, None])[0] == 0.0


def test_swap_success_is_the_target_share() -> None:
    assert swap_success(["b", "b", "a", "c"], ["b", "b", "b", "b"]) == 0.5
    assert math.isnan(swap_success([], []))


def test_best_alpha_is_the_most_successful_within_the_perplexity_bound() -> None:
    rows = [(0.5, 0.2, 1.01), (2.0, 0.5, 1.2), (5.0, 0.5, 1.3), (10.0, 0.9, 1.31), (20.0, 1.0, float("nan"))]
    assert best_alpha(rows, 0.3) == (2.0, 0.5, 1.2)  # α 10 is better but past the bound; ties: smaller α
    assert best_alpha(rows, 0.5) == (10.0, 0.9, 1.31)
    assert best_alpha([(1.0, 0.9, 2.0)], 0.3) is None


def test_geometric_mean() -> None:
    assert geometric_mean([1.0, 4.0]) == pytest.approx(2.0)
    assert math.isnan(geometric_mean([]))
