from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ops.errors import SaealignError
from ops.lake.build import latent_stats_table, prepare_pool
from ops.lake.contract import ACTIVATIONS, DatasetKey, Lake, prompt_id, write_atomic
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


def test_shards_group_prompts_of_similar_length_and_cover_the_pool_once() -> None:
    texts = [("x" * n) + str(i) for i, n in enumerate([30, 2, 17, 9, 41, 5, 23, 12, 3, 36])]
    pool = prepare_pool([TextTable("src", pa.table({"text": texts}))])
    shards = pool.shards(3)
    assert [i for i, _ in shards] == [0, 1, 2, 3]
    lengths = [[len(t) for t in table.column("text").to_pylist()] for _, table in shards]
    flat = [n for part in lengths for n in part]
    assert flat == sorted(flat) and len(flat) == len(texts)
    assert sorted(t for _, table in shards for t in table.column("text").to_pylist()) == sorted(texts)
    # the same texts in another source order cut into the same shards
    again = prepare_pool([TextTable("src", pa.table({"text": texts[::-1]}))]).shards(3)
    assert [t.column("prompt_id").to_pylist() for _, t in again] == [
        t.column("prompt_id").to_pylist() for _, t in shards
    ]


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


def test_a_dataset_resumes_as_it_was_started(tmp_path: Path) -> None:
    from workflows.build_lake import BuildLakeConfig, _check_progress

    lake = Lake(str(tmp_path))
    pool = prepare_pool([TextTable("src", pa.table({"text": ["ccc", "a", "bb"]}))])
    cfg = BuildLakeConfig(lake=str(tmp_path), shard_size=2, embed_precision="bf16")
    assert _check_progress(lake, KEY, pool, cfg) == "bf16"
    fp32 = BuildLakeConfig(lake=str(tmp_path), shard_size=2, embed_precision="fp32")
    assert _check_progress(lake, KEY, pool, fp32) == "bf16"  # the same pool and layout resume as started
    assert [t.column("text").to_pylist() for _, t in pool.shards(2)] == [["a", "bb"], ["ccc"]]
    shard = lake.shard_path("activations", KEY, 0)
    lake.write_table(shard, pa.table({"prompt_id": [1], "latent": [2], "value": [1.0]}), ACTIVATIONS)
    other = prepare_pool([TextTable("src", pa.table({"text": ["dddd"]}))])
    with pytest.raises(SaealignError, match="another pool, shard size or shard layout; fix: pass --overwrite"):
        _check_progress(lake, KEY, other, cfg)
    progress = lake.path("manifests", f".{KEY.name}.progress.json")
    record = lake.read_json(progress)
    lake.write_json(progress, {k: record[k] for k in ("fingerprint", "shard_size")})  # an older layout
    with pytest.raises(SaealignError, match="shard layout"):
        _check_progress(lake, KEY, pool, cfg)
    assert lake.exists(shard)  # refused without touching what was written
    _check_progress(lake, KEY, other, BuildLakeConfig(lake=str(tmp_path), shard_size=2, overwrite=True))
    assert not lake.exists(shard)


def test_auto_layout_fills_the_cluster_and_explicit_values_stay() -> None:
    from workflows.build_lake import BuildLakeConfig, resolve_layout

    gb = 2**30
    two_cpus = resolve_layout(BuildLakeConfig(), {"CPU": 2.0, "memory": 16 * gb})
    assert (two_cpus.workers, two_cpus.embed_workers) == (2, 1)
    assert two_cpus.workers * two_cpus.cpus_per_worker + two_cpus.cpus_per_worker <= 2.0  # all actors fit
    assert resolve_layout(BuildLakeConfig(), {"CPU": 16.0, "memory": 10 * gb}).workers == 3  # memory-bound
    big = resolve_layout(BuildLakeConfig(), {"CPU": 16.0, "memory": 100 * gb})
    assert (big.workers, big.cpus_per_worker) == (16, 16 / 17)
    gpus = resolve_layout(BuildLakeConfig(gpus_per_worker=1), {"CPU": 8.0, "GPU": 4.0, "memory": gb})
    assert (gpus.workers, gpus.cpus_per_worker) == (4, 1.0)
    fixed = BuildLakeConfig(workers=3, cpus_per_worker=0.5)
    assert resolve_layout(fixed, {"CPU": 2.0, "memory": 16 * gb}) == fixed
    with pytest.raises(SaealignError, match="fewer than --gpus-per-worker 1; fix: pass --workers N"):
        resolve_layout(BuildLakeConfig(gpus_per_worker=1), {"CPU": 8.0, "memory": 16 * gb})
    with pytest.raises(SaealignError, match="less than --worker-memory-gb 3 for one LM actor; fix"):
        resolve_layout(BuildLakeConfig(), {"CPU": 2.0, "memory": 2 * gb})
    with pytest.raises(SaealignError, match="must be >= 0"):
        BuildLakeConfig(workers=-1)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path))
    path = lake.manifest_path("ds")
    lake.write_json(path, {"v": 1})

    def fail(sink: object) -> None:
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(lake.fs, path, fail)
    assert lake.read_manifest("ds") == {"v": 1}
    assert sorted(p.name for p in (tmp_path / "manifests").iterdir()) == ["ds.json"]
    assert lake.datasets() == ["ds"]
