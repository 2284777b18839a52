"""AlignSAE post-training (docs/algorithms.md §6): one dedicated latent slot per concept.

Design (the choices docs/algorithms.md §6 leaves open):

* **Appended slots.** The pre-trained sae-lens SAE is kept whole as the *free* path (its own
  ``encode``/``decode``: TopK, ReLU or JumpReLU exactly as sae-lens computes them) and one new
  slot per concept is appended, so latent ``d_sae + j`` is concept ``j``. Re-purposing an
  existing latent was not chosen: it takes capacity from reconstruction and, for TopK, the
  slot would have to win the top-k competition to fire at all.
* **Concept slots fire independently**: slot j's activation is ``relu(x̃ · e_j + c_j)`` on the
  SAE input ``x̃`` (after sae-lens's ``process_sae_in``), outside the TopK competition; its
  decoder row ``d_j`` is added to the free reconstruction.
* **Initialisation** (``slot_init``) of the encoder from the concept's mean-difference
  direction on pooled training texts (``e_j`` along ``μ_j − μ_rest``), or from the base SAE's
  best latent for the concept (its encoder column and bias, the vanilla baseline's choice),
  scaled so that the logit moves by 4 between the negative and the positive means (mean
  difference: −2 / +2 there); ``d_j = (μ_j − μ_family-others) / typical_j``, so that setting slot j to its typical
  activation adds one "concept mean difference" (swap α = 1 moves A's mean to B's).
* **Losses**: normalised reconstruction (Σ‖x − x̂‖² / Σ‖x − x̄‖²) on per-token activations of
  ontology and generic text, an L1 sparsity term on the free slots for ReLU/JumpReLU bases (TopK
  is sparse by construction), ``λ_align`` × binding BCE per concept slot on *pooled* text
  activations (slot pre-activation as the logit, positives re-weighted to balance the classes),
  ``λ_token`` × the same BCE on the per-token activations of labelled texts (each token takes its
  text's label; it calibrates the per-token activations that swaps edit: trained on pooled
  vectors alone, slots can fire on single tokens far above their typical value and on other
  concepts' tokens), and optionally
  ``λ_indep`` × the mean squared correlation between concept and free slots.
* **Curriculum**: stage 1 trains reconstruction only (free slots adapt to the new concept
  decoder rows, concept encoders frozen), stage 2 adds binding and decorrelation.
* **Encoder step size**: the encoder weights' Adam learning rate is a fraction of their RMS
  (``lr_encoder``), so it does not depend on the activation scale; with an absolute rate,
  small-scale activations mean large encoder weights move by a large share of their size per
  step, and the binding overfits the training texts' wording within a few steps.
* **On disk**: a TopK base with extra independent ReLU slots is not a plain sae-lens
  architecture, so the directory holds the post-trained free SAE in sae-lens format
  (``cfg.json`` + ``sae_weights.safetensors``, readable by ``SAE.load_from_disk``) plus
  ``concept_slots.safetensors`` (``W_enc`` [d_in, C], ``b_enc`` [C], ``W_dec`` [C, d_in],
  ``typical`` [C]; concept names and families in its metadata). :func:`load_aligned_sae`
  returns an :class:`AlignedSAE` whose ``encode``/``decode`` cover all ``d_sae + C`` slots.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ops.errors import SaealignError
from ops.models.lm import LanguageModel
from ops.steering.activations import iter_batches, run_to_hook
from ops.steering.engine import SAEView

log = logging.getLogger(__name__)

CONCEPT_SLOTS_FILE = "concept_slots.safetensors"
FORMAT = "saealign-alignsae-v1"
_FREE_PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


# ---------------------------------------------------------------------------------------------
# Cached hook activations of texts


@dataclass
class TextActivations:
    """Hook activations of texts: ``tokens`` [n_tokens, d] (float16, counted positions only),
    ``offsets`` [n_texts + 1] (text i owns ``tokens[offsets[i]:offsets[i+1]]``) and
    ``pooled`` [n_texts, d] (float32, one vector per text)."""

    tokens: torch.Tensor
    offsets: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return len(self.pooled)


def _pool(acts: torch.Tensor, keep: torch.Tensor, length: int, pooling: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(counted token activations, pooled vector) of one row; a text without counted positions
    falls back to its last real position."""
    counted = acts[keep]
    if len(counted) == 0:
        counted = acts[length - 1 : length]
    pooled = counted[-1] if pooling == "last" else counted.mean(0)
    return counted, pooled


@torch.no_grad()
def collect_text_activations(
    model: LanguageModel,
    texts: Sequence[str],
    hook_name: str,
    context: int = 128,
    pooling: str = "mean",
    batch_tokens: int = 4096,
    desc: str = "activations",
) -> TextActivations:
    """Run ``model`` to ``hook_name`` once over ``texts``; keep counted positions (no first
    position, no special tokens) per text and their pooled vector (``mean`` or ``last``)."""
    if pooling not in ("mean", "last"):
        raise SaealignError(f"unknown pooling '{pooling}'; fix: use 'mean' or 'last'")
    token_parts: list[torch.Tensor | None] = [None] * len(texts)
    pooled = torch.zeros(len(texts), model.d_model)
    with tqdm(total=len(texts), desc=desc, unit="text") as bar:
        for batch in iter_batches(model, texts, batch_tokens, context):
            acts = run_to_hook(model, batch, hook_name).float().cpu()
            lengths = batch.attention_mask.sum(1).tolist()
            for j, row in enumerate(batch.rows):
                counted, vec = _pool(acts[j], batch.keep[j], int(lengths[j]), pooling)
                token_parts[row] = counted.to(torch.float16)
                pooled[row] = vec
            bar.update(len(batch.rows))
    sizes = torch.tensor([0] + [len(p) for p in token_parts if p is not None])
    tokens = torch.cat([p for p in token_parts if p is not None])
    return TextActivations(tokens=tokens, offsets=sizes.cumsum(0), pooled=pooled)


# ---------------------------------------------------------------------------------------------
# The aligned SAE


def check_base_sae(sae: Any) -> None:
    """Raise unless the sae-lens SAE can serve as the free path of an AlignedSAE."""
    missing = [p for p in _FREE_PARAMS if not isinstance(getattr(sae, p, None), torch.Tensor)]
    if missing:
        raise SaealignError(
            f"the SAE ({type(sae).__name__}) has no {', '.join(missing)}; fix: use a standard, "
            "TopK or JumpReLU sae-lens SAE"
        )
    norm = getattr(sae.cfg, "normalize_activations", "none")
    reshape = getattr(sae.cfg, "reshape_activations", "none")
    if norm != "none" or reshape != "none":
        raise SaealignError(
            f"the SAE normalises or reshapes its input (normalize_activations={norm}, "
            f"reshape_activations={reshape}); fix: fold the normalisation into the weights first"
        )


class AlignedSAE(nn.Module):
    """A sae-lens SAE (the free slots, ``0..d_free-1``) plus one ReLU slot per concept
    (``d_free + j`` for ``concepts[j]``); see the module docstring."""

    typical: torch.Tensor

    def __init__(self, base: Any, concepts: Sequence[str], families: dict[str, str]) -> None:
        super().__init__()
        check_base_sae(base)
        self.base = base
        self.concepts = list(concepts)
        self.families = {c: families.get(c, c) for c in self.concepts}
        d_in, n = base.cfg.d_in, len(self.concepts)
        kwargs: dict[str, Any] = {"device": base.W_enc.device, "dtype": base.W_enc.dtype}
        self.W_enc_c = nn.Parameter(torch.zeros(d_in, n, **kwargs))
        self.b_enc_c = nn.Parameter(torch.zeros(n, **kwargs))
        self.W_dec_c = nn.Parameter(torch.zeros(n, d_in, **kwargs))
        self.register_buffer("typical", torch.ones(n, **kwargs))

    @property
    def d_free(self) -> int:
        return int(self.base.cfg.d_sae)

    @property
    def d_sae(self) -> int:
        return self.d_free + len(self.concepts)

    @property
    def concept_slots(self) -> dict[str, int]:
        """Concept -> latent index in the ``d_sae``-wide activation vector."""
        return {c: self.d_free + j for j, c in enumerate(self.concepts)}

    def typical_activation(self, concept: str) -> float:
        return float(self.typical[self.concepts.index(concept)])

    def concept_pre(self, x: torch.Tensor) -> torch.Tensor:
        """Concept-slot pre-activations (binding logits) [..., C]."""
        return self.base.process_sae_in(x) @ self.W_enc_c + self.b_enc_c

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Activations [..., d_free + C]: free slots as the base computes them, then concept slots."""
        return torch.cat([self.base.encode(x), F.relu(self.concept_pre(x))], dim=-1)

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        free, concept = acts[..., : self.d_free], acts[..., self.d_free :]
        return self.base.decode(free) + concept @ self.W_dec_c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def steering_view(self) -> AlignedView:
        """How the steering hook runs this SAE (``ops.steering.engine.latent_view``)."""
        return AlignedView(self, SAEView.of(self.base))

    def save(self, path: Path) -> None:
        """Write the free SAE in sae-lens format and the concept slots beside it."""
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        self.base.save_model(path)
        tensors = {
            "W_enc": self.W_enc_c.detach().float().cpu().contiguous(),
            "b_enc": self.b_enc_c.detach().float().cpu().contiguous(),
            "W_dec": self.W_dec_c.detach().float().cpu().contiguous(),
            "typical": self.typical.detach().float().cpu().contiguous(),
        }
        meta = {
            "format": FORMAT,
            "concepts": json.dumps(self.concepts),
            "families": json.dumps(self.families),
            "slot_activation": "relu",
            "d_free": str(self.d_free),
        }
        save_file(tensors, str(path / CONCEPT_SLOTS_FILE), metadata=meta)


@dataclass
class AlignedView:
    """An :class:`AlignedSAE` as pre-activation -> activation -> decode over all ``d_free + C``
    slots, computing what its ``encode``/``decode`` compute. Concept slots are edited with the
    steering method ``set``; Swap and Weight need a plain SAE."""

    aligned: AlignedSAE
    free: SAEView
    kind: str = "concept"

    @property
    def d_sae(self) -> int:
        return self.aligned.d_sae

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.free.pre(x), self.aligned.concept_pre(x)], dim=-1)

    def act(self, gamma: torch.Tensor) -> torch.Tensor:
        d = self.aligned.d_free
        return torch.cat([self.free.act(gamma[..., :d]), F.relu(gamma[..., d:])], dim=-1)

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        d = self.aligned.d_free
        return self.free.decode(acts[..., :d]) + acts[..., d:] @ self.aligned.W_dec_c


def load_aligned_sae(path: str | Path, device: str = "cpu") -> AlignedSAE:
    """Load a directory written by ``saealign align-sae`` (see the module docstring)."""
    from sae_lens import SAE
    from safetensors import safe_open

    path = Path(path).expanduser()
    slots = path / CONCEPT_SLOTS_FILE
    if not slots.is_file() or not (path / "cfg.json").is_file():
        raise SaealignError(
            f"'{path}' is not an AlignSAE directory ({CONCEPT_SLOTS_FILE} or cfg.json missing); "
            "fix: pass a directory written by `saealign align-sae`"
        )
    base = SAE.load_from_disk(path, device=device, dtype="float32")
    with safe_open(str(slots), framework="pt", device="cpu") as fh:
        meta = fh.metadata() or {}
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open is not a dict)
    aligned = AlignedSAE(base, json.loads(meta["concepts"]), json.loads(meta.get("families", "{}")))
    with torch.no_grad():
        aligned.W_enc_c.copy_(tensors["W_enc"])
        aligned.b_enc_c.copy_(tensors["b_enc"])
        aligned.W_dec_c.copy_(tensors["W_dec"])
        aligned.typical.copy_(tensors["typical"])
    for p in aligned.parameters():
        p.requires_grad_(False)
    return aligned.to(device).eval()


# ---------------------------------------------------------------------------------------------
# Initialisation, typical activations, vanilla latents


def _family_others(labels: np.ndarray, families: Sequence[str], j: int) -> np.ndarray:
    """Rows of the other concepts of concept j's family (all other rows if it has none)."""
    mates = [k for k, f in enumerate(families) if f == families[j] and k != j]
    return np.asarray(labels[:, mates].any(1) if mates else ~labels[:, j], dtype=bool)


@torch.no_grad()
def init_concept_slots(
    aligned: AlignedSAE, pooled: torch.Tensor, labels: np.ndarray, latents: Sequence[int] | None = None
) -> None:
    """Initialise the concept slots (module docstring): each encoder from the concept's
    mean-difference direction, or from the base SAE's latent ``latents[j]`` when given; each
    decoder row from the concept's mean difference over its typical activation."""
    z = aligned.base.process_sae_in(pooled.to(aligned.W_enc_c.device)).float()
    families = [aligned.families[c] for c in aligned.concepts]
    for j in range(len(aligned.concepts)):
        pos = torch.as_tensor(labels[:, j], device=z.device)
        if latents is None:  # unit mean-difference direction, zero logit half-way between the means
            direction = z[pos].mean(0) - z[~pos].mean(0)
            weight = direction / direction.norm().clamp_min(1e-8)
            bias = -((z[pos] @ weight).mean() + (z[~pos] @ weight).mean()) / 2
        else:
            weight, bias = aligned.base.W_enc[:, latents[j]].float(), aligned.base.b_enc[latents[j]].float()
        pre = z @ weight + bias
        scale = 4.0 / (pre[pos].mean() - pre[~pos].mean()).clamp_min(1e-6)
        aligned.W_enc_c[:, j] = weight * scale
        aligned.b_enc_c[j] = bias * scale
        others = torch.as_tensor(_family_others(labels, families, j), device=z.device)
        typical = F.relu(z[pos] @ aligned.W_enc_c[:, j] + aligned.b_enc_c[j]).mean().clamp_min(1e-3)
        aligned.W_dec_c[j] = (z[pos].mean(0) - z[others].mean(0)) / typical
        aligned.typical[j] = typical


@torch.no_grad()
def encode_in_chunks(encode: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int = 2048) -> np.ndarray:
    """``encode`` applied to rows of ``x`` in chunks; float32 numpy [n, n_latents]."""
    return torch.cat([encode(x[i : i + chunk].float()).float().cpu() for i in range(0, len(x), chunk)]).numpy()


@torch.no_grad()
def token_mean_activations(
    encode: Callable[[torch.Tensor], torch.Tensor], acts: TextActivations, chunk: int = 2048
) -> np.ndarray:
    """Per text, the mean over its counted tokens of each latent's activation (the lake's
    ``avg`` summary before normalisation); float32 [n_texts, n_latents]."""
    owner = torch.repeat_interleave(torch.arange(len(acts)), acts.offsets.diff())
    sums: torch.Tensor | None = None
    for i in range(0, len(acts.tokens), chunk):
        a = encode(acts.tokens[i : i + chunk].float()).float().cpu()
        sums = torch.zeros(len(acts), a.shape[1]) if sums is None else sums
        sums.index_add_(0, owner[i : i + chunk], a)
    assert sums is not None
    return (sums / acts.offsets.diff().clamp_min(1)[:, None]).numpy()


def typical_activations(acts: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean activation of column j of ``acts`` [n, C] over the texts of concept j."""
    return np.array([acts[labels[:, j], j].mean() for j in range(labels.shape[1])], dtype=np.float32)


@torch.no_grad()
def set_typical(aligned: AlignedSAE, pooled: torch.Tensor, labels: np.ndarray) -> None:
    """Store each concept slot's mean activation on its own (training) texts."""
    acts = encode_in_chunks(lambda x: F.relu(aligned.concept_pre(x)), pooled.to(aligned.W_enc_c.device))
    aligned.typical.copy_(torch.as_tensor(typical_activations(acts, labels)).clamp_min(1e-3))


# ---------------------------------------------------------------------------------------------
# Training


@dataclass(frozen=True)
class AlignTrainConfig:
    """Hyper-parameters of the post-training (see the module docstring for the losses)."""

    stage1_steps: int = 100
    """Stage 1 steps: reconstruction only."""
    stage2_steps: int = 400
    """Stage 2 steps: reconstruction + binding (+ decorrelation)."""
    batch_tokens: int = 1024
    """Token activations per step (reconstruction)."""
    batch_texts: int = 256
    """Pooled texts per step (binding)."""
    slot_init: Literal["mean_diff", "vanilla_latent"] = "mean_diff"
    """Concept encoders start from the mean-difference direction, or from the base SAE's best latent per concept."""
    lr: float = 1e-3
    """Adam learning rate of the concept slots' biases and decoder rows."""
    lr_encoder: float = 2e-3
    """Adam learning rate of the concept encoder weights, as a fraction of their RMS at the start of stage 2."""
    lr_free: float = 5e-5
    """Adam learning rate of the pre-trained (free) SAE parameters."""
    lambda_align: float = 1.0
    """Weight of the binding loss (BCE per concept slot)."""
    lambda_token: float = 0.5
    """Weight of the per-token binding loss (each token of a labelled text takes the text's label)."""
    lambda_indep: float = 0.0
    """Weight of the decorrelation loss between concept and free slots (0 = off)."""
    sparsity: float = 0.01
    """L1 weight on free slots for ReLU/JumpReLU bases (TopK needs none)."""
    train_concept_decoder: bool = True
    """Let reconstruction train the concept slots' decoder rows (else they keep their mean-difference init)."""

    def __post_init__(self) -> None:
        if self.stage1_steps < 0 or self.stage2_steps <= 0:
            raise SaealignError("--stage2-steps must be positive and --stage1-steps not negative")
        if self.lr <= 0 or self.lr_free < 0 or self.lr_encoder < 0:
            raise SaealignError("--lr must be positive and --lr-free, --lr-encoder not negative")
        if self.batch_tokens <= 0 or self.batch_texts <= 0:
            raise SaealignError("--batch-tokens and --batch-texts must be positive")


def _is_topk(sae: Any) -> bool:
    return "topk" in type(sae).__name__.lower()


def _recon_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-8)


def _decorrelation(concept: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
    """Mean squared Pearson correlation between concept slots and free slots over a batch."""
    c = (concept - concept.mean(0)) / (concept.std(0) + 1e-6)
    f = (free - free.mean(0)) / (free.std(0) + 1e-6)
    return ((c.T @ f) / len(c)).pow(2).mean()


def _bce(aligned: AlignedSAE, x: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor) -> torch.Tensor:
    """Binding BCE: concept-slot pre-activations of ``x`` as logits for the one-hot ``targets``."""
    return F.binary_cross_entropy_with_logits(aligned.concept_pre(x), targets, pos_weight=pos_weight)


@dataclass
class _Batch:
    tokens: torch.Tensor
    """[batch_tokens, d] token activations (reconstruction)."""
    token_targets: torch.Tensor | None = None
    """[n_labelled, C] one-hot concept of the labelled tokens (per-token binding)."""
    token_labelled: torch.Tensor | None = None
    """[batch_tokens] bool: tokens that come from a labelled text."""
    pooled: torch.Tensor | None = None
    """[batch_texts, d] pooled text activations (binding)."""
    targets: torch.Tensor | None = None
    """[batch_texts, C] one-hot concept of each pooled text."""


def _step_loss(aligned: AlignedSAE, batch: _Batch, pos_weight: torch.Tensor, cfg: AlignTrainConfig) -> dict[str, Any]:
    x = batch.tokens
    acts = aligned.encode(x)
    parts = {"recon": _recon_loss(x, aligned.decode(acts))}
    free = acts[:, : aligned.d_free]
    if cfg.sparsity > 0 and not _is_topk(aligned.base):
        weighted = free * aligned.base.W_dec.norm(dim=-1)
        parts["sparsity"] = cfg.sparsity * weighted.sum(-1).mean() / x.norm(dim=-1).mean()
    if batch.pooled is not None and batch.targets is not None:
        parts["binding"] = cfg.lambda_align * _bce(aligned, batch.pooled, batch.targets, pos_weight)
        labelled, targets = batch.token_labelled, batch.token_targets
        if cfg.lambda_token > 0 and labelled is not None and targets is not None and labelled.any():
            parts["token_binding"] = cfg.lambda_token * _bce(aligned, x[labelled], targets, pos_weight)
        if cfg.lambda_indep > 0:
            parts["indep"] = cfg.lambda_indep * _decorrelation(acts[:, aligned.d_free :], free)
    return parts


def _optimizer(aligned: AlignedSAE, cfg: AlignTrainConfig, stage: int) -> torch.optim.Optimizer:
    """Adam over the free SAE (``lr_free``), the concept encoders (stage 2 only; weights at
    ``lr_encoder`` × their RMS, so the step is relative to the activation scale, biases at
    ``lr``) and the concept decoder rows (``lr``, unless frozen)."""
    for name, p in aligned.base.named_parameters():
        p.requires_grad_(name in _FREE_PARAMS)
    aligned.W_enc_c.requires_grad_(stage == 2)
    aligned.b_enc_c.requires_grad_(stage == 2)
    aligned.W_dec_c.requires_grad_(cfg.train_concept_decoder)
    free = [p for n, p in aligned.base.named_parameters() if n in _FREE_PARAMS]
    groups = [{"params": free, "lr": cfg.lr_free}]
    if stage == 2:
        rms = float(aligned.W_enc_c.detach().pow(2).mean().sqrt())
        groups.append({"params": [aligned.W_enc_c], "lr": cfg.lr_encoder * rms})
    concept = [p for p in (aligned.b_enc_c, aligned.W_dec_c) if p.requires_grad]
    if concept:
        groups.append({"params": concept, "lr": cfg.lr})
    return torch.optim.Adam(groups)


def _sample(
    tokens: torch.Tensor,
    token_labels: torch.Tensor,
    pooled: torch.Tensor,
    y: torch.Tensor,
    cfg: AlignTrainConfig,
    stage: int,
    gen: torch.Generator,
    device: torch.device,
) -> _Batch:
    rows = torch.randint(len(tokens), (cfg.batch_tokens,), generator=gen)
    batch = _Batch(tokens=tokens[rows].float().to(device))
    if stage == 2:
        lab = token_labels[rows]
        batch.token_labelled = (lab >= 0).to(device)
        batch.token_targets = F.one_hot(lab[lab >= 0], y.shape[1]).float().to(device)
        texts = torch.randint(len(pooled), (cfg.batch_texts,), generator=gen)
        batch.pooled, batch.targets = pooled[texts].float().to(device), y[texts].to(device)
    return batch


def train_aligned(
    aligned: AlignedSAE,
    tokens: torch.Tensor,
    token_labels: np.ndarray,
    pooled: torch.Tensor,
    labels: np.ndarray,
    cfg: AlignTrainConfig,
    seed: int = 0,
) -> list[dict[str, float]]:
    """Post-train ``aligned`` in place: stage 1 (reconstruction) then stage 2 (+ binding).

    ``tokens`` [n_tokens, d]: per-token activations for reconstruction, ``token_labels``
    [n_tokens]: concept index of each token's text (-1 for unlabelled generic text);
    ``pooled`` [n_texts, d] and bool ``labels`` [n_texts, C]: the text-level binding data.
    ``seed`` draws the training batches. Returns one loss record per step."""
    device = aligned.W_enc_c.device
    gen = torch.Generator().manual_seed(seed)
    y = torch.as_tensor(labels, dtype=torch.float32)
    tok_labels = torch.as_tensor(np.asarray(token_labels), dtype=torch.long)
    pos_weight = ((len(y) - y.sum(0)) / y.sum(0).clamp_min(1)).to(device)
    history: list[dict[str, float]] = []
    aligned.train()
    for stage, steps in ((1, cfg.stage1_steps), (2, cfg.stage2_steps)):
        opt = _optimizer(aligned, cfg, stage)
        for _ in tqdm(range(steps), desc=f"AlignSAE stage {stage}", unit="step"):
            batch = _sample(tokens, tok_labels, pooled, y, cfg, stage, gen, device)
            parts = _step_loss(aligned, batch, pos_weight, cfg)
            loss = torch.stack(list(parts.values())).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append(
                {"stage": stage, "loss": float(loss.detach()), **{k: float(v.detach()) for k, v in parts.items()}}
            )
    aligned.eval()
    for p in aligned.parameters():
        p.requires_grad_(False)
    return history
