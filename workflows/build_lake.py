"""``saealign build-lake``: a Ray Data job that writes the reference lake.

Pipeline (streaming, one row = one shard of prompts):

1. ``ShardLatents`` actors (callable class, ``ActorPoolStrategy``; GPU-aware): run the LM to the
   hook, SAE-encode, summarise per prompt, write ``prompts`` and ``activations`` shard files.
2. ``ShardEmbeddings`` actors: MiniLM embeddings (L2-normalised), write ``embeddings``. On a CPU
   with bf16 matrix units they run under bf16 autocast (``--embed-precision auto``).

Every shard file is written atomically and a stage skips a shard whose file exists, so a killed
job re-run (or a retried actor) ends with exactly the rows of an uninterrupted run. The driver
sees only per-shard counts. ``latent_stats`` and the manifest are written once all shards exist.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import cache
from itertools import zip_longest
from typing import Any, Literal

import pyarrow as pa
from tqdm.auto import tqdm

from ops.errors import SaealignError
from ops.lake.build import PreparedPool, describe_pool, latent_stats_table, prepare_pool
from ops.lake.contract import ACTIVATIONS, EMBEDDINGS, LATENT_STATS, PROMPTS, DatasetKey, Lake
from ops.manifest import base_manifest
from ops.models.embedders import EMBEDDED_EMBEDDER, Precision, resolve_precision
from ops.models.lm import EMBEDDED_MODEL, prepare_model_files
from ops.saes.registry import load_sae, sae_hook_name, sae_id
from ops.steering.engine import check_steerable
from ops.texts import read_many
from workflows._config import parse_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildLakeConfig:
    """Build the reference lake: prompt embeddings and sparse prompt-level SAE activations."""

    lake: str = "out/lake"
    """Lake root: a local path or a pyarrow filesystem URI (s3://bucket/lake, gs://...)."""
    pool: tuple[str, ...] = ("embedded:pool",)
    """Pool sources: embedded:pool, files with a text column, hf:<dataset>, or p3 (connected)."""
    text_column: str = "text"
    """Name of the text column in file sources."""
    model: str = EMBEDDED_MODEL
    """Language model (registry or TransformerLens name)."""
    sae: str = "default"
    """SAE: 'default', a sae-lens directory, or saelens:<release>/<sae_id>."""
    hook: str = ""
    """Hook point; empty = the hook recorded in the SAE."""
    summary: Literal["avg", "max", "count"] = "avg"
    """Prompt-level summary of token activations (docs/algorithms.md §1)."""
    embedder: str = EMBEDDED_EMBEDDER
    """Sentence embedder for prompt embeddings."""
    embed_precision: Precision = "auto"
    """Embedder arithmetic (the embedding actors run on CPU): auto = bf16 autocast where the CPU
    that starts the job has bf16 matrix units (AMX), else fp32. A dataset keeps the precision it
    was started with when resumed."""
    context: int = 512
    """Tokens per prompt; longer prompts are truncated (counted in the manifest)."""
    shard_size: int = 128
    """Prompts per shard (the unit of resumption)."""
    batch_tokens: int = 4096
    """Padded tokens per LM batch inside a shard."""
    workers: int = 0
    """LM/SAE actors (0 = auto: with GPUs, the cluster's GPUs / --gpus-per-worker; on CPU, one
    single-threaded actor per CPU, as many as --worker-memory-gb lets the cluster's memory hold)."""
    embed_workers: int = 1
    """Embedding actors."""
    cpus_per_worker: float = 0.0
    """CPUs reserved per actor, LM and embedding alike (0 = auto: 1 with GPUs; on CPU the cluster's
    CPUs shared evenly among all actors, at most 1 each)."""
    worker_memory_gb: float = 3.0
    """Memory Ray reserves per LM/SAE actor (the embedded model and SAE peak at 2.4 GB RSS); with
    --workers 0 it bounds how many actors start."""
    torch_threads: int = 0
    """torch intra-op threads per LM/SAE actor (0 = its reserved CPUs). More threads than reserved
    CPUs let the LM use the cores the embedding actors leave idle (a small machine running both).
    Embedding actors use their reserved CPUs."""
    gpus_per_worker: float = 0.0
    """GPUs per LM/SAE actor (0 on CPU)."""
    address: str = ""
    """Ray address to join (empty: start or reuse a local Ray)."""
    overwrite: bool = False
    """Allow rebuilding a dataset that was started from a different pool."""
    coverage: bool = False
    """After the build, report latent coverage by pool size (paper Fig. 3): table, PNG and JSON."""
    coverage_out: str = "out/coverage"
    """Directory for coverage.png and coverage.json."""

    def __post_init__(self) -> None:
        if self.shard_size <= 0 or self.embed_workers <= 0:
            raise SaealignError("--shard-size and --embed-workers must be positive")
        if min(self.workers, self.cpus_per_worker, self.worker_memory_gb, self.gpus_per_worker) < 0:
            raise SaealignError("--workers, --cpus-per-worker, --worker-memory-gb and --gpus-per-worker must be >= 0")
        resolve_precision(self.embed_precision)
        if self.torch_threads < 0:
            raise SaealignError(f"--torch-threads must be >= 0 (0 = the reserved CPUs), got {self.torch_threads}")


def _shard_rows(shards: list[tuple[int, pa.Table]], pending: set[int]) -> list[dict[str, Any]]:
    """Pending shards as dataset rows, interleaved short/long (shards are cut by length), so the
    progress bar's rate and ETA are not skewed by running all the short prompts first."""
    rows = []
    for shard, table in shards:
        if shard in pending:
            rows.append({"shard": shard, **{c: table.column(c).to_pylist() for c in table.column_names}})
    head, tail = rows[: (len(rows) + 1) // 2], rows[(len(rows) + 1) // 2 :][::-1]
    return [r for pair in zip_longest(head, tail) for r in pair if r is not None]


_SHARD_INPUT = pa.schema([PROMPTS.field(n) for n in ("prompt_id", "text", "source", "task")])


def _unpack(batch: dict[str, Any]) -> tuple[int, pa.Table]:
    shard = int(batch["shard"][0])
    cols = {c: list(batch[c][0]) for c in ("prompt_id", "text", "source", "task")}
    return shard, pa.table(cols, schema=_SHARD_INPUT)


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, looked up once per process (None where the C library has none)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None


def _release_freed_memory() -> None:
    """Hand the heap pages freed while processing a shard back to the OS (glibc ``malloc_trim``).

    glibc keeps freed pages for reuse; with prompts of changing lengths the actors' resident
    memory then follows the sum of past shard sizes rather than the largest one. A no-op where
    the C library has no ``malloc_trim``."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _set_threads(threads: float) -> None:
    """torch intra-op threads: ``threads`` (a CPU reservation may be fractional), at least 1."""
    import torch

    torch.set_num_threads(max(1, int(threads)))


class ShardLatents:
    """Ray actor: LM to the hook + SAE + summary for one shard per call."""

    def __init__(self, cfg: BuildLakeConfig, key: DatasetKey) -> None:
        from ops.lake.build import PromptEncoder

        _set_threads(cfg.torch_threads or cfg.cpus_per_worker)
        device = "cuda" if cfg.gpus_per_worker > 0 else "cpu"
        self.encoder = PromptEncoder(cfg.model, cfg.sae, key.hook, cfg.summary, cfg.context, cfg.batch_tokens, device)
        self.lake, self.key = Lake(cfg.lake), key

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        shard, table = _unpack(batch)
        paths = {t: self.lake.shard_path(t, self.key, shard) for t in ("prompts", "activations")}
        if not all(self.lake.exists(p) for p in paths.values()):
            prompts, acts = self.encoder.encode(table)
            self.lake.write_table(paths["activations"], acts, ACTIVATIONS)
            self.lake.write_table(paths["prompts"], prompts, PROMPTS)
            del prompts, acts
            _release_freed_memory()
        return batch


class ShardEmbeddings:
    """Ray actor: sentence embeddings for one shard per call."""

    def __init__(self, cfg: BuildLakeConfig, key: DatasetKey) -> None:
        _set_threads(cfg.cpus_per_worker)
        self.embedder, self.precision = cfg.embedder, cfg.embed_precision
        self.lake, self.key = Lake(cfg.lake), key

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from ops.lake.build import embed_shard

        shard, table = _unpack(batch)
        path = self.lake.shard_path("embeddings", self.key, shard)
        if not self.lake.exists(path):
            vectors = embed_shard(table, self.embedder, precision=self.precision)
            self.lake.write_table(path, vectors, EMBEDDINGS)
            _release_freed_memory()
        return {"shard": [shard], "prompts": [table.num_rows]}


def _check_progress(lake: Lake, key: DatasetKey, pool: PreparedPool, cfg: BuildLakeConfig) -> Precision:
    """Refuse to mix two pools or layouts in one dataset (the shard numbering would not agree);
    returns the embedding precision to use, that of the run that started the dataset."""
    path = lake.progress_path(key)
    layout = {"fingerprint": pool.fingerprint(), "shard_size": cfg.shard_size, "shard_order": "length"}
    precision = resolve_precision(cfg.embed_precision)
    if lake.exists(path) and not cfg.overwrite:
        found = lake.read_json(path)
        if {k: found.get(k) for k in layout} != layout:
            raise SaealignError(
                f"dataset {key.name} in {lake.uri} was started from another pool, shard size or shard layout; "
                "fix: pass --overwrite to rebuild it, or use another --lake"
            )
        precision = resolve_precision(found.get("embed_precision", "fp32"))
        if cfg.embed_precision not in ("auto", precision):
            log.warning(
                "dataset %s was started with %s embeddings and resumes with them, not --embed-precision %s",
                key.name,
                precision,
                cfg.embed_precision,
            )
    if cfg.overwrite:
        for table in ("prompts", "embeddings", "activations", "latent_stats"):
            lake.fs.delete_dir_contents(lake.partition_dir(table, key), missing_dir_ok=True)
    lake.write_json(path, {**layout, "embed_precision": precision})
    return precision


def _dataset_key(cfg: BuildLakeConfig) -> DatasetKey:
    """The dataset the job writes; refuses, before any work, an SAE or hook that generation and
    the service could not steer with (the lake exists to score latents for steering)."""
    sae = load_sae(cfg.sae)
    hook = cfg.hook or sae_hook_name(sae)
    if not hook:
        raise SaealignError("the SAE records no hook; fix: pass --hook")
    check_steerable(sae, hook)
    return DatasetKey(model=cfg.model, sae=sae_id(cfg.sae), hook=hook, summary=cfg.summary)


def resolve_layout(cfg: BuildLakeConfig, cluster: dict[str, float]) -> BuildLakeConfig:
    """``cfg`` with ``workers`` and ``cpus_per_worker`` filled in for a cluster's resources
    (``ray.cluster_resources()``: CPU, GPU, memory in bytes).

    On CPU the auto layout runs one single-threaded LM actor per CPU and shares the CPUs evenly
    among all actors, so that every actor is scheduled. Separate single-threaded processes use a
    small machine's cores better than one multi-threaded actor (torch gains little from a second
    thread on a model this small), and they give the embedding stage the time the LM actors spend
    outside torch."""
    cpus = float(cluster.get("CPU", 0))
    if cpus <= 0:
        raise SaealignError("the Ray cluster reports no CPUs; fix: start Ray with CPUs (ray start --num-cpus N)")
    workers, share = cfg.workers, cfg.cpus_per_worker
    if cfg.gpus_per_worker > 0:
        gpus = float(cluster.get("GPU", 0))
        if workers == 0:
            workers = int(gpus // cfg.gpus_per_worker)
        if workers == 0:
            raise SaealignError(
                f"the Ray cluster has {gpus:g} GPUs, fewer than --gpus-per-worker {cfg.gpus_per_worker:g}; "
                "fix: pass --workers N (an autoscaling cluster adds GPU nodes for them), or --gpus-per-worker 0 "
                "to run on CPU"
            )
        return replace(cfg, workers=workers, cpus_per_worker=share or 1.0)
    if workers == 0:
        workers = int(cpus)
        if cfg.worker_memory_gb:
            memory = float(cluster.get("memory", 0))
            workers = min(workers, int(memory // (cfg.worker_memory_gb * 2**30)))
            if workers == 0:
                raise SaealignError(
                    f"the Ray cluster offers {memory / 2**30:.1f} GB of memory, less than --worker-memory-gb "
                    f"{cfg.worker_memory_gb:g} for one LM actor; fix: lower --worker-memory-gb or add memory"
                )
    if share == 0:
        share = min(1.0, cpus / (workers + cfg.embed_workers))
    return replace(cfg, workers=workers, cpus_per_worker=share)


def _run_pipeline(
    cfg: BuildLakeConfig, key: DatasetKey, rows: list[dict[str, Any]], n_prompts: int
) -> dict[str, float]:
    """Runs the shards through both stages; returns seconds to the first finished shard (actor
    start-up and model loading) and in all."""
    import ray
    from ray.data import ActorPoolStrategy

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ds: ray.data.Dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
    ds = ds.map_batches(
        ShardLatents,
        fn_constructor_kwargs={"cfg": cfg, "key": key},
        batch_size=1,
        compute=ActorPoolStrategy(size=cfg.workers),
        num_cpus=cfg.cpus_per_worker,
        num_gpus=cfg.gpus_per_worker,
        memory=int(cfg.worker_memory_gb * 2**30),
        max_restarts=-1,
        max_task_retries=-1,
    ).map_batches(
        ShardEmbeddings,
        fn_constructor_kwargs={"cfg": cfg, "key": key},
        batch_size=1,
        compute=ActorPoolStrategy(size=cfg.embed_workers),
        num_cpus=cfg.cpus_per_worker,
        max_restarts=-1,
        max_task_retries=-1,
    )
    start, first = time.perf_counter(), None
    with tqdm(total=n_prompts, desc="lake shards", unit="prompt") as bar:
        for row in ds.iter_rows():
            first = first or time.perf_counter() - start
            bar.update(int(row["prompts"]))
    return {"first_shard_s": round(first or 0.0, 2), "pipeline_s": round(time.perf_counter() - start, 2)}


def build(cfg: BuildLakeConfig) -> dict[str, Any]:
    """Run the job; returns the manifest."""
    wall = time.perf_counter()
    pool = prepare_pool(read_many(list(cfg.pool), cfg.text_column))
    key = _dataset_key(cfg)
    lake = Lake(cfg.lake)
    cfg = replace(cfg, embed_precision=_check_progress(lake, key, pool, cfg))
    shards = pool.shards(cfg.shard_size)
    pending = {i for i, _ in shards if not lake.shard_done(key, i)}
    log.info("%d prompts in %d shards, %d to do", pool.table.num_rows, len(shards), len(pending))
    if not pending and lake.exists(lake.manifest_path(key)):
        log.info("dataset %s is complete; nothing to do", key.name)
        return lake.read_json(lake.manifest_path(key))
    timings = {"prepare_s": round(time.perf_counter() - wall, 2)}
    if pending:
        import ray

        ray.init(address=cfg.address or None, ignore_reinit_error=True, log_to_driver=False)
        cfg = resolve_layout(cfg, ray.cluster_resources())
        if not cfg.address:
            prepare_model_files(cfg.model)  # local actors share this machine's cache
        log.info(
            "%d LM/SAE actors and %d embedding actors, %.2f CPUs each",
            cfg.workers,
            cfg.embed_workers,
            cfg.cpus_per_worker,
        )
        rows = _shard_rows(shards, pending)
        timings.update(_run_pipeline(cfg, key, rows, sum(len(r["text"]) for r in rows)))
    missing = [i for i, _ in shards if not lake.shard_done(key, i)]
    if missing:
        raise SaealignError(f"{len(missing)} shards did not finish (first: {missing[0]}); re-run to resume")
    return _finalise(cfg, key, lake, pool, wall, timings)


def _finalise(
    cfg: BuildLakeConfig, key: DatasetKey, lake: Lake, pool: PreparedPool, wall: float, timings: dict[str, float]
) -> dict[str, Any]:
    """Writes ``latent_stats`` and the manifest; ``wall`` is the job's start (perf_counter)."""
    # streamed: memory stays bounded by d_sae and one record batch, whatever the pool size
    sae = load_sae(cfg.sae)
    acts = lake.dataset("activations", key)
    stats = latent_stats_table(acts.to_batches(columns=["latent", "value"]), int(sae.cfg.d_sae))
    lake.write_table(lake.stats_path(key), stats, LATENT_STATS)
    prompts = lake.dataset("prompts", key).to_table(columns=["n_tokens", "truncated"])
    manifest = base_manifest("lake-dataset", asdict(cfg))
    manifest.update(
        dataset=key.name,
        key=asdict(key),
        embedder=cfg.embedder,
        d_sae=int(sae.cfg.d_sae),
        pool=describe_pool(pool),
        rows={
            "prompts": prompts.num_rows,
            "embeddings": lake.dataset("embeddings", key).count_rows(),
            "activations": acts.count_rows(),
            "latent_stats": stats.num_rows,
        },
        tokens=int(pa.compute.sum(prompts.column("n_tokens")).as_py()),
        truncated_prompts=int(pa.compute.sum(prompts.column("truncated").cast(pa.int32())).as_py()),
        context=cfg.context,
        coverage={
            "support>=1": stats.num_rows / sae.cfg.d_sae,
            "support>=20": int(pa.compute.sum(pa.compute.greater_equal(stats.column("support"), 20)).as_py())
            / sae.cfg.d_sae,
        },
        wall_s=round(time.perf_counter() - wall, 2),
        timings=timings,
    )
    lake.write_json(lake.manifest_path(key), manifest)
    return manifest


def report_coverage(cfg: BuildLakeConfig, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Coverage (support >= 1 and >= 20) for the pool sizes 2^7..2^13 the pool fills, 5 samples each."""
    import json
    from pathlib import Path

    from ops.evals.report import curve_figure
    from ops.scoring.coverage import dataset_coverage

    lake, key = Lake(cfg.lake), DatasetKey(**manifest["key"])
    points = [asdict(p) for p in dataset_coverage(lake, key, manifest["d_sae"])]
    out = Path(cfg.coverage_out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "coverage.json").write_text(json.dumps(points, indent=1) + "\n")
    sizes = sorted({p["size"] for p in points})
    curves = {f"support >= {t}": [p["mean"] for p in points if p["threshold"] == t] for t in (1, 20)}
    bands = {
        f"support >= {t}": (
            [p["low"] for p in points if p["threshold"] == t],
            [p["high"] for p in points if p["threshold"] == t],
        )
        for t in (1, 20)
    }
    import base64

    png = curve_figure(
        sizes,
        curves,
        "pool size (prompts, sampled with replacement)",
        "share of latents",
        f"Coverage of {key.sae} ({manifest['d_sae']} latents)",
        logx=True,
        bands=bands,
    )
    (out / "coverage.png").write_bytes(base64.b64decode(png))
    print(f"{'pool size':>9}  {'support>=1 (min..max)':>24}  {'support>=20 (min..max)':>24}")
    for size in sizes:
        cells = [next(p for p in points if p["size"] == size and p["threshold"] == t) for t in (1, 20)]
        print(f"{size:>9}  " + "  ".join(f"{c['mean']:>8.3f} ({c['low']:.3f}..{c['high']:.3f})" for c in cells))
    print(f"coverage plot: {(out / 'coverage.png').resolve()}")
    return points


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(BuildLakeConfig, argv, "saealign build-lake")
    manifest = build(cfg)
    rows = manifest["rows"]
    print(f"lake dataset {manifest['dataset']} at {cfg.lake}")
    print(
        f"  prompts {rows['prompts']}, activation rows {rows['activations']}, tokens {manifest['tokens']}, "
        f"truncated {manifest['truncated_prompts']}, wall {manifest['wall_s']:.1f}s"
    )
    print(
        f"  coverage: support>=1 {manifest['coverage']['support>=1']:.3f}, "
        f"support>=20 {manifest['coverage']['support>=20']:.3f}"
    )
    if cfg.coverage:
        report_coverage(cfg, manifest)
    return 0
