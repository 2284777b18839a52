"""The lake's data contract: table schemas, partition layout, file names, atomic writes.

Every writer goes through this module. Layout under a lake root (local path or a pyarrow
filesystem URI such as ``s3://bucket/lake``)::

    <table>/model=<m>/sae=<s>/hook=<h>/summary=<k>/part-<shard:05d>.parquet   (per shard)
    latent_stats/model=<m>/sae=<s>/hook=<h>/summary=<k>/latent_stats.parquet  (one file)
    manifests/<dataset>.json                                                 (one per dataset)
    scores.duckdb, scores/topic=<t>/<dataset>.parquet                        (topic scores)

A *dataset* is one (model, SAE, hook, summary) partition: several SAEs coexist in one lake.
``activations`` is long form, one row per (prompt, firing latent): the scoring query is then a
plain hash join on the integer ``prompt_id`` and a group-by on ``latent``, with no UNNEST.
``prompt_id`` is derived from the text alone, so re-runs and merges agree on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ops.errors import SaealignError

EMBEDDING_DIM = 384  # all-MiniLM-L6-v2
SCORES_DB = "scores.duckdb"
"""The scores database at the lake root (schema: ops/sql/scores_db.sql)."""

PROMPTS = pa.schema(
    [
        ("prompt_id", pa.int64()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("task", pa.string()),
        ("n_tokens", pa.int32()),
        ("truncated", pa.bool_()),
    ]
)
EMBEDDINGS = pa.schema(
    [
        ("prompt_id", pa.int64()),
        ("embedding", pa.list_(pa.float32(), EMBEDDING_DIM)),
        ("embedder", pa.string()),
    ]
)
ACTIVATIONS = pa.schema([("prompt_id", pa.int64()), ("latent", pa.int32()), ("value", pa.float32())])
LATENT_STATS = pa.schema([("latent", pa.int32()), ("support", pa.int64()), ("total_mass", pa.float64())])

SHARD_TABLES: dict[str, pa.Schema] = {"prompts": PROMPTS, "embeddings": EMBEDDINGS, "activations": ACTIVATIONS}
TABLES: dict[str, pa.Schema] = {**SHARD_TABLES, "latent_stats": LATENT_STATS}
SUMMARIES = ("avg", "max", "count")


def prompt_id(text: str) -> int:
    """Stable signed 64-bit id of a prompt text (BLAKE2b of the UTF-8 bytes)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def write_atomic(fs: pafs.FileSystem, path: str, write: Callable[[Any], None]) -> None:
    """The one way saealign writes a file: ``write(stream)`` fills a hidden temporary sibling, which
    is then renamed onto ``path``, so a reader or a resumed job never sees a half-written file (and
    a failed write leaves the old file as it was)."""
    parent, name = path.rsplit("/", 1)
    fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{name}"
    try:
        with fs.open_output_stream(tmp) as sink:
            write(sink)
        fs.move(tmp, path)
    except BaseException:
        if fs.get_file_info(tmp).type == pafs.FileType.File:
            fs.delete_file(tmp)
        raise


def json_bytes(payload: dict[str, Any]) -> bytes:
    """How saealign serialises a JSON document (manifests, reports)."""
    return (json.dumps(payload, indent=2, default=str) + "\n").encode()


def _safe(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "--", value)


@dataclass(frozen=True)
class DatasetKey:
    """The partition that one build-lake run writes."""

    model: str
    sae: str
    hook: str
    summary: str = "avg"

    def __post_init__(self) -> None:
        if self.summary not in SUMMARIES:
            raise SaealignError(f"unknown summary '{self.summary}'; use one of {', '.join(SUMMARIES)}")

    @property
    def partition(self) -> str:
        return f"model={_safe(self.model)}/sae={_safe(self.sae)}/hook={_safe(self.hook)}/summary={self.summary}"

    @property
    def name(self) -> str:
        """A flat name for manifests and score keys."""
        return f"{_safe(self.model)}__{_safe(self.sae)}__{_safe(self.hook)}__{self.summary}"


class Lake:
    """A lake root on a pyarrow filesystem."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        if "://" in uri:
            self.fs, root = pafs.FileSystem.from_uri(uri)
        else:
            self.fs, root = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
        self.root = root.rstrip("/")

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def shard_path(self, table: str, key: DatasetKey, shard: int) -> str:
        return self.path(table, key.partition, f"part-{shard:05d}.parquet")

    def stats_path(self, key: DatasetKey) -> str:
        return self.path("latent_stats", key.partition, "latent_stats.parquet")

    def partition_dir(self, table: str, key: DatasetKey) -> str:
        return self.path(table, key.partition)

    def manifest_path(self, key: DatasetKey | str) -> str:
        """``manifests/<dataset>.json`` of a dataset (its key or its name)."""
        return self.path("manifests", f"{key.name if isinstance(key, DatasetKey) else key}.json")

    def progress_path(self, key: DatasetKey) -> str:
        """The record of how a dataset's build started (pool fingerprint, shard layout, precision)."""
        return self.path("manifests", f".{key.name}.progress.json")

    def scores_db_path(self) -> str:
        return self.path(SCORES_DB)

    def scores_export_path(self, topic: str, dataset: str) -> str:
        """``scores/topic=<topic>/<dataset>.parquet``: one topic's scores on one dataset."""
        return self.path("scores", f"topic={topic}", f"{dataset}.parquet")

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type == pafs.FileType.File

    def shard_done(self, key: DatasetKey, shard: int) -> bool:
        """A shard is done when every per-shard table has its file (each written atomically)."""
        return all(self.exists(self.shard_path(t, key, shard)) for t in SHARD_TABLES)

    def write_table(self, path: str, table: pa.Table, schema: pa.Schema) -> None:
        """Validate against ``schema`` and write atomically (:func:`write_atomic`)."""
        table = conform(table, schema)
        write_atomic(self.fs, path, lambda sink: pq.write_table(table, sink, compression="zstd"))

    def write_json(self, path: str, payload: dict[str, Any]) -> None:
        write_atomic(self.fs, path, lambda sink: sink.write(json_bytes(payload)))

    def read_json(self, path: str) -> dict[str, Any]:
        with self.fs.open_input_stream(path) as src:
            return json.loads(src.read().decode())

    def dataset(self, table: str, key: DatasetKey) -> pads.Dataset:
        """An Arrow dataset over one table of one lake dataset (its partition directory)."""
        return pads.dataset(self.partition_dir(table, key), filesystem=self.fs, format="parquet")

    def read_manifest(self, dataset: str) -> dict[str, Any]:
        return self.read_json(self.manifest_path(dataset))

    def table_glob(self, table: str, key: DatasetKey | None = None) -> str:
        """A glob for DuckDB/pyarrow over one table (one dataset, or all of them)."""
        part = key.partition if key else "*/*/*/*"
        name = "latent_stats.parquet" if table == "latent_stats" else "part-*.parquet"
        return self.path(table, part, name)

    def datasets(self) -> list[str]:
        """Names of the datasets with a manifest."""
        sel = pafs.FileSelector(self.path("manifests"), allow_not_found=True)
        infos = self.fs.get_file_info(sel)
        return sorted(i.base_name.removesuffix(".json") for i in infos if i.is_file and not i.base_name.startswith("."))


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Select and cast ``table``'s columns to ``schema``; a missing column is an error."""
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise SaealignError(f"table is missing column(s) {missing} required by the lake schema")
    return table.select(schema.names).cast(schema)
