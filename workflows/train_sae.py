"""``saealign train-sae``: train an SAE on a model's hook activations (AlignSAE stage 1).

Steps: read the text sources, run the model once up to the hook and stream float16 activation
shards to disk, fit a sae-lens SAE on shuffled batches from the shards (a token budget, or
``epochs`` passes),
save it in sae-lens format, then measure it on held-out text (``eval.json``) and write
``manifest.json`` with everything needed to retrain it.

The shipped default SAE was made with (run from the repository root, ``../shared`` beside it)::

    saealign train-sae --out ops/data/sae/default --save-dtype float16 --epochs 4 \\
      --sources ../shared/data/reference_pool.jsonl#:-2500 ../shared/data/medical.jsonl \\
                ../shared/data/unaligned_prompts.jsonl ../shared/data/concepts.jsonl embedded:pool \\
      --eval-sources ../shared/data/reference_pool.jsonl#-2500:
"""

from __future__ import annotations

import logging
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from ops.errors import SaealignError
from ops.manifest import base_manifest, write_json_atomic
from ops.models.lm import EMBEDDED_MODEL, load_model, resolve_device
from ops.saes.quality import evaluate_sae
from ops.saes.training import collect_activations, make_training_sae, train_sae
from ops.steering.activations import check_hook
from ops.texts import read_many
from workflows._config import parse_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSAEConfig:
    """Train an SAE on a language model's hook activations with sae-lens."""

    out: str = "out/sae"
    """Output directory: sae-lens files (cfg.json, sae_weights.safetensors), manifest.json, eval.json."""
    model: str = EMBEDDED_MODEL
    """Language model (registry name or TransformerLens name)."""
    hook: str = "blocks.6.hook_resid_post"
    """TransformerLens hook point the SAE reads and writes."""
    architecture: Literal["topk", "relu", "jumprelu"] = "topk"
    """SAE activation: TopK (k latents per token), ReLU + L1, or JumpReLU (L0 penalty)."""
    k: int = 32
    """Active latents per token for TopK."""
    d_sae: int = 4608
    """Number of latents (8 x d_model of the embedded model)."""
    l1_coefficient: float = 5.0
    """Sparsity coefficient for relu (L1) and jumprelu (L0)."""
    sources: tuple[str, ...] = ("embedded:ontology", "embedded:unaligned", "embedded:pool")
    """Training text sources: files with a text column (.jsonl/.csv/.parquet, '#start:stop' selects
    rows), embedded:<name>, or hf:<dataset>. The default is all the project's own training text
    (~92K tokens); the demo prompts and topic texts stay out of it."""
    eval_sources: tuple[str, ...] = ()
    """Held-out text for the eval report; empty = hold out the last eval_holdout training texts."""
    eval_holdout: int = 150
    """Texts held out from the sources when no eval_sources are given."""
    text_column: str = "text"
    """Name of the text column in file sources."""
    tokens: int = 2_000_000
    """Training budget in activations (the collected ones repeated as needed). Ignored when
    --epochs is given."""
    epochs: float = 0.0
    """Passes over the collected activations instead of a token budget (0 = use --tokens)."""
    context: int = 256
    """Tokens per text (longer texts are truncated)."""
    batch_size: int = 4096
    """Activations per optimiser step."""
    lr: float = 5e-4
    """Adam learning rate (5 % warm-up, cosine decay to lr/10)."""
    seed: int = 0
    """Seed for text order, batch shuffling and initialisation."""
    device: str = "auto"
    """'auto' (cuda when available), 'cpu' or 'cuda'."""
    ce_texts: int = 500
    """Held-out texts used for the CE-loss-recovered measurement."""
    save_dtype: Literal["float32", "float16"] = "float32"
    """Dtype of the saved weights (the shipped default uses float16)."""
    keep_activations: bool = False
    """Keep the activation shards in <out>/activations after training."""

    def __post_init__(self) -> None:
        if self.d_sae <= 0:
            raise SaealignError(f"--d-sae must be positive, got {self.d_sae}")
        if self.epochs < 0 or self.tokens <= 0 or self.batch_size <= 0 or self.context < 2:
            raise SaealignError(
                "--tokens and --batch-size must be positive, --epochs at least 0 and --context at least 2"
            )


def _split_texts(cfg: TrainSAEConfig) -> tuple[list[str], list[str], list[dict[str, object]]]:
    tables = read_many(list(cfg.sources), cfg.text_column)
    sources: list[dict[str, object]] = [{"source": t.source, "rows": len(t), "use": "train"} for t in tables]
    texts = [s for t in tables for s in t.texts if s.strip()]
    if cfg.eval_sources:
        eval_tables = read_many(list(cfg.eval_sources), cfg.text_column)
        sources += [{"source": t.source, "rows": len(t), "use": "eval"} for t in eval_tables]
        held = [s for t in eval_tables for s in t.texts if s.strip()]
    else:
        if len(texts) <= cfg.eval_holdout:
            raise SaealignError(f"{len(texts)} texts cannot spare {cfg.eval_holdout} for evaluation")
        texts, held = texts[: -cfg.eval_holdout], texts[-cfg.eval_holdout :]
    if not texts:
        raise SaealignError("the training sources hold no non-empty text; fix: pass sources with texts")
    random.Random(cfg.seed).shuffle(texts)
    return texts, held, sources


def build(cfg: TrainSAEConfig) -> dict[str, object]:
    """Run the job; returns the eval report."""
    from sae_lens import SAE

    wall = time.perf_counter()
    manifest = base_manifest("sae", asdict(cfg))  # revision and time of the start, not the end
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    texts, held, sources = _split_texts(cfg)
    model = load_model(cfg.model, device=device)
    check_hook(model, cfg.hook)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    shards = collect_activations(model, texts, cfg.hook, out / "activations", cfg.context)
    n_collected = shards.n_tokens()
    timings["collect_activations_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    metadata = {
        "model_name": cfg.model,
        "hook_name": cfg.hook,
        "context_size": cfg.context,
        "prepend_bos": model.prepend_bos,
        "exclude_first_position": True,
    }
    sae = make_training_sae(cfg.architecture, model.d_model, cfg.d_sae, cfg.k, cfg.l1_coefficient, metadata, device)
    total = int(cfg.epochs * n_collected) if cfg.epochs > 0 else cfg.tokens
    losses = train_sae(sae, shards.batches(cfg.batch_size, cfg.seed), total, cfg.batch_size, cfg.lr, device)
    timings["train_s"] = time.perf_counter() - t0

    staging = out / "sae.partial"
    shutil.rmtree(staging, ignore_errors=True)
    sae.to(dtype=getattr(torch, cfg.save_dtype)).save_inference_model(staging)
    for name in ("cfg.json", "sae_weights.safetensors"):
        (staging / name).replace(out / name)
    staging.rmdir()
    if not cfg.keep_activations:
        shutil.rmtree(out / "activations", ignore_errors=True)

    t0 = time.perf_counter()
    saved = SAE.load_from_disk(out, device=device, dtype="float32")
    report = evaluate_sae(model, saved, cfg.hook, held, cfg.context, ce_texts=cfg.ce_texts).to_dict()
    timings["eval_s"] = time.perf_counter() - t0
    timings["wall_s"] = time.perf_counter() - wall

    write_json_atomic(out / "eval.json", report)
    manifest.update(
        device=device,
        text_sources=sources,
        train_texts=len(texts),
        eval_texts=len(held),
        tokens_collected=n_collected,
        activations_reused=shards.reused,
        tokens_trained=len(losses) * cfg.batch_size,
        steps=len(losses),
        mse_first=losses[0],
        mse_last=losses[-1],
        timings=timings,
        eval=report,
    )
    write_json_atomic(out / "manifest.json", manifest)
    log.info("SAE written to %s: %s", out, {k: round(v, 4) for k, v in report.items()})
    return {"out": str(out), "losses": losses, **report}


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(TrainSAEConfig, argv, "saealign train-sae")
    result = build(cfg)
    for key in ("explained_variance", "ce_loss_score", "mean_l0", "dead_fraction"):
        print(f"{key:>20}: {result[key]:.4f}")
    print(f"SAE written to {result['out']}")
    return 0
