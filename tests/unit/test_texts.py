from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ops.errors import SaealignError
from ops.texts import embedded_topics, read_many, read_texts


def test_reads_jsonl_csv_parquet_and_slices(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "label": "x"} for i in range(5)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "a.csv").write_text("body,label\n" + "\n".join(f"t{i},x" for i in range(5)))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    assert read_texts(str(tmp_path / "a.jsonl")).texts == [f"t{i}" for i in range(5)]
    assert read_texts(str(tmp_path / "a.csv"), text_column="body").texts[-1] == "t4"
    assert read_texts(str(tmp_path / "a.parquet") + "#-2:").texts == ["t3", "t4"]
    assert read_texts(str(tmp_path / "a.jsonl") + "#:-3").texts == ["t0", "t1"]


def test_missing_column_and_empty_source_are_errors(tmp_path: Path) -> None:
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "x"}))
    with pytest.raises(SaealignError, match="no 'text' column"):
        read_texts(str(tmp_path / "b.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(SaealignError, match="has no rows"):
        read_many([str(tmp_path / "empty.jsonl")])
    with pytest.raises(SaealignError, match="does not exist"):
        read_texts(str(tmp_path / "nope.jsonl"))


def test_embedded_sources_meet_their_sizes() -> None:
    pool = read_texts("embedded:pool")
    assert len(pool) >= 1500 and len(set(pool.table.column("task").to_pylist())) >= 40
    assert len(read_texts("embedded:topic:medical")) >= 20
    assert {"medical", "shoes", "finance", "sport"} <= set(embedded_topics())
    onto = read_texts("embedded:ontology").table
    counts = pa.compute.value_counts(onto.column("label")).to_pylist()
    assert len(counts) >= 6 and min(c["counts"] for c in counts) >= 60
    with pytest.raises(SaealignError, match="no embedded topic"):
        read_texts("embedded:topic:nonexistent")


def test_neutral_prompts_are_general_openings() -> None:
    prompts = read_texts("embedded:neutral-prompts").texts
    assert len(prompts) >= 40 and len(set(prompts)) == len(prompts)
    assert all(0 < len(p.split()) <= 12 for p in prompts)


def _p3_like(n: int, split: str) -> list[dict[str, str]]:
    """Rows shaped like a P3 task: pretokenized inputs and targets, no 'text' column."""
    return [{"inputs_pretokenized": f"{split} question {i}?", "targets_pretokenized": f"answer {i}"} for i in range(n)]


def test_hf_source_reads_a_dataset_saved_to_disk(tmp_path: Path) -> None:
    import datasets

    splits = {s: datasets.Dataset.from_list(_p3_like(n, s)) for s, n in (("train", 6), ("validation", 3))}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "dict"))
    splits["train"].shuffle(seed=0).select(range(4)).save_to_disk(str(tmp_path / "one"))
    col = "inputs_pretokenized"
    assert read_texts(f"hf:{tmp_path / 'dict'}", col).texts == [f"train question {i}?" for i in range(6)]
    assert read_texts(f"hf:{tmp_path / 'dict'}@validation#1:", col).texts == [
        "validation question 1?",
        "validation question 2?",
    ]
    shuffled = read_texts(f"hf:{tmp_path / 'one'}", col).texts  # a selection: the indices mapping is applied
    assert len(shuffled) == 4 and set(shuffled) <= {f"train question {i}?" for i in range(6)}
    with pytest.raises(SaealignError, match="no split 'test'"):
        read_texts(f"hf:{tmp_path / 'dict'}@test", col)
    with pytest.raises(SaealignError, match=r"no 'text' column.*inputs_pretokenized"):
        read_texts(f"hf:{tmp_path / 'dict'}")


def test_hf_source_reads_a_parquet_directory_per_task(tmp_path: Path) -> None:
    for task in ("task_a", "task_b"):
        for split, n in (("train", 5), ("validation", 2)):
            rows = [{**r, "inputs_pretokenized": f"{task} {r['inputs_pretokenized']}"} for r in _p3_like(n, split)]
            (tmp_path / "p3" / task).mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p3" / task / f"{split}-00000-of-00001.parquet")
    col = "inputs_pretokenized"
    texts = read_texts(f"hf:{tmp_path / 'p3'}:task_b@validation", col).texts
    assert texts == ["task_b validation question 0?", "task_b validation question 1?"]
    pool = read_many([f"hf:{tmp_path / 'p3'}:task_a", f"hf:{tmp_path / 'p3'}:task_b#:2"], col)
    assert [len(t) for t in pool] == [5, 2] and pool[1].source.endswith("task_b#:2")
    with pytest.raises(SaealignError, match="cannot load dataset"):
        read_texts(f"hf:{tmp_path / 'p3'}:no_such_task", col)
