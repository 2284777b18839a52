"""``saealign query "SELECT …"``: read-only SQL over the lake.

Views: prompts, embeddings, activations, latent_stats (with model, sae, hook, summary and dataset
columns), manifests, and once topics are scored: topics, scores, align_texts. Statements that
could write (INSERT, CREATE, DROP, COPY, ATTACH, SET, PRAGMA, …) are refused::

    saealign query --lake out/lake "SELECT topic, latent, score FROM scores ORDER BY score DESC LIMIT 10"
    saealign query --lake out/lake --format csv "SELECT * FROM latent_stats" > stats.csv
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ops.errors import SaealignError
from ops.lake.query import format_result, run_query
from workflows._config import parse_config


@dataclass(frozen=True)
class QueryConfig:
    """Run one read-only SQL statement over the lake's tables."""

    sql: str = field(default="", metadata={"positional": True})
    """The statement (SELECT, WITH, DESCRIBE, SHOW, SUMMARIZE or EXPLAIN)."""
    lake: str = "out/lake"
    """Lake root (local path or pyarrow filesystem URI)."""
    format: Literal["table", "csv", "json"] = "table"
    """Output format."""
    max_rows: int = 200
    """Rows shown in table format (0 = all); csv and json always hold every row."""
    out: str = ""
    """Write the output to this file instead of stdout."""

    def __post_init__(self) -> None:
        if not self.sql.strip():
            raise SaealignError('pass a statement, e.g. saealign query "SHOW TABLES"')
        if self.max_rows < 0:
            raise SaealignError("--max-rows must be >= 0")


def build(cfg: QueryConfig) -> str:
    """Run the query; returns the formatted output."""
    table = run_query(cfg.lake, cfg.sql)
    if cfg.format == "table" and cfg.max_rows and table.num_rows > cfg.max_rows:
        text = format_result(table.slice(0, cfg.max_rows), "table")
        return f"{text}\n(showing {cfg.max_rows} of {table.num_rows} rows; --max-rows 0 shows all)"
    return format_result(table, cfg.format)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(QueryConfig, argv, "saealign query")
    text = build(cfg)
    if cfg.out:
        Path(cfg.out).write_text(text if text.endswith("\n") else text + "\n")
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0
