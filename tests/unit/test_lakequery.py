"""Read-only SQL over a lake: the statement guard, the views, missing tables, output formats."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest

import ops.scoring.scores as scoring
from ops.errors import SaealignError
from ops.lake.contract import ACTIVATIONS, EMBEDDING_DIM, EMBEDDINGS, LATENT_STATS, PROMPTS, DatasetKey, Lake
from ops.lake.query import check_read_only, format_result, open_lake, run_query
from workflows import query as query_job

KEY = DatasetKey(model="tiny-lm", sae="tiny-sae", hook="blocks.0.hook_resid_post")


@pytest.fixture
def lake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Lake:
    """Three prompts, five activation rows, embeddings, latent_stats and a manifest."""
    lake = Lake(str(tmp_path / "it's a lake"))  # a quote in the path on purpose
    ids = [11, 12, 13]
    prompts = pa.table(
        {
            "prompt_id": ids,
            "text": ["heart attack", "new shoes", "pasta recipe"],
            "source": ["t"] * 3,
            "task": ["a", "b", "c"],
            "n_tokens": [3, 3, 3],
            "truncated": [False] * 3,
        }
    )
    emb = np.zeros((3, EMBEDDING_DIM), dtype=np.float32)
    emb[[0, 1, 2], [0, 1, 2]] = 1
    acts = pa.table({"prompt_id": [11, 11, 12, 13, 13], "latent": [0, 1, 1, 2, 0], "value": [0.5, 0.5, 1.0, 0.3, 0.7]})
    lake.write_table(lake.shard_path("prompts", KEY, 0), prompts, PROMPTS)
    lake.write_table(lake.shard_path("activations", KEY, 0), acts, ACTIVATIONS)
    lake.write_table(
        lake.shard_path("embeddings", KEY, 0),
        pa.table({"prompt_id": ids, "embedding": emb.tolist(), "embedder": ["stub"] * 3}),
        EMBEDDINGS,
    )
    stats = pa.table({"latent": [0, 1, 2], "support": [2, 2, 1], "total_mass": [1.2, 1.5, 0.3]})
    lake.write_table(lake.stats_path(KEY), stats, LATENT_STATS)
    lake.write_json(lake.manifest_path(KEY), {"dataset": KEY.name, "key": asdict(KEY), "embedder": "stub", "d_sae": 4})
    monkeypatch.setattr(scoring, "embed", lambda texts, name, progress=False: emb[:1].repeat(len(texts), 0))
    return lake


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1",
        "WITH a AS (SELECT 1 AS x) SELECT * FROM a",
        "FROM prompts",
        "DESCRIBE activations",
        "SHOW TABLES",
        "SUMMARIZE latent_stats",
        "EXPLAIN SELECT * FROM prompts",
        "EXPLAIN ANALYZE SELECT 1",
        "VALUES (1), (2)",
        "SELECT 1;",
    ],
)
def test_reads_pass_the_guard(sql: str) -> None:
    assert check_read_only(sql) == sql


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO prompts VALUES (1)",
        "DROP TABLE scores",
        "DELETE FROM scores",
        "UPDATE scores SET score = 1",
        "CREATE TABLE x AS SELECT 1",
        "COPY (SELECT 1) TO '/tmp/x.csv'",
        "EXPORT DATABASE '/tmp/x'",
        "ATTACH '/tmp/x.db' AS x",
        "DETACH saealign_scores",
        "PRAGMA version",
        "SET threads = 1",
        "INSTALL httpfs",
        "LOAD httpfs",
        "CALL pragma_version()",
        "CHECKPOINT",
        "EXPLAIN ANALYZE INSERT INTO t VALUES (1)",
        "/* hi */ EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1",
        "SELECT 1; DROP TABLE scores",
    ],
)
def test_writes_are_refused(sql: str) -> None:
    with pytest.raises(SaealignError, match=r"refused|one SQL statement|EXPLAIN ANALYZE"):
        check_read_only(sql)


def test_bad_sql_is_a_clear_error(lake: Lake) -> None:
    with pytest.raises(SaealignError, match="cannot parse"):
        check_read_only("SELEC 1")
    with pytest.raises(SaealignError, match="query failed"):
        run_query(lake.uri, "SELECT no_such_column FROM prompts")


def test_views_have_partition_and_dataset_columns(lake: Lake) -> None:
    rows = run_query(lake.uri, "SELECT model, sae, hook, summary, dataset, count(*) AS n FROM activations GROUP BY ALL")
    assert rows.to_pylist() == [
        {
            "model": "tiny-lm",
            "sae": "tiny-sae",
            "hook": "blocks.0.hook_resid_post",
            "summary": "avg",
            "dataset": KEY.name,
            "n": 5,
        }
    ]
    joined = run_query(
        lake.uri,
        "SELECT p.text, sum(a.value) AS mass FROM prompts p JOIN activations a USING (prompt_id) "
        "GROUP BY p.text ORDER BY p.text",
    )
    assert joined.column("text").to_pylist() == ["heart attack", "new shoes", "pasta recipe"]
    manifest = run_query(lake.uri, "SELECT dataset, d_sae, manifest->>'$.embedder' AS e FROM manifests")
    assert manifest.to_pylist() == [{"dataset": KEY.name, "d_sae": 4, "e": "stub"}]
    dims = run_query(lake.uri, "SELECT len(embedding) AS n FROM embeddings LIMIT 1")
    assert dims.column("n").to_pylist() == [EMBEDDING_DIM]


def test_scores_views_after_scoring(lake: Lake) -> None:
    with pytest.raises(SaealignError, match=r"no 'scores' table yet.*saealign score"):
        run_query(lake.uri, "SELECT * FROM scores")
    scoring.score_topic(lake.uri, "medical", ["heart"], min_support=1)
    top = run_query(lake.uri, "SELECT latent, score FROM scores WHERE topic = 'medical' ORDER BY score DESC")
    # d(11) = 0, d(12) = d(13) = sqrt(2): g0 = 0.7 sqrt(2)/1.2, g1 = 1.0 sqrt(2)/1.5, g2 = sqrt(2)
    assert top.column("latent").to_pylist() == [0, 1, 2]
    topics = run_query(lake.uri, "SELECT topic, dataset, n_align FROM topics")
    assert topics.to_pylist() == [{"topic": "medical", "dataset": KEY.name, "n_align": 1}]
    joined = run_query(
        lake.uri,
        "SELECT s.latent, s.score, l.support FROM scores s JOIN latent_stats l USING (dataset, latent) "
        "ORDER BY s.latent",
    )
    assert joined.num_rows == 3


def test_missing_lake_table_is_a_clear_error(lake: Lake) -> None:
    lake.fs.delete_dir(lake.path("latent_stats"))
    with pytest.raises(SaealignError, match=r"no 'latent_stats' table.*build-lake"):
        run_query(lake.uri, "SELECT * FROM latent_stats")
    with pytest.raises(SaealignError, match="no lake at"):
        run_query(lake.path("nowhere"), "SELECT 1")


def test_connection_cannot_write_files(lake: Lake, tmp_path: Path) -> None:
    conn = open_lake(lake.uri)
    try:
        for sql in (f"COPY (SELECT 1) TO '{tmp_path}/x.csv'", f"ATTACH '{tmp_path}/x.db' AS x"):
            with pytest.raises(duckdb.Error):
                conn.execute(sql)
        with pytest.raises(duckdb.Error):
            conn.execute("SET enable_external_access = true")
    finally:
        conn.close()
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "x.db").exists()


def test_output_formats() -> None:
    table = pa.table({"latent": [1, 2], "score": [0.5, None], "text": ["a", "b\nc"]})
    text = format_result(table, "table")
    assert text.splitlines()[0].split() == ["latent", "|", "score", "|", "text"]
    assert "NULL" in text and "(2 rows)" in text
    assert format_result(table, "csv").splitlines() == ["latent,score,text", "1,0.5,a", '2,,"b', 'c"']
    assert json.loads(format_result(table, "json")) == table.to_pylist()
    with pytest.raises(SaealignError, match="unknown output format"):
        format_result(table, "xml")


def test_query_job_cli(lake: Lake, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    sql = "SELECT latent, support FROM latent_stats ORDER BY latent"
    assert query_job.main(["--lake", lake.uri, "--format", "csv", sql]) == 0
    assert capsys.readouterr().out.splitlines() == ["latent,support", "0,2", "1,2", "2,1"]
    assert query_job.main(["--lake", lake.uri, "--max-rows", "1", sql]) == 0
    assert "showing 1 of 3 rows" in capsys.readouterr().out
    out = tmp_path / "r.json"
    assert query_job.main(["--lake", lake.uri, "--format", "json", "--out", str(out), sql]) == 0
    assert json.loads(out.read_text())[2] == {"latent": 2, "support": 1}
    with pytest.raises(SaealignError, match="refused"):
        query_job.main(["--lake", lake.uri, "DROP TABLE scores"])
