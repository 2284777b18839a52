"""Benchmark of topic scoring (not run by CI; prints tables, writes ``docs/data/scoring.json``).

Part A — a new topic on a lake of real text, embedder loaded: the reference pool's texts
(``embedded:pool`` by default) embedded with MiniLM, the medical align texts, and the phases of
``ops.scoring.scores.score_topic`` (embed P_align, distances, DuckDB scoring, storage). With no built
lake the activations are synthetic (``--lake`` takes a lake written by ``saealign build-lake``).
Compare the paper (V100): per topic 62 s = embeddings 56 s + distances 2.4 s + scoring 3.7 s.

Part B — the scoring computation alone on a synthetic lake of ``--rows`` activation rows
(default 1e8): the DuckDB query with a bounded ``memory_limit`` and a ``temp_directory``, side
by side with a streaming NumPy implementation (and, for small lakes, an in-memory pandas one),
each in its own process so that its peak RSS is its own. The results are compared.

    .venv/bin/python -m tests.benchmarks.bench_scoring --rows 1e8 --memory-limit 1GB

The numbers go with the machine, date and command to ``--out`` (default
``docs/data/scoring.json``), from which ``make docs`` renders ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ops.lake.contract import ACTIVATIONS, EMBEDDINGS, DatasetKey, Lake, prompt_id
from tests.benchmarks.machine import DATA, write_result

KEY = DatasetKey(model="bench-lm", sae="bench-sae", hook="blocks.6.hook_resid_post")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _write_manifest(lake: Lake, d_sae: int, embedder: str) -> None:
    manifest = {"dataset": KEY.name, "key": asdict(KEY), "embedder": embedder, "d_sae": d_sae, "config": {}}
    lake.write_json(lake.manifest_path(KEY), manifest)


def synthetic_activations(ids: np.ndarray, d_sae: int, per_prompt: int, rng: np.random.Generator) -> pa.Table:
    """``per_prompt`` distinct latents per prompt (random start, random odd stride mod a power of
    two), exponential values normalised to sum 1 per prompt (the ``avg`` summary)."""
    n = len(ids)
    start = rng.integers(0, d_sae, size=(n, 1))
    stride = 2 * rng.integers(0, d_sae // 2, size=(n, 1)) + 1
    latents = (start + np.arange(per_prompt)[None, :] * stride) % d_sae
    values = rng.exponential(size=(n, per_prompt)).astype(np.float32)
    values /= values.sum(axis=1, keepdims=True)
    return pa.table(
        {
            "prompt_id": np.repeat(ids, per_prompt),
            "latent": latents.ravel().astype(np.int32),
            "value": values.ravel(),
        },
        schema=ACTIVATIONS,
    )


# ---------------------------------------------------------------------------------------------
# Part A: a new topic on real text


def real_text_lake(root: Path, pool: str, d_sae: int, per_prompt: int) -> tuple[Lake, float]:
    """Embed the pool (MiniLM) and add synthetic activations; returns the lake and embed seconds."""
    from ops.models.embedders import EMBEDDED_EMBEDDER, embed
    from ops.texts import read_texts

    lake = Lake(str(root))
    if lake.datasets():
        return lake, float("nan")
    texts = sorted(set(read_texts(pool).texts))
    ids = np.array([prompt_id(t) for t in texts], dtype=np.int64)
    t0 = time.perf_counter()
    vectors = embed(texts, EMBEDDED_EMBEDDER, progress=True)
    seconds = time.perf_counter() - t0
    emb = pa.table(
        {"prompt_id": ids, "embedding": list(vectors), "embedder": [EMBEDDED_EMBEDDER] * len(ids)},
        schema=EMBEDDINGS,
    )
    lake.write_table(lake.shard_path("embeddings", KEY, 0), emb, EMBEDDINGS)
    acts = synthetic_activations(ids, d_sae, per_prompt, np.random.default_rng(0))
    lake.write_table(lake.shard_path("activations", KEY, 0), acts, ACTIVATIONS)
    _write_manifest(lake, d_sae, EMBEDDED_EMBEDDER)
    return lake, seconds


def part_a(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from ops.models.embedders import EMBEDDED_EMBEDDER, load_embedder
    from ops.scoring.scores import dataset_key, lake_embedder, min_distances, resolve_dataset, score_topic
    from ops.texts import read_texts

    t0 = time.perf_counter()
    if args.lake:
        source = Lake(args.lake)
        name = resolve_dataset(source)
        load_embedder(lake_embedder(source, dataset_key(source, name)))
        load_s = time.perf_counter() - t0
        lake_dir = work / "a-real-lake-copy"
        shutil.rmtree(lake_dir, ignore_errors=True)
        shutil.copytree(source.root, lake_dir, ignore=shutil.ignore_patterns("scores*"))
        pool_embed_s, note = float("nan"), f"lake {args.lake} (copied)"
    else:
        load_embedder(EMBEDDED_EMBEDDER)
        load_s = time.perf_counter() - t0
        lake_dir = work / f"a-pool-lake-{args.d_sae_a}"
        _, pool_embed_s = real_text_lake(lake_dir, args.pool, args.d_sae_a, args.per_prompt_a)
        note = f"{args.pool} embedded with MiniLM, synthetic activations"
    (lake_dir / "scores.duckdb").unlink(missing_ok=True)  # the bench's own copy: start clean
    shutil.rmtree(lake_dir / "scores", ignore_errors=True)
    lake = Lake(str(lake_dir))
    align = read_texts(args.align).texts
    rows = []
    for power in (1, 2):
        result = score_topic(lake.uri, "bench", align, power=power, min_support=20, replace=True)
        rows.append((power, result))
    n_prompts, n_align = rows[0][1]["n_prompts"], rows[0][1]["n_align"]
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(n_prompts, 384)).astype(np.float32)
    big = rng.normal(size=(10_000, 384)).astype(np.float32)
    t0 = time.perf_counter()
    min_distances(ref, big)
    big_s = time.perf_counter() - t0

    print(f"\nPart A: new topic on real text — {note}; {n_prompts} prompts, {n_align} align texts")
    if not np.isnan(pool_embed_s):
        print(f"  (lake set-up: pool embedded in {pool_embed_s:.1f} s, {n_prompts / pool_embed_s:.0f} prompts/s)")
    print(f"  embedder load (once per process): {load_s:.2f} s")
    print(f"  {'power':>5} | {'embed P_align':>13} | {'distances':>9} | {'DuckDB scoring':>14} | {'store':>6} | total")
    for power, r in rows:
        t = r["timings"]
        print(
            f"  {power:>5} | {t['embed_s']:>11.2f} s | {t['distances_s']:>7.2f} s | {t['scoring_s']:>12.2f} s | "
            f"{t['store_s']:>4.2f} s | {sum(t.values()):.2f} s"
        )
    print(f"  distances to 10,000 align texts (random unit vectors): {big_s:.2f} s")
    print("  paper (V100, 8K prompts, 20 texts): embeddings 56 s, distances 2.4 s, scoring 3.7 s, total 62 s")
    return {
        "source": note,
        "n_prompts": n_prompts,
        "n_align": n_align,
        "pool_embed_s": None if math.isnan(pool_embed_s) else pool_embed_s,
        "embedder_load_s": load_s,
        "rows": [{"power": power, **r["timings"], "total_s": sum(r["timings"].values())} for power, r in rows],
        "distances_10k_align_s": big_s,
    }


# ---------------------------------------------------------------------------------------------
# Part B: the scoring computation on a synthetic lake


def synthetic_lake(root: Path, rows: int, d_sae: int, per_prompt: int, shard_rows: int) -> tuple[Lake, Path]:
    """Activation shards of ``rows`` rows in total and a distances file; reused when present."""
    lake = Lake(str(root))
    dist_path = root / "distances.parquet"
    if dist_path.exists() and lake.datasets():
        return lake, dist_path
    rng = np.random.default_rng(0)
    n_prompts = rows // per_prompt
    ids = rng.integers(-(2**62), 2**62, size=n_prompts, dtype=np.int64)
    per_shard = max(1, shard_rows // per_prompt)
    t0 = time.perf_counter()
    for shard, start in enumerate(range(0, n_prompts, per_shard)):
        table = synthetic_activations(ids[start : start + per_shard], d_sae, per_prompt, rng)
        lake.write_table(lake.shard_path("activations", KEY, shard), table, ACTIVATIONS)
        done = min(start + per_shard, n_prompts)
        print(f"\r  writing synthetic shards: {done:>9}/{n_prompts} prompts", end="", file=sys.stderr)
    print(f"\n  written in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    d = rng.uniform(0.6, 1.4, size=n_prompts)
    pq.write_table(pa.table({"prompt_id": ids, "d": d}), dist_path)
    _write_manifest(lake, d_sae, "none")
    return lake, dist_path


def run_duckdb(lake_uri: str, dist_path: str, power: float, min_support: int, opts: dict[str, Any]) -> dict:
    import duckdb

    from ops.scoring.scores import score_latents

    conn = duckdb.connect()
    conn.execute("SET threads = $t", {"t": opts["threads"]})
    conn.execute("SET memory_limit = $m", {"m": opts["memory_limit"]})
    conn.execute("SET temp_directory = $d", {"d": opts["temp_directory"]})
    conn.execute("SET preserve_insertion_order = false")
    distances = pq.read_table(dist_path)
    t0 = time.perf_counter()
    table = score_latents(Lake(lake_uri), KEY, distances, power, min_support, conn=conn)
    return {"seconds": time.perf_counter() - t0, "table": table}


def run_numpy(lake_uri: str, dist_path: str, power: float, min_support: int, opts: dict[str, Any]) -> dict:
    """Streaming NumPy: per file, look up d by binary search, accumulate with bincount."""
    from ops.lake.query import table_files

    dist = pq.read_table(dist_path)
    t0 = time.perf_counter()
    order = np.argsort(dist["prompt_id"].to_numpy())
    ids = dist["prompt_id"].to_numpy()[order]
    w = dist["d"].to_numpy()[order] ** power
    d_sae = opts["d_sae"]
    num, den, support = np.zeros(d_sae), np.zeros(d_sae), np.zeros(d_sae, np.int64)
    for path in table_files(Lake(lake_uri), "activations", KEY):
        t = pq.read_table(path)
        pid, lat = t["prompt_id"].to_numpy(), t["latent"].to_numpy()
        val = t["value"].to_numpy().astype(np.float64)
        pos = np.minimum(np.searchsorted(ids, pid), len(ids) - 1)
        hit = (ids[pos] == pid) & (val > 0)
        lat, val, pos = lat[hit], val[hit], pos[hit]
        num += np.bincount(lat, val * w[pos], d_sae)
        den += np.bincount(lat, val, d_sae)
        support += np.bincount(lat, minlength=d_sae)
    table = _finish(num, den, support, min_support)
    return {"seconds": time.perf_counter() - t0, "table": table}


def run_pandas(lake_uri: str, dist_path: str, power: float, min_support: int, opts: dict[str, Any]) -> dict:
    """In-memory pandas: read everything, merge, group by latent."""
    import pandas as pd

    from ops.lake.query import table_files

    dist = pd.read_parquet(dist_path)
    t0 = time.perf_counter()
    acts = pd.concat([pd.read_parquet(p) for p in table_files(Lake(lake_uri), "activations", KEY)])
    acts = acts[acts["value"] > 0]
    dist = dist.groupby("prompt_id", as_index=False)["d"].min()
    merged = acts.merge(dist, on="prompt_id", how="inner")
    merged["value"] = merged["value"].astype("float64")
    merged["num"] = merged["value"] * merged["d"] ** power
    agg = merged.groupby("latent").agg(num=("num", "sum"), den=("value", "sum"), support=("value", "size"))
    d_sae = opts["d_sae"]
    num, den, support = np.zeros(d_sae), np.zeros(d_sae), np.zeros(d_sae, np.int64)
    idx = agg.index.to_numpy()
    num[idx], den[idx], support[idx] = agg["num"], agg["den"], agg["support"]
    return {"seconds": time.perf_counter() - t0, "table": _finish(num, den, support, min_support)}


def _finish(num: np.ndarray, den: np.ndarray, support: np.ndarray, min_support: int) -> pa.Table:
    fired = np.flatnonzero(support)
    g = num[fired] / den[fired]
    scored = support[fired] >= min_support
    score = np.full(len(fired), np.nan)
    if scored.any():
        gmax, gmin = g[scored].max(), g[scored].min()
        score[scored] = 1.0 if gmax - gmin <= 1e-9 * gmax else (gmax - g[scored]) / (gmax - gmin)
    return pa.table({"latent": fired.astype(np.int32), "g": g, "support": support[fired], "score": score})


def _child(fn_name: str, queue: Any, *args: Any) -> None:
    result = globals()[fn_name](*args)
    queue.put({"seconds": result["seconds"], "rss_mb": peak_rss_mb(), "table": result["table"]})


def in_process(fn_name: str, *args: Any) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn_name, queue, *args))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def _compare(a: pa.Table, b: pa.Table) -> tuple[float, float]:
    ga, gb = a["g"].to_numpy(), b["g"].to_numpy()
    sa = a["score"].to_numpy(zero_copy_only=False).astype(float)
    sb = b["score"].to_numpy(zero_copy_only=False).astype(float)
    assert np.array_equal(a["latent"].to_numpy(), b["latent"].to_numpy())
    assert np.array_equal(a["support"].to_numpy(), b["support"].to_numpy())
    assert np.array_equal(np.isnan(sa), np.isnan(sb))
    ok = ~np.isnan(sa)
    return float(np.abs(ga - gb).max(initial=0)), float(np.abs(sa[ok] - sb[ok]).max(initial=0))


def part_b(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    rows = int(float(args.rows))
    root = work / f"b-synthetic-{rows}-{args.d_sae_b}-{args.per_prompt_b}"
    lake, dist_path = synthetic_lake(root, rows, args.d_sae_b, args.per_prompt_b, args.shard_rows)
    size_mb = sum(p.stat().st_size for p in (root / "activations").rglob("*.parquet")) / 2**20
    temp_dir = tempfile.mkdtemp(prefix="duckdb-spill-", dir=work)
    opts = {
        "threads": args.threads,
        "memory_limit": args.memory_limit,
        "temp_directory": temp_dir,
        "d_sae": args.d_sae_b,
    }
    common = (lake.uri, str(dist_path), 1.0, 20, opts)
    results = {"DuckDB (score_latents.sql)": in_process("run_duckdb", *common)}
    results["NumPy, streaming per file"] = in_process("run_numpy", *common)
    if rows <= float(args.pandas_max_rows):
        results["pandas, in memory"] = in_process("run_pandas", *common)
    shutil.rmtree(temp_dir, ignore_errors=True)
    ref = results["DuckDB (score_latents.sql)"]
    print(
        f"\nPart B: scoring on a synthetic lake — {rows:.3g} activation rows, {rows // args.per_prompt_b} prompts, "
        f"d_sae {args.d_sae_b}, {size_mb:.0f} MB of Parquet; DuckDB threads {args.threads}, "
        f"memory_limit {args.memory_limit}"
    )
    head = f"  {'implementation':<28} | {'seconds':>8} | {'Mrows/s':>7} | {'peak RSS':>9} |"
    print(head + " max |Δg| / |Δscore| vs DuckDB")
    out_rows = []
    for name, r in results.items():
        dg, ds = _compare(ref["table"], r["table"])
        out_rows.append(
            {
                "implementation": name,
                "seconds": r["seconds"],
                "mrows_per_s": rows / r["seconds"] / 1e6,
                "peak_rss_mb": r["rss_mb"],
                "vs_duckdb": r["seconds"] / ref["seconds"],
                "max_abs_dg": dg,
                "max_abs_dscore": ds,
            }
        )
        print(
            f"  {name:<28} | {r['seconds']:8.2f} | {rows / r['seconds'] / 1e6:7.1f} | {r['rss_mb']:6.0f} MB | "
            f"{dg:.1e} / {ds:.1e}"
        )
    if rows > float(args.pandas_max_rows):
        print(f"  pandas, in memory: skipped above {float(args.pandas_max_rows):.0e} rows (--pandas-max-rows)")
    return {
        "rows": rows,
        "prompts": rows // args.per_prompt_b,
        "d_sae": args.d_sae_b,
        "parquet_mb": size_mb,
        "threads": args.threads,
        "memory_limit": args.memory_limit,
        "implementations": out_rows,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["a", "b", "both"], default="both")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "saealign-bench-scoring"))
    parser.add_argument("--lake", default="", help="part A: a lake built by saealign build-lake")
    parser.add_argument("--pool", default="embedded:pool", help="part A: reference texts when no --lake")
    parser.add_argument("--align", default="embedded:topic:medical", help="part A: align texts")
    parser.add_argument("--d-sae-a", type=int, default=4608)
    parser.add_argument("--per-prompt-a", type=int, default=200)
    parser.add_argument("--rows", default="1e8", help="part B: activation rows")
    parser.add_argument("--d-sae-b", type=int, default=16384, help="a power of two")
    parser.add_argument("--per-prompt-b", type=int, default=256, help="firing latents per prompt")
    parser.add_argument("--shard-rows", type=int, default=2_000_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-limit", default="1GB")
    parser.add_argument("--pandas-max-rows", default="3e7")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic lake for a re-run")
    parser.add_argument("--out", default=str(DATA / "scoring.json"), help="where the numbers go (JSON)")
    args = parser.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result: dict[str, Any] = {}
    if args.part in ("a", "both"):
        result["new_topic"] = part_a(args, work)
    if args.part in ("b", "both"):
        result["synthetic"] = part_b(args, work)
        if not args.keep:
            shutil.rmtree(work / f"b-synthetic-{int(float(args.rows))}-{args.d_sae_b}-{args.per_prompt_b}")
    result["bench"] = {"seconds": time.perf_counter() - t0}
    result["paper"] = "V100, 8K prompts, 20 align texts: embeddings 56 s, distances 2.4 s, scoring 3.7 s, total 62 s"
    write_result(args.out, "tests.benchmarks.bench_scoring", result, argv)


if __name__ == "__main__":
    main()
