from __future__ import annotations

import numpy as np
import pytest
import torch

from ops.lake.summaries import sparse_rows, summarise

ACTS = torch.tensor([[1.0, 0.0, 3.0], [0.0, 0.0, 1.0], [2.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
PROMPT = torch.tensor([0, 0, 1, 2])  # prompt 2 has one token with nothing firing


def test_avg_sums_token_activations_then_normalises() -> None:
    s = summarise(ACTS, PROMPT, 3, "avg")
    # prompt 0: sums (1, 0, 4) / 5; prompt 1: (2, 2, 0) / 4; prompt 2: all zero stays zero
    assert torch.allclose(s, torch.tensor([[0.2, 0.0, 0.8], [0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]))


def test_max_and_count() -> None:
    assert torch.allclose(summarise(ACTS, PROMPT, 3, "max")[0], torch.tensor([0.25, 0.0, 0.75]))
    assert torch.allclose(summarise(ACTS, PROMPT, 3, "count")[0], torch.tensor([1 / 3, 0.0, 2 / 3]))
    with pytest.raises(Exception, match="unknown summary"):
        summarise(ACTS, PROMPT, 3, "median")


def test_sparse_rows_keep_only_nonzero() -> None:
    table = sparse_rows(summarise(ACTS, PROMPT, 3, "avg"), [10, 11, 12])
    assert table.column("prompt_id").to_pylist() == [10, 10, 11, 11]
    assert table.column("latent").to_pylist() == [0, 2, 0, 1]
    np.testing.assert_allclose(table.column("value").to_numpy(), [0.2, 0.8, 0.5, 0.5], rtol=1e-6)
