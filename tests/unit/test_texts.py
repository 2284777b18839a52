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
