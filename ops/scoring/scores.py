"""Topic scores for every SAE latent (docs/algorithms.md §2): distances, the DuckDB query, storage, loading.

Steps for one topic: embed P_align with the embedder recorded in the lake's embeddings; compute
each reference prompt's minimum distance to P_align (NumPy, in blocks); join the distances with
the dataset's activation files in one DuckDB query (``ops/sql/score_latents.sql``); store the
result in ``<lake>/scores.duckdb`` in one transaction and export it to
``<lake>/scores/topic=<topic>/<dataset>.parquet`` (atomic rename). Readers
(:func:`topic_scores`, :func:`list_topics`) use the Parquet export, so a serving process never
contends for the database's lock.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from ops.errors import SaealignError, TopicExistsError
from ops.lake.contract import SCORES_DB, DatasetKey, Lake
from ops.lake.query import (
    connect_read_only,
    duckdb_paths,
    local_scores_db,
    require_files,
)
from ops.models.embedders import embed
from ops.paths import SQL_DIR

log = logging.getLogger(__name__)

SCORES = pa.schema(
    [
        ("topic", pa.string()),
        ("dataset", pa.string()),
        ("sae", pa.string()),
        ("latent", pa.int32()),
        ("g", pa.float64()),
        ("support", pa.int64()),
        ("score", pa.float64()),
    ]
)
LATENT_SCORES = pa.schema([SCORES.field(n) for n in ("latent", "g", "support", "score")])
DISTANCES = pa.schema([("prompt_id", pa.int64()), ("d", pa.float64())])
METADATA_KEY = b"saealign.topic"
TOPIC_COLUMNS = (
    "topic",
    "dataset",
    "model",
    "sae",
    "hook",
    "summary",
    "d_sae",
    "embedder",
    "n_align",
    "n_prompts",
    "n_scored",
    "distance_power",
    "min_support",
    "align_source",
)
_TOPIC = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_PARAM = re.compile(r"\$(\w+)")
_BLOCK = 1 << 24  # similarity entries per matmul block (64 MB of float32)


# ---------------------------------------------------------------------------------------------
# SQL files


def sql_file(name: str) -> str:
    """The text of ``ops/sql/<name>.sql``."""
    return (SQL_DIR / f"{name}.sql").read_text()


@lru_cache(maxsize=8)
def sql_sections(name: str) -> dict[str, str]:
    """Named sections (``-- name: <section>``) of ``ops/sql/<name>.sql``."""
    parts = re.split(r"^-- name: (\w+)\s*$", sql_file(name), flags=re.MULTILINE)
    return {parts[i]: parts[i + 1].strip() for i in range(1, len(parts), 2)}


def _bound(sql: str, params: dict[str, Any]) -> dict[str, Any] | None:
    used = set(_PARAM.findall(sql))
    return {k: v for k, v in params.items() if k in used} or None


def run_sql(conn: duckdb.DuckDBPyConnection, sql: str, params: dict[str, Any]) -> duckdb.DuckDBPyConnection:
    """Execute ``sql`` binding the ``$name`` parameters it uses (extra entries are ignored)."""
    return conn.execute(sql, _bound(sql, params))


def query_arrow(conn: duckdb.DuckDBPyConnection, sql: str, params: dict[str, Any]) -> pa.Table:
    """Run a query with bound ``$name`` parameters and return its rows as an Arrow table."""
    return conn.sql(sql, params=_bound(sql, params)).to_arrow_table()


# ---------------------------------------------------------------------------------------------
# datasets of a lake


def resolve_dataset(lake: Lake, dataset: str | None = None) -> str:
    """The dataset to use: ``dataset`` if the lake has it, else the lake's only one."""
    names = lake.datasets()
    if not names:
        raise SaealignError(f"the lake at {lake.uri} has no dataset manifest; fix: run `saealign build-lake` first")
    if dataset is None:
        if len(names) > 1:
            raise SaealignError(f"the lake at {lake.uri} holds several datasets; fix: pass --dataset, one of {names}")
        return names[0]
    if dataset not in names:
        raise SaealignError(f"the lake at {lake.uri} has no dataset '{dataset}'; fix: pass one of {names}")
    return dataset


def dataset_key(lake: Lake, name: str) -> DatasetKey:
    """The partition of dataset ``name``, from its manifest's ``key``."""
    key = lake.read_manifest(name).get("key")
    if not isinstance(key, dict) or not {"model", "sae", "hook"} <= key.keys():
        raise SaealignError(f"manifest of dataset '{name}' has no 'key' (model, sae, hook); fix: rebuild the lake")
    return DatasetKey(model=key["model"], sae=key["sae"], hook=key["hook"], summary=key.get("summary", "avg"))


def _embeddings(lake: Lake, key: DatasetKey) -> pads.Dataset:
    return pads.dataset(require_files(lake, "embeddings", key), filesystem=lake.fs, format="parquet")


def lake_embedder(lake: Lake, key: DatasetKey) -> str:
    """The embedder named in the dataset's ``embeddings`` table (one name for all rows)."""
    names = pc.unique(_embeddings(lake, key).to_table(columns=["embedder"]).column("embedder")).to_pylist()
    names = [n for n in names if n]
    if len(names) != 1:
        raise SaealignError(f"dataset {key.name} has embeddings from {names or 'no'} embedder(s); fix: rebuild it")
    return str(names[0])


# ---------------------------------------------------------------------------------------------
# distances


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def min_distances(ref: np.ndarray, align: np.ndarray, block: int = _BLOCK) -> np.ndarray:
    """d [n_ref] float64: min over ``align`` [n_align, dim] of the Euclidean distance between
    L2-normalised rows. The nearest align row comes from a float32 matmul in blocks (for unit
    vectors ||a-b||² = 2 − 2a·b, so the nearest is the most similar); the distance to it is then
    computed directly in float64, which avoids the cancellation of 2 − 2a·b near 0."""
    if len(align) == 0:
        raise SaealignError("the align set is empty; fix: pass at least one text with --align-file or --align-text")
    ref, align = _unit(ref), _unit(align)
    out = np.empty(len(ref), dtype=np.float64)
    rows = max(1, block // len(align))
    for start in range(0, len(ref), rows):
        chunk = ref[start : start + rows]
        nearest = np.argmax(chunk @ align.T, axis=1)
        diff = chunk.astype(np.float64) - align[nearest].astype(np.float64)
        out[start : start + rows] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    return out


def prompt_distances(lake: Lake, key: DatasetKey, align: np.ndarray, batch_rows: int = 8192) -> pa.Table:
    """(prompt_id, d) for every prompt of the dataset's ``embeddings`` table."""
    dataset = _embeddings(lake, key)
    ids, dists = [], []
    with tqdm(total=dataset.count_rows(), desc="distances", unit="prompt", leave=False) as bar:
        for batch in dataset.to_batches(columns=["prompt_id", "embedding"], batch_size=batch_rows):
            emb = batch.column("embedding")
            dim = emb.type.list_size
            ref = emb.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
            ids.append(batch.column("prompt_id").to_numpy(zero_copy_only=False))
            dists.append(min_distances(ref, align))
            bar.update(batch.num_rows)
    prompt_ids = np.concatenate(ids) if ids else np.empty(0, np.int64)
    d = np.concatenate(dists) if dists else np.empty(0)
    return pa.table({"prompt_id": prompt_ids, "d": d}, schema=DISTANCES)


# ---------------------------------------------------------------------------------------------
# the scoring query


def score_latents(
    lake: Lake,
    key: DatasetKey,
    distances: pa.Table,
    power: float = 1.0,
    min_support: int = 20,
    conn: duckdb.DuckDBPyConnection | None = None,
) -> pa.Table:
    """(latent, g, support, score) per latent that fires in the dataset (docs/algorithms.md §2), from one
    DuckDB query joining ``distances`` (prompt_id, d) with the dataset's activation files.
    ``conn`` may carry settings (threads, memory_limit, temp_directory); default: in-memory. The
    query reads the registered Arrow view ``distances`` (replaced on ``conn`` for the call)."""
    if power <= 0 or min_support < 0:
        raise SaealignError(f"distance power must be > 0 and min_support >= 0 (got {power}, {min_support})")
    files = duckdb_paths(lake, require_files(lake, "activations", key))
    own = conn is None
    db = duckdb.connect() if conn is None else conn
    db.register("distances", distances.select(DISTANCES.names).cast(DISTANCES))
    try:
        params = {"activations": files, "power": float(power), "min_support": int(min_support)}
        result = query_arrow(db, sql_file("score_latents"), params)
    except duckdb.Error as exc:
        raise SaealignError(f"scoring query failed on dataset {key.name}: {exc}") from exc
    finally:
        db.unregister("distances")
        if own:
            db.close()
    return result.cast(LATENT_SCORES)


# ---------------------------------------------------------------------------------------------
# storage


def check_topic_name(topic: str) -> str:
    if not _TOPIC.match(topic):
        raise SaealignError(
            f"bad topic name '{topic}'; fix: use letters, digits, '.', '_' or '-' (it names a directory)"
        )
    return topic


@contextmanager
def scores_database(lake: Lake) -> Iterator[duckdb.DuckDBPyConnection]:
    """A writable connection to ``scores.duckdb`` with its tables created. A remote lake's
    database is downloaded, written locally and uploaded (atomic move) when the block succeeds;
    on a remote lake, run one score job at a time (the last upload wins)."""
    remote = lake.scores_db_path()
    local = remote if lake.is_local else local_scores_db(lake) or f"{tempfile.mkdtemp()}/{SCORES_DB}"
    try:
        conn = duckdb.connect(local)
    except duckdb.IOException as exc:
        raise SaealignError(
            f"cannot open {remote} for writing ({exc}); fix: wait for the other saealign process using it"
        ) from exc
    try:
        conn.execute(sql_sections("scores_db")["create_tables"])
        _check_layout(conn, remote)
        yield conn
    finally:
        conn.close()
    if not lake.is_local:
        tmp = lake.path(f".tmp-{uuid.uuid4().hex}.duckdb")
        pafs.copy_files(local, tmp, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=lake.fs)
        lake.fs.move(tmp, remote)


def _check_layout(conn: duckdb.DuckDBPyConnection, path: str) -> None:
    """Refuse a database whose tables were made by another version of this module."""
    for table, columns in (("topics", ["topic", "dataset", *TOPIC_COLUMNS[2:]]), ("scores", SCORES.names)):
        found = [r[0] for r in conn.execute(f"DESCRIBE {table}").fetchall()]
        missing = [c for c in columns if c not in found]
        if missing:
            raise SaealignError(
                f"{path} has an older '{table}' table (no column(s) {missing}); "
                "fix: move the file away and re-score the topics"
            )


def topic_exists(conn: duckdb.DuckDBPyConnection, topic: str, dataset: str) -> bool:
    row = run_sql(conn, sql_sections("scores_db")["topic_exists"], {"topic": topic, "dataset": dataset}).fetchone()
    return bool(row and row[0])


def store_scores(
    lake: Lake,
    info: dict[str, Any],
    scores: pa.Table,
    align_texts: Sequence[str],
    replace: bool = False,
) -> dict[str, Any]:
    """Write one topic's scores, its ``topics`` row and its align texts in one transaction, then
    export the scores to Parquet. ``info`` holds the ``topics`` columns (:data:`TOPIC_COLUMNS`;
    missing ones are NULL). Returns the stored ``topics`` row. An existing (topic, dataset) is an
    error unless ``replace``."""
    info = {c: info.get(c) for c in TOPIC_COLUMNS}
    topic, dataset = check_topic_name(info["topic"]), info["dataset"]
    positions = np.arange(len(align_texts), dtype=np.int32)
    with scores_database(lake) as conn:
        conn.register("new_scores", scores.cast(LATENT_SCORES))
        conn.register("new_align_texts", pa.table({"position": positions, "text": list(align_texts)}))
        conn.begin()
        tmp = None
        try:
            row = _write_topic(conn, info, replace)
            tmp = _write_export_tmp(lake, topic, dataset, scores, row)
            conn.commit()
        except BaseException as exc:
            conn.rollback()
            if tmp is not None:
                lake.fs.delete_file(tmp)
            if isinstance(exc, duckdb.Error):
                raise SaealignError(
                    f"writing scores to {lake.scores_db_path()} failed, nothing written: {exc}"
                ) from exc
            raise
    lake.fs.move(tmp, lake.scores_export_path(topic, dataset))
    return row


def _write_topic(conn: duckdb.DuckDBPyConnection, info: dict[str, Any], replace: bool) -> dict[str, Any]:
    """Inside the caller's transaction: replace or refuse an existing topic, insert the topic row,
    the scores (registered view ``new_scores``) and the align texts (``new_align_texts``)."""
    q = sql_sections("scores_db")
    if topic_exists(conn, info["topic"], info["dataset"]):
        if not replace:
            raise TopicExistsError(
                f"topic '{info['topic']}' is already scored for dataset {info['dataset']}; "
                "fix: pass --replace to re-score it, or choose another topic name"
            )
        for name in ("delete_topic_rows", "delete_score_rows", "delete_align_rows"):
            run_sql(conn, q[name], info)
    for name in ("insert_topic", "insert_scores", "insert_align_texts"):
        run_sql(conn, q[name], info)
    cursor = run_sql(conn, q["topic_row"], info)
    columns = [d[0] for d in cursor.description]
    return dict(zip(columns, cursor.fetchone() or (), strict=True))


def _write_export_tmp(lake: Lake, topic: str, dataset: str, scores: pa.Table, row: dict[str, Any]) -> str:
    n = scores.num_rows
    table = pa.table(
        {
            "topic": pa.array([topic] * n, pa.string()),
            "dataset": pa.array([dataset] * n, pa.string()),
            "sae": pa.array([row.get("sae")] * n, pa.string()),
            **{c: scores.column(c) for c in LATENT_SCORES.names},
        }
    ).cast(SCORES.with_metadata({METADATA_KEY: json.dumps(row, default=str).encode()}))
    final = lake.scores_export_path(topic, dataset)
    parent = final.rsplit("/", 1)[0]
    lake.fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}.parquet"
    with lake.fs.open_output_stream(tmp) as sink:
        pq.write_table(table, sink, compression="zstd")
    return tmp


# ---------------------------------------------------------------------------------------------
# the whole job for one topic


def clean_align_texts(texts: Sequence[str]) -> list[str]:
    """Stripped, non-empty align texts; an empty set is an error."""
    kept = [t.strip() for t in texts if t and t.strip()]
    if not kept:
        raise SaealignError("the align set is empty; fix: pass at least one text with --align-file or --align-text")
    return kept


def score_topic(
    lake_uri: str,
    topic: str,
    align_texts: Sequence[str],
    dataset: str | None = None,
    power: float = 1.0,
    min_support: int = 20,
    replace: bool = False,
    align_source: str = "",
) -> dict[str, Any]:
    """Embed P_align, compute distances, score every latent, store and export; returns the
    ``topics`` row plus ``timings`` (seconds per step) and the ``top`` 10 latents."""
    lake = Lake(lake_uri)
    check_topic_name(topic)
    texts = clean_align_texts(align_texts)
    name = resolve_dataset(lake, dataset)
    key, manifest = dataset_key(lake, name), lake.read_manifest(name)
    require_files(lake, "activations", key)
    _refuse_existing(lake, topic, name, replace)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    embedder = lake_embedder(lake, key)
    align = embed(texts, embedder, progress=True)
    timings["embed_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    distances = prompt_distances(lake, key, align)
    timings["distances_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = score_latents(lake, key, distances, power, min_support)
    timings["scoring_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    info = _topic_info(topic, name, key, manifest, scores, texts, distances, power, min_support, embedder)
    row = store_scores(lake, {**info, "align_source": align_source}, scores, texts, replace)
    timings["store_s"] = time.perf_counter() - t0
    log.info("topic %s on %s: %d latents scored of %d firing", topic, name, row["n_scored"], scores.num_rows)
    return {**row, "timings": timings, "top": top_latents(scores, 10)}


def _refuse_existing(lake: Lake, topic: str, dataset: str, replace: bool) -> None:
    """Fail before the (slow) embedding when the topic exists and --replace is not given."""
    if replace or not lake.exists(lake.scores_export_path(topic, dataset)):
        return
    raise TopicExistsError(
        f"topic '{topic}' is already scored for dataset {dataset}; fix: pass --replace to re-score it, "
        "or choose another topic name"
    )


def _topic_info(
    topic: str,
    dataset: str,
    key: DatasetKey,
    manifest: dict[str, Any],
    scores: pa.Table,
    texts: list[str],
    distances: pa.Table,
    power: float,
    min_support: int,
    embedder: str,
) -> dict[str, Any]:
    return {
        "topic": topic,
        "dataset": dataset,
        "model": key.model,
        "sae": key.sae,
        "hook": key.hook,
        "summary": key.summary,
        "d_sae": _d_sae(manifest, scores),
        "embedder": embedder,
        "n_align": len(texts),
        "n_prompts": distances.num_rows,
        "n_scored": scores.num_rows - scores.column("score").null_count,
        "distance_power": float(power),
        "min_support": int(min_support),
    }


def _d_sae(manifest: dict[str, Any], scores: pa.Table) -> int:
    if manifest.get("d_sae"):
        return int(manifest["d_sae"])
    highest = pc.max(scores.column("latent")).as_py() if scores.num_rows else -1
    log.warning("the lake manifest records no d_sae; using the highest firing latent + 1 (%d)", highest + 1)
    return int(highest) + 1


def top_latents(scores: pa.Table, n: int = 10) -> list[dict[str, Any]]:
    """The ``n`` highest-scored latents (latent, score, g, support)."""
    scored = scores.filter(pc.is_valid(scores.column("score")))
    order = pc.sort_indices(scored, sort_keys=[("score", "descending"), ("latent", "ascending")])
    return scored.take(order[:n]).to_pylist()


# ---------------------------------------------------------------------------------------------
# readers


def list_topics(lake_uri: str) -> list[dict[str, Any]]:
    """One ``topics`` row per exported (topic, dataset), sorted by topic then dataset."""
    lake = Lake(lake_uri)
    sel = pafs.FileSelector(lake.path("scores"), recursive=True, allow_not_found=True)
    rows = []
    for info in lake.fs.get_file_info(sel):
        if info.is_file and info.base_name.endswith(".parquet") and not info.base_name.startswith("."):
            rows.append(_export_metadata(lake, info.path))
    return sorted(rows, key=lambda r: (r.get("topic", ""), r.get("dataset", "")))


def _export_metadata(lake: Lake, path: str) -> dict[str, Any]:
    with lake.fs.open_input_file(path) as src:
        meta = pq.read_schema(src).metadata or {}
    return json.loads(meta.get(METADATA_KEY, b"{}"))


def _topic_file(lake: Lake, topic: str, dataset: str | None) -> str:
    every = list_topics(lake.uri)
    rows = [r for r in every if r.get("topic") == topic and dataset in (None, r.get("dataset"))]
    if not rows:
        known = sorted({str(r.get("topic")) for r in every})
        where = f" for dataset {dataset}" if dataset else ""
        raise SaealignError(
            f"unknown topic '{topic}'{where} in the lake at {lake.uri} (scored topics: {known or 'none'}); "
            f"fix: run `saealign score --lake {lake.uri} --topic {topic} --align-file ...` first"
        )
    if len(rows) > 1:
        names = [r["dataset"] for r in rows]
        raise SaealignError(f"topic '{topic}' is scored on several datasets; fix: pass one of {names}")
    return lake.scores_export_path(topic, rows[0]["dataset"])


def topic_scores(lake_uri: str, topic: str, dataset: str | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Scores [d_sae] float32 (NaN where a latent has no score) and the topic's metadata
    (topic, dataset, model, sae, hook, summary, d_sae, embedder, n_align, distance_power, ...)."""
    lake = Lake(lake_uri)
    path = _topic_file(lake, topic, dataset)
    with lake.fs.open_input_file(path) as src:
        table = pq.read_table(src)
    meta = json.loads((table.schema.metadata or {}).get(METADATA_KEY, b"{}"))
    latents = table.column("latent").to_numpy()
    d_sae = int(meta.get("d_sae") or (latents.max() + 1 if len(latents) else 0))
    if len(latents) and latents.max() >= d_sae:
        raise SaealignError(f"scores of '{topic}' name latent {latents.max()} beyond d_sae {d_sae}; fix: re-score")
    out = np.full(d_sae, np.nan, dtype=np.float32)
    out[latents] = table.column("score").to_numpy(zero_copy_only=False).astype(np.float32)
    return out, meta


def topic_align_texts(lake_uri: str, topic: str, dataset: str | None = None) -> list[str]:
    """The align texts a topic was scored with (from ``scores.duckdb``)."""
    lake = Lake(lake_uri)
    name = _topic_file(lake, topic, dataset).rsplit("/", 1)[1].removesuffix(".parquet")
    path = local_scores_db(lake)
    if path is None:
        raise SaealignError(f"the lake at {lake_uri} has no {lake.scores_db_path()}; fix: run `saealign score` first")
    conn = connect_read_only(path)
    try:
        sql = sql_sections("scores_db")["align_texts"]
        return [r[0] for r in run_sql(conn, sql, {"topic": topic, "dataset": name}).fetchall()]
    finally:
        conn.close()
