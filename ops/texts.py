"""Text sources: the project's embedded texts, local files with a text column, `datasets` names.

A *source spec* is a string:

* ``embedded:pool`` — the embedded reference pool (1,600 prompts over 40 task styles);
* ``embedded:topic:<name>`` — the embedded alignment texts of a topic (medical, shoes, ...);
* ``embedded:ontology`` — the embedded labelled concepts; ``embedded:demo-prompts`` (medical
  metaphors), ``embedded:neutral-prompts`` (48 general sentence openings about no topic),
  ``embedded:unaligned`` — evaluation prompts;
* a path to a ``.jsonl``, ``.json``, ``.csv`` or ``.parquet`` file with a text column;
* ``hf:<dataset>[:<config>][@<split>]`` — a Hugging Face ``datasets`` dataset: a hub name
  (connected use), a directory written by ``save_to_disk``, or a local directory of Parquet /
  JSON / CSV files (``:<config>`` = its sub-directory, e.g. one P3 task), offline.

Optional ``#<start>:<stop>`` after a file or embedded spec selects rows by file order
(e.g. ``pool.jsonl#:-2500`` drops the last 2,500 rows).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ops.errors import SaealignError
from ops.paths import DATA_DIR

TEXT_COLUMN = "text"

_EMBEDDED = {
    "pool": DATA_DIR / "pool.jsonl.gz",
    "ontology": DATA_DIR / "ontology.jsonl",
    "demo-prompts": DATA_DIR / "demo_prompts.jsonl",
    "neutral-prompts": DATA_DIR / "neutral_prompts.jsonl",
    "unaligned": DATA_DIR / "unaligned_chat.jsonl",
}


def embedded_topics() -> list[str]:
    """Names of the topics whose alignment texts ship with the package."""
    return sorted(p.name.removesuffix("_texts.jsonl") for p in (DATA_DIR / "topics").glob("*_texts.jsonl"))


@dataclass(frozen=True)
class TextTable:
    """Rows read from one source: ``table`` always has a string ``text`` column."""

    source: str
    table: pa.Table

    @property
    def texts(self) -> list[str]:
        return [str(t) for t in self.table.column(TEXT_COLUMN).to_pylist()]

    def __len__(self) -> int:
        return self.table.num_rows


def _split_slice(spec: str) -> tuple[str, slice]:
    if "#" not in spec:
        return spec, slice(None)
    base, _, sl = spec.rpartition("#")
    try:
        start, stop = (int(x) if x.strip() else None for x in sl.split(":"))
    except ValueError:
        raise SaealignError(f"bad row selection '#{sl}' in '{spec}'; use '#start:stop', e.g. '#:-2500'") from None
    return base, slice(start, stop)


def _read_jsonl(path: Path) -> pa.Table:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return pa.Table.from_pylist(rows) if rows else pa.table({TEXT_COLUMN: pa.array([], pa.string())})


def _read_file(path: Path, text_column: str) -> pa.Table:
    if not path.is_file():
        raise SaealignError(f"text source '{path}' does not exist; fix: pass an existing file")
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".json")):
        table = _read_jsonl(path)
    elif name.endswith(".csv"):
        table = pacsv.read_csv(path)
    elif name.endswith(".parquet"):
        table = pq.read_table(path)
    else:
        raise SaealignError(f"cannot read '{path}': use a .jsonl, .csv or .parquet file with a text column")
    if text_column not in table.column_names:
        raise SaealignError(
            f"'{path}' has no '{text_column}' column (columns: {', '.join(table.column_names) or 'none'}); "
            "fix: add a text column or pass --text-column"
        )
    if text_column != TEXT_COLUMN:
        table = table.rename_columns([TEXT_COLUMN if c == text_column else c for c in table.column_names])
    return table.set_column(
        table.column_names.index(TEXT_COLUMN), TEXT_COLUMN, table.column(TEXT_COLUMN).cast(pa.string())
    )


def _load_hf(name: str, config: str, split: str) -> object:
    """One split of a ``datasets`` dataset: a directory written by ``save_to_disk`` (a Dataset,
    or a DatasetDict whose split is picked), a local directory of data files (Parquet, JSON, CSV;
    ``config`` is then its sub-directory, as in P3's one-directory-per-task layout), or a hub
    name (connected; ``config`` is the hub configuration)."""
    import datasets

    path = Path(name).expanduser()
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        ds = datasets.load_from_disk(str(path / config if config else path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise SaealignError(
                    f"dataset '{name}' has no split '{split}' (splits: {', '.join(ds)}); fix: pass hf:{name}@<split>"
                )
            ds = ds[split]
        return ds
    if path.is_dir():
        return datasets.load_dataset(str(path), data_dir=config or None, split=split)
    return datasets.load_dataset(name, config or None, split=split)


def _read_hf(spec: str, text_column: str) -> pa.Table:
    body = spec.removeprefix("hf:")
    body, _, split = body.partition("@")
    name, _, config = body.partition(":")
    try:
        ds = _load_hf(name, config, split or "train")
    except SaealignError:
        raise
    except Exception as exc:  # hub and file errors come in many types
        raise SaealignError(
            f"cannot load dataset '{name}' ({type(exc).__name__}: {exc}); "
            "fix: connect to the hub, pass a local dataset directory, or use a local file or 'embedded:pool'"
        ) from exc
    columns = list(ds.column_names)  # type: ignore[attr-defined]
    if text_column not in columns:
        raise SaealignError(
            f"dataset '{name}' has no '{text_column}' column (columns: {', '.join(columns)}); fix: pass --text-column"
        )
    table = ds.select_columns([text_column]).with_format("arrow")[:]  # type: ignore[attr-defined]
    return pa.table({TEXT_COLUMN: table.column(text_column).cast(pa.string())})


def _embedded_path(name: str) -> Path:
    if name.startswith("topic:"):
        topic = name.removeprefix("topic:")
        path = DATA_DIR / "topics" / f"{topic}_texts.jsonl"
        if not path.is_file():
            raise SaealignError(f"no embedded topic '{topic}'; available: {', '.join(embedded_topics())}")
        return path
    if name not in _EMBEDDED:
        known = ", ".join([*(f"embedded:{k}" for k in _EMBEDDED), "embedded:topic:<name>"])
        raise SaealignError(f"unknown embedded source 'embedded:{name}'; available: {known}")
    return _EMBEDDED[name]


def read_texts(spec: str, text_column: str = TEXT_COLUMN) -> TextTable:
    """Read one source spec (see module docstring) into a :class:`TextTable`."""
    base, rows = _split_slice(spec)
    if base.startswith("hf:"):
        table = _read_hf(base, text_column)
    elif base.startswith("embedded:"):
        table = _read_file(_embedded_path(base.removeprefix("embedded:")), TEXT_COLUMN)
    else:
        table = _read_file(Path(base).expanduser(), text_column)
    start, stop, _ = rows.indices(table.num_rows)
    table = table.slice(start, max(0, stop - start))
    return TextTable(source=spec, table=table)


def read_many(specs: list[str], text_column: str = TEXT_COLUMN) -> list[TextTable]:
    """Read several sources; an empty source is an error (it is almost always a wrong path)."""
    if not specs:
        raise SaealignError("no text source given; fix: pass at least one source (e.g. embedded:pool)")
    tables = [read_texts(s, text_column) for s in specs]
    for t in tables:
        if len(t) == 0:
            raise SaealignError(f"text source '{t.source}' has no rows; fix: pass a source with texts")
    return tables
