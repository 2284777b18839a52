"""Train an SAE on a language model's hook activations with sae-lens.

Activations are streamed: the LM runs over the texts once and writes float16 shards to disk
(``ActivationShards``), then sae-lens's ``SAETrainer`` reads shuffled batches from those shards
for as many epochs as asked. Nothing holds the whole corpus's activations in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from ops.errors import SaealignError
from ops.models.lm import LanguageModel
from ops.steering.activations import iter_batches, run_to_hook

log = logging.getLogger(__name__)

Architecture = Literal["topk", "relu", "jumprelu"]


@dataclass(frozen=True)
class ActivationShards:
    """Float16 activation shards ``shard_XXXXX.npy`` in one directory, [n_tokens, d_in] each."""

    directory: Path
    reused: bool = False
    """True when the shards come from an earlier, completed collection."""

    @property
    def paths(self) -> list[Path]:
        return sorted(self.directory.glob("shard_*.npy"))

    def n_tokens(self) -> int:
        return sum(np.load(p, mmap_mode="r").shape[0] for p in self.paths)

    def batches(self, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
        """Endless shuffled float32 batches: shards in random order, two shards mixed at a time."""
        rng = np.random.default_rng(seed)
        leftover = np.empty((0, 0), dtype=np.float16)
        while True:
            order = rng.permutation(len(self.paths))
            for start in range(0, len(order), 2):
                parts = [np.load(self.paths[i]) for i in order[start : start + 2]]
                if leftover.size:
                    parts.append(leftover)
                pool = np.concatenate(parts)
                pool = pool[rng.permutation(len(pool))]
                n_full = len(pool) // batch_size * batch_size
                for i in range(0, n_full, batch_size):
                    yield torch.from_numpy(pool[i : i + batch_size].astype(np.float32))
                leftover = pool[n_full:]


def activations_fingerprint(model_name: str, hook_name: str, context: int, texts: Sequence[str]) -> str:
    """Identifies one collection: same model, hook, context and texts in the same order."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([model_name, hook_name, context]).encode())
    for text in texts:
        h.update(text.encode("utf-8") + b"\0")
    return h.hexdigest()


def reusable_shards(out_dir: Path, fingerprint: str) -> ActivationShards | None:
    """The shards of an earlier, completed collection with the same fingerprint, if any."""
    marker = out_dir / "complete.json"
    if marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == fingerprint:
        return ActivationShards(out_dir, reused=True)
    return None


def collect_activations(
    model: LanguageModel,
    texts: Sequence[str],
    hook_name: str,
    out_dir: Path,
    context: int,
    batch_tokens: int = 4096,
    shard_tokens: int = 65536,
) -> ActivationShards:
    """Run ``model`` up to ``hook_name`` over ``texts`` and write counted positions (no first
    position, no special tokens, no padding) to float16 shards under ``out_dir``.

    A ``complete.json`` marker with the collection's fingerprint is written last; a later call
    with the same model, hook, context and texts reuses the shards instead of recollecting."""
    fingerprint = activations_fingerprint(model.name, hook_name, context, texts)
    done = reusable_shards(out_dir, fingerprint)
    if done is not None:
        log.info("reusing the activation shards in %s (same model, hook, context and texts)", out_dir)
        return done
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in [*out_dir.glob("shard_*.npy"), out_dir / "complete.json"]:
        old.unlink(missing_ok=True)
    buffer: list[np.ndarray] = []
    buffered = 0
    shard = 0

    def flush() -> None:
        nonlocal buffer, buffered, shard
        if buffered:
            np.save(out_dir / f"shard_{shard:05d}.npy", np.concatenate(buffer))
            shard += 1
        buffer, buffered = [], 0

    with tqdm(total=len(texts), desc=f"activations @ {hook_name}", unit="text") as bar:
        for batch in iter_batches(model, texts, batch_tokens, context):
            acts = run_to_hook(model, batch, hook_name)
            kept = acts[batch.keep.to(acts.device)].to(torch.float16).cpu().numpy()
            buffer.append(kept)
            buffered += len(kept)
            if buffered >= shard_tokens:
                flush()
            bar.update(len(batch.rows))
    flush()
    shards = ActivationShards(out_dir)
    if not shards.paths:
        raise SaealignError("the texts produced no activations (all empty?); fix: pass non-empty texts")
    (out_dir / "complete.json").write_text(json.dumps({"fingerprint": fingerprint, "shards": shard}))
    return shards


def make_training_sae(
    architecture: Architecture,
    d_in: int,
    d_sae: int,
    k: int,
    l1_coefficient: float,
    metadata: dict[str, Any],
    device: str,
) -> Any:
    """A fresh sae-lens training SAE of the given architecture."""
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    if d_sae <= 0:
        raise SaealignError(f"d_sae must be positive, got {d_sae}; fix: pass e.g. --d-sae 4608")
    common: dict[str, Any] = dict(
        d_in=d_in,
        d_sae=d_sae,
        device=device,
        metadata=SAEMetadata(**metadata),
        # inputs scaled to mean norm sqrt(d_in) while training; the factor is folded into the
        # weights at the end, so the saved SAE takes raw activations
        normalize_activations="expected_average_only_in",
    )
    if architecture == "topk":
        if not 0 < k <= d_sae:
            raise SaealignError(f"k must be in 1..d_sae ({d_sae}), got {k}")
        return TopKTrainingSAE(TopKTrainingSAEConfig(k=k, **common))
    if architecture == "relu":
        return StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=l1_coefficient, **common))
    if architecture == "jumprelu":
        return JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(l0_coefficient=l1_coefficient, **common))
    raise SaealignError(f"unknown architecture '{architecture}'; use topk, relu or jumprelu")


def train_sae(
    sae: Any,
    batches: Iterator[torch.Tensor],
    total_tokens: int,
    batch_size: int,
    lr: float,
    device: str,
) -> list[float]:
    """Fit ``sae`` with sae-lens's ``SAETrainer``; returns the reconstruction (MSE) loss of every step
    (the total loss also holds auxiliary terms, e.g. TopK's AuxK on dead latents, that grow as
    latents die).

    Learning rate: 5 % linear warm-up, then cosine decay to 10 % (sae-lens schedulers).

    Before the first step the input scale and the decoder bias are set from the data: the scale
    brings activations to mean norm sqrt(d_in) (sae-lens's ``expected_average_only_in``), and
    ``b_dec`` starts at the scaled mean activation. Residual streams carry a large shared
    direction (SmolLM2's layer 6 mean has ~70 % of the mean norm); with ``b_dec`` at zero the
    latents aligned with it fire on every token and most of the others never fire."""
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    steps = max(1, total_tokens // batch_size)
    cfg = SAETrainerConfig(
        total_training_samples=steps * batch_size,
        train_batch_size_samples=batch_size,
        lr=lr,
        lr_end=lr / 10,
        lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=max(1, math.ceil(0.05 * steps)),
        lr_decay_steps=0,
        device=device,
        dead_feature_window=max(50, steps // 10),
        feature_sampling_window=max(100, steps // 5),
        n_batches_for_norm_estimate=min(20, steps),
    )
    losses: list[float] = []

    class _Trainer(SAETrainer):  # type: ignore[misc]
        def step(self, batch: torch.Tensor) -> Any:
            out = super().step(batch)
            losses.append(float(out.losses.get("mse_loss", out.loss).detach()))
            return out

    trainer = _Trainer(cfg, sae, batches)
    if sae.cfg.normalize_activations == "expected_average_only_in":
        scale, mean = _scale_and_mean(batches, sae.cfg.d_in, cfg.n_batches_for_norm_estimate)
        trainer.activation_scaler.scaling_factor = scale
        with torch.no_grad():
            sae.b_dec.copy_((mean * scale).to(sae.b_dec))
    trainer.fit()
    return losses


@torch.no_grad()
def _scale_and_mean(batches: Iterator[torch.Tensor], d_in: int, n_batches: int) -> tuple[float, torch.Tensor]:
    """sae-lens's input scale (sqrt(d_in) / mean norm) and the mean activation, from ``n_batches``."""
    norm_sum, total, count = 0.0, torch.zeros(d_in, dtype=torch.float64), 0
    for _, batch in zip(range(n_batches), batches, strict=False):
        batch = batch.double()
        norm_sum += float(batch.norm(dim=-1).sum())
        total += batch.sum(dim=0).cpu()
        count += len(batch)
    if count == 0:
        raise SaealignError("no activations to train on; fix: pass non-empty texts")
    return d_in**0.5 / (norm_sum / count), (total / count).float()
