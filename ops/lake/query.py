"""Read-only SQL over a lake: DuckDB views of its tables and a guard against writes.

Views: ``prompts``, ``embeddings``, ``activations``, ``latent_stats`` (all datasets, with the
partition columns ``model``, ``sae``, ``hook``, ``summary`` and a ``dataset`` column that matches
the manifests and the scores), ``manifests`` (one row per dataset, the full manifest as JSON),
and, once a topic has been scored, ``topics``, ``scores`` and ``align_texts`` from
``scores.duckdb`` (attached read-only).

Two locks keep a query from writing: only a single read statement passes
:func:`check_read_only` (SELECT, WITH, VALUES, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN of a read), and
the connection itself reads the Parquet tables through Arrow datasets, then turns off every file
access (``enable_external_access = false``, configuration locked): even a statement that slipped
through could not touch a file.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import tempfile
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from ops.errors import SaealignError
from ops.lake.contract import SCORES_DB, TABLES, DatasetKey, Lake

log = logging.getLogger(__name__)

SCORE_TABLES = ("topics", "scores", "align_texts")
PARTITION_COLUMNS = ("model", "sae", "hook", "summary")
_PARTITIONING = pads.partitioning(pa.schema([(c, pa.string()) for c in PARTITION_COLUMNS]), flavor="hive")
_DATASET_EXPR = " || '__' || ".join(PARTITION_COLUMNS)
_READ_TYPES = {duckdb.StatementType.SELECT}
_EXPLAIN = re.compile(r"^\s*(?:(?:--[^\n]*\n|/\*.*?\*/)\s*)*explain\b\s*(analy[sz]e\b)?", re.IGNORECASE | re.DOTALL)
_MISSING = re.compile(r"Table with name (\w+) does not exist", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------
# lake tables as files and datasets


def table_files(lake: Lake, table: str, key: DatasetKey | None = None) -> list[str]:
    """The Parquet files of one lake table (one dataset, or all), sorted; hidden temp files skipped."""
    base = lake.path(table, key.partition) if key else lake.path(table)
    infos = lake.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    name = "latent_stats.parquet" if table == "latent_stats" else None
    return sorted(
        i.path
        for i in infos
        if i.is_file
        and i.base_name.endswith(".parquet")
        and not i.base_name.startswith((".", "_"))
        and (name is None or i.base_name == name)
    )


def require_files(lake: Lake, table: str, key: DatasetKey | None = None) -> list[str]:
    """:func:`table_files`, or a :class:`SaealignError` naming the missing table and the fix."""
    files = table_files(lake, table, key)
    if not files:
        where = f" for dataset {key.name}" if key else ""
        raise SaealignError(
            f"the lake at {lake.uri} has no '{table}' table{where}; fix: run `saealign build-lake --lake {lake.uri}` "
            "(with the same model/SAE/hook/summary) first"
        )
    return files


def duckdb_paths(lake: Lake, files: list[str]) -> list[str]:
    """Paths DuckDB can open: local paths as they are, remote ones with their URI scheme (httpfs)."""
    if lake.is_local:
        return files
    scheme = lake.uri.split("://", 1)[0]
    return [f"{scheme}://{f}" for f in files]


def table_dataset(lake: Lake, table: str) -> pads.Dataset | None:
    """An Arrow dataset over one table of every dataset (hive partition columns as strings)."""
    files = table_files(lake, table)
    if not files:
        return None
    return pads.dataset(
        files,
        filesystem=lake.fs,
        format="parquet",
        partitioning=_PARTITIONING,
        partition_base_dir=lake.path(table),
        schema=pa.unify_schemas([TABLES[table], _PARTITIONING.schema]),
    )


def manifests_table(lake: Lake) -> pa.Table:
    """One row per dataset manifest; ``manifest`` holds the whole JSON document."""
    rows = []
    for name in lake.datasets():
        doc = lake.read_manifest(name)
        key = doc.get("key") or {}
        rows.append(
            {
                "dataset": name,
                "kind": doc.get("kind"),
                "created": doc.get("created"),
                **{c: key.get(c) for c in PARTITION_COLUMNS},
                "embedder": doc.get("embedder"),
                "d_sae": doc.get("d_sae"),
                "manifest": json.dumps(doc, default=str),
            }
        )
    names = ["dataset", "kind", "created", *PARTITION_COLUMNS, "embedder", "d_sae", "manifest"]
    types = [pa.int64() if n == "d_sae" else pa.string() for n in names]
    return pa.Table.from_pylist(rows, schema=pa.schema(list(zip(names, types, strict=True))))


# ---------------------------------------------------------------------------------------------
# the scores database


def local_scores_db(lake: Lake) -> str | None:
    """A local path DuckDB can open read-only (a downloaded copy for a remote lake); None if absent."""
    path = lake.scores_db_path()
    if not lake.exists(path):
        return None
    if lake.is_local:
        return path
    target = f"{tempfile.mkdtemp(prefix='saealign-scores-')}/{SCORES_DB}"
    pafs.copy_files(path, target, source_filesystem=lake.fs, destination_filesystem=pafs.LocalFileSystem())
    return target


def connect_read_only(path: str) -> duckdb.DuckDBPyConnection:
    """Open a DuckDB file read-only; a file held by a running score job is a clear error."""
    try:
        return duckdb.connect(path, read_only=True)
    except duckdb.IOException as exc:
        raise SaealignError(
            f"cannot open {path} read-only ({exc}); fix: wait for the running `saealign score` to finish"
        ) from exc


# ---------------------------------------------------------------------------------------------
# the guard and the connection


def check_read_only(sql: str) -> str:
    """Return ``sql`` if it is one read statement; raise :class:`SaealignError` otherwise."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise SaealignError(f"cannot parse the query: {exc}") from None
    if len(statements) != 1:
        raise SaealignError(f"pass exactly one SQL statement (got {len(statements)}); fix: run them one at a time")
    stmt = statements[0]
    if stmt.type == duckdb.StatementType.EXPLAIN:
        match = _EXPLAIN.match(stmt.query)
        if match is None or (match.group(1) and not _is_read(stmt.query[match.end() :])):
            raise SaealignError("EXPLAIN ANALYZE runs its statement: only a SELECT may follow it")
        return sql
    if stmt.type not in _READ_TYPES:
        raise SaealignError(
            f"query refused: {stmt.type.name} statements can change data; saealign query is read-only "
            "(SELECT, WITH, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN); fix: use `saealign score` to write scores"
        )
    return sql


def _is_read(sql: str) -> bool:
    try:
        inner = duckdb.extract_statements(sql)
    except duckdb.Error:
        return False
    return len(inner) == 1 and inner[0].type in _READ_TYPES


def open_lake(lake_uri: str) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with read-only views of the lake and no file access."""
    lake = Lake(lake_uri)
    if lake.fs.get_file_info(lake.root).type != pafs.FileType.Directory:
        raise SaealignError(f"no lake at {lake_uri}; fix: run `saealign build-lake --lake {lake_uri}` first")
    conn = duckdb.connect()
    try:
        for table in TABLES:
            dataset = table_dataset(lake, table)
            if dataset is not None:
                conn.from_arrow(dataset).project(f"*, {_DATASET_EXPR} AS dataset").create_view(table)
        conn.register("manifests", manifests_table(lake))
        db = local_scores_db(lake)
        if db is not None:
            _attach_scores(conn, db)
        conn.execute("SET enable_external_access = false")
        conn.execute("SET lock_configuration = true")
    except BaseException:
        conn.close()
        raise
    return conn


def _attach_scores(conn: duckdb.DuckDBPyConnection, path: str) -> None:
    try:
        conn.execute(f"ATTACH '{path.replace(chr(39), chr(39) * 2)}' AS saealign_scores (READ_ONLY)")
    except duckdb.IOException as exc:
        raise SaealignError(
            f"cannot open {path} read-only ({exc}); fix: wait for the running `saealign score` to finish"
        ) from exc
    present = {r[0] for r in conn.execute("SHOW TABLES FROM saealign_scores").fetchall()}
    for table in SCORE_TABLES:
        if table in present:
            conn.execute(f"CREATE VIEW {table} AS SELECT * FROM saealign_scores.main.{table}")


def run_query(lake_uri: str, sql: str) -> pa.Table:
    """Run one read-only statement over the lake's views; returns an Arrow table."""
    check_read_only(sql)
    conn = open_lake(lake_uri)
    try:
        return conn.sql(sql).to_arrow_table()
    except duckdb.CatalogException as exc:
        raise SaealignError(_missing_table_message(lake_uri, exc)) from None
    except duckdb.PermissionException as exc:
        raise SaealignError(f"query refused: {exc}; saealign query reads only the lake's views") from None
    except duckdb.Error as exc:
        raise SaealignError(f"query failed: {exc}") from None
    finally:
        conn.close()


def _missing_table_message(lake_uri: str, exc: Exception) -> str:
    match = _MISSING.search(str(exc))
    name = match.group(1) if match else None
    if name in TABLES:
        return f"the lake at {lake_uri} has no '{name}' table; fix: run `saealign build-lake --lake {lake_uri}` first"
    if name in SCORE_TABLES:
        return f"the lake at {lake_uri} has no '{name}' table yet; fix: run `saealign score --lake {lake_uri}` first"
    views = ", ".join([*TABLES, "manifests", *SCORE_TABLES])
    return f"query failed: {str(exc).splitlines()[0]}; the views are: {views}"


# ---------------------------------------------------------------------------------------------
# output


def format_result(table: pa.Table, fmt: str = "table", max_width: int = 60) -> str:
    """Render a result as an aligned text table, CSV or JSON (records)."""
    rows = table.to_pylist()
    if fmt == "json":
        return json.dumps(rows, indent=2, default=_json_default)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(table.column_names)
        writer.writerows([[_csv_cell(r[c]) for c in table.column_names] for r in rows])
        return buf.getvalue()
    if fmt != "table":
        raise SaealignError(f"unknown output format '{fmt}'; use table, csv or json")
    return _text_table(table.column_names, [[_cell(r[c], max_width) for c in table.column_names] for r in rows])


def _json_default(value: Any) -> Any:
    return value.tolist() if hasattr(value, "tolist") else str(value)


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    return json.dumps(value, default=_json_default) if isinstance(value, (list, dict)) else value


def _cell(value: Any, max_width: int) -> str:
    if value is None:
        text = "NULL"
    elif isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, list):
        text = "[" + ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in value) + "]"
    else:
        text = str(value)
    text = text.replace("\n", " ")
    return text if len(text) <= max_width else text[: max_width - 1] + "…"


def _text_table(columns: list[str], cells: list[list[str]]) -> str:
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    lines.append(f"({len(cells)} row{'s' if len(cells) != 1 else ''})")
    return "\n".join(lines)
