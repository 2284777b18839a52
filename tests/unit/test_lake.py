from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ops.errors import SaealignError
from ops.lake import ACTIVATIONS, DatasetKey, Lake, prompt_id
from ops.lake_build import latent_stats_table, prepare_pool
from ops.texts import TextTable

KEY = DatasetKey("smollm2-135m", "default", "blocks.6.hook_resid_post")


def test_prompt_id_is_stable_and_text_derived() -> None:
    assert prompt_id("hello") == prompt_id("hello") != prompt_id("hello ")
    assert -(2**63) <= prompt_id("x") < 2**63


def test_atomic_write_validates_schema(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path))
    path = lake.shard_path("activations", KEY, 3)
    lake.write_table(path, pa.table({"prompt_id": [1], "latent": [2], "value": [0.5], "extra": ["x"]}), ACTIVATIONS)
    assert pq.read_table(path).schema == ACTIVATIONS
    assert not list(Path(path).parent.glob(".tmp-*"))
    with pytest.raises(SaealignError, match="missing column"):
        lake.write_table(path, pa.table({"prompt_id": [1]}), ACTIVATIONS)
    assert pq.read_table(path).num_rows == 1  # the bad write left the good file alone
    assert "model=smollm2-135m/sae=default/hook=blocks.6.hook_resid_post/summary=avg" in path


def test_prepare_pool_drops_empty_and_duplicate_texts() -> None:
    table = pa.table({"text": ["a", "  ", "b", "a", None], "task": ["t1", "t2", "t3", "t4", "t5"]})
    pool = prepare_pool([TextTable("src", table)])
    assert pool.table.column("text").to_pylist() == ["a", "b"]
    assert (pool.n_empty, pool.n_duplicates) == (2, 1)
    assert pool.table.column("task").to_pylist() == ["t1", "t3"]
    with pytest.raises(SaealignError, match="no non-empty text"):
        prepare_pool([TextTable("src", pa.table({"text": ["", " "]}))])


def test_latent_stats() -> None:
    acts = pa.table({"prompt_id": [1, 1, 2], "latent": [5, 7, 5], "value": [0.25, 0.75, 1.0]}, schema=ACTIVATIONS)
    expected = [{"latent": 5, "support": 2, "total_mass": 1.25}, {"latent": 7, "support": 1, "total_mass": 0.75}]
    assert latent_stats_table(acts, d_sae=8).to_pylist() == expected
    assert latent_stats_table(iter(acts.to_batches(max_chunksize=1)), d_sae=8).to_pylist() == expected
    with pytest.raises(SaealignError, match="does not match the SAE"):
        latent_stats_table(acts, d_sae=6)


def test_bad_summary_kind() -> None:
    with pytest.raises(SaealignError, match="unknown summary"):
        DatasetKey("m", "s", "h", "median")
