"""Operators behind ``build-lake``: pool preparation and the per-shard compute.

``PromptEncoder`` runs the LM only up to the hook (``stop_at_layer``), SAE-encodes counted
positions, summarises per prompt and returns sparse rows: dense per-token activations never
leave it. ``workflows/build_lake.py`` wraps these in Ray Data actors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from ops.errors import SaealignError
from ops.lake.contract import EMBEDDINGS, LATENT_STATS, PROMPTS, prompt_id
from ops.lake.summaries import sparse_rows, summarise
from ops.models.embedders import Precision, embed
from ops.models.lm import load_model
from ops.saes.registry import check_sae_fits, load_sae
from ops.steering.activations import iter_batches, run_to_hook
from ops.texts import TextTable


@dataclass(frozen=True)
class PreparedPool:
    """Deduplicated pool rows (prompt_id, text, source, task) in source order."""

    table: pa.Table
    n_input: int
    n_empty: int
    n_duplicates: int

    def fingerprint(self) -> str:
        ids = self.table.column("prompt_id").to_numpy()
        return hashlib.blake2b(ids.tobytes(), digest_size=16).hexdigest()

    def shards(self, shard_size: int) -> list[tuple[int, pa.Table]]:
        """Numbered shards of ``shard_size`` prompts, cut from the pool ordered by character
        length, then prompt_id, so a shard's LM batches carry little padding. The order depends
        only on the texts, so shard numbers are stable across re-runs."""
        keys = pa.table({"n": pc.utf8_length(self.table.column("text")), "id": self.table.column("prompt_id")})
        table = self.table.take(pc.sort_indices(keys, sort_keys=[("n", "ascending"), ("id", "ascending")]))
        return [(i, table.slice(s, shard_size)) for i, s in enumerate(range(0, table.num_rows, shard_size))]


def prepare_pool(sources: list[TextTable]) -> PreparedPool:
    """Concatenate sources, drop empty texts and repeated texts (same prompt_id)."""
    parts = []
    for src in sources:
        t = src.table
        task = t.column("task") if "task" in t.column_names else None
        if task is None and "label" in t.column_names:
            task = t.column("label")
        n = t.num_rows
        parts.append(
            pa.table(
                {
                    "text": t.column("text").cast(pa.string()),
                    "source": pa.array([src.source] * n, pa.string()),
                    "task": task.cast(pa.string()) if task is not None else pa.nulls(n, pa.string()),
                }
            )
        )
    table = pa.concat_tables(parts) if parts else pa.table({"text": pa.array([], pa.string())})
    n_input = table.num_rows
    stripped = pc.utf8_trim_whitespace(pc.fill_null(table.column("text"), ""))
    table = table.filter(pc.greater(pc.utf8_length(stripped), 0))
    n_empty = n_input - table.num_rows
    if table.num_rows == 0:
        raise SaealignError("the pool has no non-empty text; fix: pass a pool source with texts")
    ids = np.array([prompt_id(t) for t in table.column("text").to_pylist()], dtype=np.int64)
    _, first = np.unique(ids, return_index=True)
    keep = np.sort(first)
    table = table.append_column("prompt_id", pa.array(ids)).take(pa.array(keep))
    return PreparedPool(
        table=table.select(["prompt_id", "text", "source", "task"]),
        n_input=n_input,
        n_empty=n_empty,
        n_duplicates=len(ids) - len(keep),
    )


class PromptEncoder:
    """Loads the model and SAE once; turns a shard of prompts into lake rows."""

    def __init__(
        self, model: str, sae: str, hook: str | None, summary: str, context: int, batch_tokens: int, device: str = "cpu"
    ) -> None:
        self.model = load_model(model, device=device)
        self.sae = load_sae(sae, device=device)
        self.hook = check_sae_fits(self.sae, self.model, hook)
        self.summary = summary
        self.context = min(context, self.model.n_ctx)
        self.batch_tokens = batch_tokens

    @torch.no_grad()
    def encode(self, shard: pa.Table) -> tuple[pa.Table, pa.Table]:
        """(prompts table, sparse activations table) for one shard."""
        texts = shard.column("text").to_pylist()
        ids = shard.column("prompt_id").to_pylist()
        n_tokens = np.zeros(len(texts), dtype=np.int32)
        full_lengths = [len(r) for r in self.model.tokenize(texts, max_length=10**9)]
        acts_parts = []
        for batch in iter_batches(self.model, texts, self.batch_tokens, self.context):
            x = run_to_hook(self.model, batch, self.hook)
            keep = batch.keep.to(x.device)
            token_acts = self.sae.encode(x[keep])
            row_of_token = torch.nonzero(keep, as_tuple=True)[0]
            summary = summarise(token_acts, row_of_token, len(batch.rows), self.summary)
            acts_parts.append(sparse_rows(summary, [ids[r] for r in batch.rows]))
            n_tokens[batch.rows] = batch.attention_mask.sum(dim=1).numpy()
        prompts = shard.append_column("n_tokens", pa.array(n_tokens, pa.int32())).append_column(
            "truncated", pa.array([n > self.context for n in full_lengths])
        )
        return prompts.select(PROMPTS.names), pa.concat_tables(acts_parts)


def embed_shard(
    shard: pa.Table, embedder: str, batch_size: int = 64, max_batch_tokens: int = 4096, precision: Precision = "fp32"
) -> pa.Table:
    """The embeddings table for one shard (L2-normalised vectors). Batches are capped at
    ``max_batch_tokens`` padded tokens, so the embedding actor's peak memory does not follow the
    longest prompts of the pool (64 prompts of 256 tokens need 4x the attention memory of 64 of
    128)."""
    texts = shard.column("text").to_pylist()
    vectors = embed(texts, embedder, batch_size=batch_size, max_batch_tokens=max_batch_tokens, precision=precision)
    flat = pa.array(vectors.reshape(-1), pa.float32())
    return pa.table(
        {
            "prompt_id": shard.column("prompt_id"),
            "embedding": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]),
            "embedder": pa.array([embedder] * shard.num_rows, pa.string()),
        },
        schema=EMBEDDINGS,
    )


def latent_stats_table(activations: pa.Table | Iterable[pa.RecordBatch], d_sae: int) -> pa.Table:
    """Per latent: support (#prompts with a non-zero summary) and total summary mass.

    Takes a table or a stream of record batches (``latent`` and ``value`` columns): memory is two
    ``d_sae`` arrays plus one batch, whatever the size of the lake."""
    support = np.zeros(d_sae, dtype=np.int64)
    mass = np.zeros(d_sae, dtype=np.float64)
    batches = activations.to_batches() if isinstance(activations, pa.Table) else activations
    for batch in batches:
        latent = batch.column("latent").to_numpy()
        if len(latent) and (latent.min() < 0 or latent.max() >= d_sae):
            raise SaealignError(f"activation rows name latents outside 0..{d_sae - 1}: the lake does not match the SAE")
        support += np.bincount(latent, minlength=d_sae)
        mass += np.bincount(latent, weights=batch.column("value").to_numpy().astype(np.float64), minlength=d_sae)
    fired = np.flatnonzero(support)
    return pa.table(
        {"latent": fired.astype(np.int32), "support": support[fired], "total_mass": mass[fired]}, schema=LATENT_STATS
    )


def describe_pool(pool: PreparedPool) -> dict[str, Any]:
    return {
        "input_rows": pool.n_input,
        "empty_dropped": pool.n_empty,
        "duplicates_dropped": pool.n_duplicates,
        "prompts": pool.table.num_rows,
        "fingerprint": pool.fingerprint(),
    }
