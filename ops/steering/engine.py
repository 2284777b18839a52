"""Request-scoped steering at one hook: ``orig``, ``sae``, ``clamp``, ``swap``, ``weight`` (docs/algorithms.md §3).

A :class:`SteeringSpec` says what one request wants (method, topic scores, options). For one
forward or one generate call it becomes a hook, installed by the :func:`steering_hook` context
manager on the Hugging Face model (a native PyTorch forward hook on decoder layer ``L``, whose
output is TransformerLens ``blocks.L.hook_resid_post``), or by :func:`tl_steering_hook` for
``HookedTransformer.run_with_hooks``. Both call the same :class:`BatchSteerer`, so the two paths
compute the same thing.

Definitions, for one token (x = hook activation, γ = SAE pre-activation, a = σ(γ), s = topic
scores with NaN (unscored) read as 0):

* ``orig``: x.  ``sae``: decode(a).
* ``clamp``: the ``clamp_k`` highest-scored latents set to ``clamp_factor`` × a_i
  (``multiply``) or a_i + ``clamp_factor`` (``add``).
* ``swap``: m = the latents σ selects on γ ⊙ s; a' = m ⊙ relu(γ). TopK: the top k of γ ⊙ s
  (positive ones). ReLU/JumpReLU: the top k_t candidates, k_t = number of active latents of a at
  that token, candidates being the latents with γ_i s_i > 0 ranked by γ_i s_i − θ_i (θ = the
  JumpReLU threshold, 0 for ReLU), so that all scores = 1 gives back exactly a. Gated: γ is the
  magnitude pre-activation and θ = b_mag − exp(r_mag)·b_gate, where its gate opens (a JumpReLU).
* ``weight``: a' = σ(γ ⊙ s).
* ``strength`` (swap, weight): the scores used are 1 − strength·(1 − s): 0 gives ``sae``,
  1 (default) the scores as given. Contamination always uses the scores as given.
* ``keep_error``: add back the SAE error x − decode(a).
* ``vector``: a steering vector v [d_model] added at every steered position after the method's
  edit (x_out + v). With ``orig`` this is plain activation addition, e.g. DiffMean (scale × (mean
  P_align activation − mean reference activation)); it composes with any SAE method.

Per token, where the SAE is run: contamination c_t = Σ_i a'_i (1 − s_i) / Σ_i a'_i (0 when
Σ a' = 0), a' being the activation decoded (for ``orig`` and ``sae``, a itself; measured only when
the spec has scores), and *latents changed* = the number of latent indices whose value differs
between a' and a. So Clamp changes exactly ``clamp_k`` latents in ``add`` mode, and in
``multiply`` mode only those of the clamped latents that were active (at most ``clamp_k``).

Positions: the first real position of each row and special tokens (BOS, EOS, pad) are left
untouched (pass-through x, statistics NaN) unless ``include_first=True``; padding is never steered.
A spec's ``positions`` is ``all`` (every other position, prompt and generated tokens alike) or
``last_prompt``: only the last real position of a forward that starts at position 0 (the
prefill's last prompt token, :func:`last_prompt_positions`), decode steps left alone, as
AlignSAE's concept swaps edit (docs/algorithms.md §6).

Isolation: nothing about a request is global. The context manager registers (reference-counted)
one dispatching hook per module; it acts only for the sessions set in a ``ContextVar`` by the
caller's own ``with`` blocks, so concurrent calls in other threads or asyncio tasks, with other
specs, never see them. Nested sessions compose: at each layer, every session of the context
applies in the order entered (several SAEs, hooks or vectors in one call).

This is the project's one module that puts hooks on a model: steering (Hugging Face forward
hooks, TransformerLens hook functions) and reading activations at a hook
(:func:`hook_activations`), with one hook-name parser (:func:`hook_layer`) and one rule for the
positions left alone (:func:`protected_positions`).
"""

from __future__ import annotations

import contextvars
import functools
import math
import re
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Protocol

import numpy as np
import torch

from ops.errors import SaealignError, SAEMismatchError

Method = Literal["orig", "sae", "clamp", "swap", "weight", "set"]
METHODS: tuple[str, ...] = ("orig", "sae", "clamp", "swap", "weight", "set")
SCORED_METHODS: tuple[str, ...] = ("clamp", "swap", "weight")
ClampMode = Literal["multiply", "add"]
Positions = Literal["all", "last_prompt"]
POSITIONS: tuple[str, ...] = ("all", "last_prompt")


# ---------------------------------------------------------------------------------------------
# The request


def as_scores(scores: Any) -> torch.Tensor:
    """Topic scores as a float32 CPU tensor [d_sae]: values in [0, 1], NaN for unscored latents."""
    t = torch.as_tensor(np.asarray(scores, dtype=np.float32)).flatten().clone()
    if t.numel() == 0:
        raise SaealignError("topic scores are empty; fix: pass one score per SAE latent")
    finite = t[~torch.isnan(t)]
    if torch.isinf(finite).any() or (finite.numel() and (finite.min() < -1e-6 or finite.max() > 1 + 1e-6)):
        raise SaealignError("topic scores must lie in [0, 1] (NaN = unscored); fix: pass scores from `saealign score`")
    return t.clamp_(0.0, 1.0)  # NaN stays NaN


@dataclass(frozen=True, kw_only=True)
class SteeringOptions:
    """How a method steers: the settings one comparison of methods shares (docs/algorithms.md §3).
    Declared once here; job configs nest it and the service's request body is built from it."""

    clamp_k: int = 5
    """Clamp: how many of the highest-scored latents are clamped."""
    clamp_factor: float = 10.0
    """Clamp: the factor (multiply) or the added value (add); non-negative."""
    clamp_mode: ClampMode = "multiply"
    """Clamp: 'multiply' (paper text: factor × activation) or 'add' (public code: activation + factor)."""
    strength: float = 1.0
    """Swap/weight: scores used = 1 − strength·(1 − score); 0 = plain SAE, 1 = scores as given."""
    keep_error: bool = False
    """Add back the SAE error x − decode(a) (any method but orig)."""
    include_first: bool = False
    """Steer the first position and special tokens too (default: left untouched, docs/algorithms.md §3)."""

    def __post_init__(self) -> None:
        if self.clamp_mode not in ("multiply", "add"):
            raise SaealignError(f"clamp_mode must be 'multiply' or 'add', got '{self.clamp_mode}'")
        if self.clamp_k < 1:
            raise SaealignError(f"clamp_k must be at least 1, got {self.clamp_k}")
        if not (math.isfinite(self.clamp_factor) and self.clamp_factor >= 0):
            raise SaealignError(f"clamp_factor must be finite and non-negative, got {self.clamp_factor}")
        if not (math.isfinite(self.strength) and self.strength >= 0):
            raise SaealignError(f"strength must be finite and non-negative, got {self.strength}")

    def settings(self) -> dict[str, Any]:
        """The options as a plain dict (for reports, manifests and ``SteeringSpec(**...)``)."""
        return {f.name: getattr(self, f.name) for f in fields(SteeringOptions)}


@dataclass(frozen=True, eq=False)
class SteeringSpec(SteeringOptions):
    """What one request asks of the hook: a method, its inputs, and the :class:`SteeringOptions`
    (keyword-only). Immutable; validated on construction."""

    method: Method = "orig"
    """orig (no change), sae (SAE reconstruction), clamp (baseline), swap (paper eq. 3), weight
    (ablation), set (chosen latents set to given values, e.g. an AlignSAE concept swap)."""
    scores: torch.Tensor | None = None
    """Topic scores [d_sae] in [0, 1], NaN = unscored (treated as 0). Required by clamp/swap/weight;
    for orig/sae they only turn on the contamination measurement."""
    vector: torch.Tensor | None = None
    """A steering vector [d_model] added at every steered position after the method's edit."""
    latents: Mapping[int, float] | None = None
    """Set: latent index -> the value it takes (every other latent keeps its activation)."""
    topic: str | None = None
    """Label of the topic the scores belong to (reporting only)."""
    positions: Positions = "all"
    """Where the edit is written: 'all' steered positions, or only the 'last_prompt' position
    (the last token of the prefill; generated tokens are not edited)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in METHODS:
            raise SaealignError(f"unknown steering method '{self.method}'; fix: use one of {', '.join(METHODS)}")
        if self.positions not in POSITIONS:
            raise SaealignError(f"unknown positions '{self.positions}'; fix: use one of {', '.join(POSITIONS)}")
        self._check_latents()
        if self.scores is not None:
            object.__setattr__(self, "scores", as_scores(self.scores))
        elif self.method in SCORED_METHODS:
            raise SaealignError(f"method '{self.method}' needs topic scores; fix: pass --topic or scores")
        if self.vector is not None:
            v = torch.as_tensor(self.vector, dtype=torch.float32).detach().flatten().cpu()
            if v.numel() == 0 or not bool(torch.isfinite(v).all()):
                raise SaealignError("a steering vector must be non-empty and finite; fix: pass a [d_model] vector")
            object.__setattr__(self, "vector", v)
        if self.strength != 1.0 and self.method not in ("swap", "weight"):
            raise SaealignError(f"strength applies to swap and weight only, not '{self.method}'; fix: drop it")

    def _check_latents(self) -> None:
        if (self.method == "set") != (self.latents is not None):
            raise SaealignError(
                "method 'set' takes latents={index: value}, and only it does; fix: pass both or neither"
            )
        if self.latents is None:
            return
        latents = {int(i): float(v) for i, v in self.latents.items()}
        if not latents or min(latents) < 0 or not all(math.isfinite(v) for v in latents.values()):
            raise SaealignError("set latents must be non-empty, with indices >= 0 and finite values")
        object.__setattr__(self, "latents", latents)

    @classmethod
    def for_method(
        cls, method: str, scores: torch.Tensor | None, options: SteeringOptions, topic: str | None = None
    ) -> SteeringSpec:
        """The spec of ``method`` from options shared by several methods. What the method does not
        use is left at its default (``strength`` outside swap/weight, ``keep_error`` for orig), so
        one set of options serves every method of a comparison."""
        settings = SteeringOptions.settings(options)
        if method not in ("swap", "weight"):
            settings["strength"] = 1.0
        settings["keep_error"] = settings["keep_error"] and method != "orig"
        return cls(method, scores, topic=topic, **settings)  # type: ignore[arg-type]

    def options(self) -> dict[str, Any]:
        """The spec without its scores (for reports and manifests)."""
        return {
            "method": self.method,
            "topic": self.topic,
            **self.settings(),
            "has_scores": self.scores is not None,
            "vector_norm": float(self.vector.norm()) if self.vector is not None else None,
            "latents": dict(self.latents) if self.latents is not None else None,
            "positions": self.positions,
        }

    @property
    def needs_sae(self) -> bool:
        """Whether the hook must run the SAE for this row (to steer or to measure)."""
        return self.method != "orig" or self.scores is not None

    def check_fits(self, d_sae: int) -> None:
        """Raise :class:`SAEMismatchError` unless the scores belong to an SAE with ``d_sae`` latents."""
        if self.scores is not None and self.scores.numel() != d_sae:
            raise SAEMismatchError(
                f"topic scores have {self.scores.numel()} latents but the SAE has {d_sae}; "
                "fix: use scores computed with this SAE (score the lake built with it)"
            )
        if self.method == "clamp" and self.clamp_k > d_sae:
            raise SaealignError(f"clamp_k={self.clamp_k} exceeds the SAE's {d_sae} latents")
        if self.latents is not None and max(self.latents) >= d_sae:
            raise SAEMismatchError(f"set latent {max(self.latents)} is past the SAE's {d_sae} latents")


def check_scores_sae(scores_sae: str | None, sae_in_use: str) -> None:
    """Reject topic scores computed with another SAE (``scores_sae`` from the score metadata)."""
    if scores_sae is not None and scores_sae != sae_in_use:
        raise SAEMismatchError(
            f"the topic was scored with SAE '{scores_sae}', but generation uses SAE '{sae_in_use}'; "
            f"fix: pass --sae {scores_sae}, or score the topic on a lake built with '{sae_in_use}'"
        )


# ---------------------------------------------------------------------------------------------
# The SAE, seen as pre-activation -> activation -> decode


class LatentView(Protocol):
    """What the steering hook needs of an SAE: γ = pre(x), a = act(γ), x' = decode(a)."""

    @property
    def kind(self) -> str: ...

    @property
    def d_sae(self) -> int: ...

    def pre(self, x: torch.Tensor) -> torch.Tensor: ...

    def act(self, gamma: torch.Tensor) -> torch.Tensor: ...

    def decode(self, acts: torch.Tensor) -> torch.Tensor: ...


def latent_view(sae: Any) -> LatentView:
    """The view of ``sae`` the hook runs: its own ``steering_view()`` when it has one (an SAE with
    extra slots, e.g. ``ops.alignsae.training.AlignedSAE``), else :meth:`SAEView.of` (an sae-lens SAE)."""
    own = getattr(sae, "steering_view", None)
    return own() if callable(own) else SAEView.of(sae)


STEERABLE_ARCHITECTURES: dict[str, str] = {
    "standard": "relu",
    "jumprelu": "jumprelu",
    "topk": "topk",
    "gated": "jumprelu",
}
"""sae-lens inference architectures the hook can run -> how :class:`SAEView` sees them. BatchTopK
SAEs are saved for inference as JumpReLU (sae-lens ``save_inference_model``), so they load as one;
a gated SAE is a JumpReLU on its magnitude path (see :meth:`SAEView.of`)."""


def steering_kind(sae: Any) -> str:
    """How the steering hook sees ``sae`` (``relu``, ``jumprelu``, ``topk``); raises naming the
    architecture and the fix when the one-hook intervention cannot run it."""
    arch = str(sae.cfg.architecture())
    if arch in STEERABLE_ARCHITECTURES:
        return STEERABLE_ARCHITECTURES[arch]
    supported = ", ".join([*STEERABLE_ARCHITECTURES, "batchtopk (saved for inference)"])
    why = (
        "it reads one hook and writes another, and steering edits one hook in place"
        if "transcoder" in arch
        else "its encoder is not a pre-activation followed by an element-wise or top-k activation"
    )
    raise SAEMismatchError(
        f"steering cannot use a '{arch}' SAE ({why}); fix: use a {supported} SAE trained at the hook to steer"
    )


@dataclass
class SAEView:
    """An sae-lens SAE split into γ = pre(x), a = act(γ), x' = decode(a), exactly as its encode."""

    sae: Any
    kind: Literal["topk", "relu", "jumprelu"]
    k: int
    threshold: torch.Tensor | None
    """JumpReLU threshold [d_sae] (None otherwise)."""
    dec_norm: torch.Tensor | None
    """TopK with rescale_acts_by_decoder_norm: ||W_dec_i|| multiplied into γ, as sae-lens does."""
    inv_dec_norm: torch.Tensor | None = None
    """1 / ||W_dec_i||, applied before decoding (same case)."""
    w_pre: torch.Tensor | None = None
    """Encoder weight [d_in, d_sae] of γ when it is not ``W_enc`` (gated: the magnitude path's)."""
    b_pre: torch.Tensor | None = None
    """Encoder bias [d_sae] of γ when it is not ``b_enc`` (gated: ``b_mag``)."""

    @classmethod
    def of(cls, sae: Any) -> SAEView:
        """The view of an sae-lens SAE (:data:`STEERABLE_ARCHITECTURES`).

        A gated SAE computes a = 1[x W_enc + b_gate > 0] · relu(γ) with the magnitude
        pre-activation γ = x (W_enc ⊙ exp(r_mag)) + b_mag. Its weights are shared, so the gate is
        open exactly where γ > θ with θ = b_mag − exp(r_mag) · b_gate: a gated SAE is a JumpReLU on
        γ with threshold θ, and Swap and Weight treat it as one (same active-set rule)."""
        kind = steering_kind(sae)
        gated = sae.cfg.architecture() == "gated"
        with torch.no_grad():
            rescale = kind == "topk" and bool(getattr(sae.cfg, "rescale_acts_by_decoder_norm", False))
            dec_norm = sae.W_dec.norm(dim=-1).detach() if rescale else None
            threshold = sae.threshold.detach() if kind == "jumprelu" and not gated else None
            w_pre = b_pre = None
            if gated:
                scale = sae.r_mag.detach().exp()
                w_pre, b_pre = sae.W_enc.detach() * scale, sae.b_mag.detach()
                threshold = b_pre - scale * sae.b_gate.detach()
        k = int(sae.cfg.k) if kind == "topk" else 0
        inv = 1 / dec_norm if dec_norm is not None else None
        return cls(
            sae=sae,
            kind=kind,  # type: ignore[arg-type]
            k=k,
            threshold=threshold,
            dec_norm=dec_norm,
            inv_dec_norm=inv,
            w_pre=w_pre,
            b_pre=b_pre,
        )

    @property
    def d_sae(self) -> int:
        return int(self.sae.cfg.d_sae)

    @property
    def d_in(self) -> int:
        return int(self.sae.cfg.d_in)

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        """γ [..., d_sae] for x [..., d_in]."""
        w = self.w_pre if self.w_pre is not None else self.sae.W_enc
        b = self.b_pre if self.b_pre is not None else self.sae.b_enc
        gamma = self.sae.process_sae_in(x) @ w + b
        return gamma * self.dec_norm if self.dec_norm is not None else gamma

    def act(self, gamma: torch.Tensor) -> torch.Tensor:
        """σ(γ): the SAE's own activation."""
        if self.kind == "topk":
            values, idx = torch.topk(gamma, self.k, dim=-1, sorted=False)
            return torch.zeros_like(gamma).scatter_(-1, idx, values.relu())
        acts = gamma.relu()
        if self.threshold is not None:
            acts = acts * (gamma > self.threshold)
        return acts

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """x' [..., d_in] for activations [..., d_sae], as ``sae.decode`` (TopK rescaling uses the
        decoder norms computed once instead of on every call)."""
        if self.inv_dec_norm is None:
            return self.sae.decode(acts)
        sae = self.sae
        out = sae.hook_sae_recons((acts * self.inv_dec_norm) @ sae.W_dec + sae.b_dec)
        return sae.reshape_fn_out(sae.run_time_activation_norm_fn_out(out), sae.d_head)


# ---------------------------------------------------------------------------------------------
# Pure interventions on one batch of pre-activations (scores broadcast against γ)


def clamp_acts(acts: torch.Tensor, clamp_mask: torch.Tensor, mult: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    """Clamp: where ``clamp_mask``, a' = a·mult + add (multiply: mult=factor, add=0; add: 1, factor)."""
    return torch.where(clamp_mask, acts * mult + add, acts)


def swap_acts(view: SAEView, gamma: torch.Tensor, acts: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Swap (docs/algorithms.md §3, paper eq. 3): re-select latents on γ ⊙ s, keep the original relu(γ) values."""
    weighted = gamma * scores
    if view.kind == "topk":
        values, idx = torch.topk(weighted, view.k, dim=-1, sorted=False)
        keep = torch.zeros_like(gamma, dtype=torch.bool).scatter_(-1, idx, values > 0)
        return torch.where(keep, gamma.relu(), torch.zeros_like(gamma))
    k_t = (acts > 0).sum(dim=-1, keepdim=True)  # [..., 1] active-set size to preserve
    k_max = int(k_t.max()) if k_t.numel() else 0
    if k_max == 0:
        return torch.zeros_like(gamma)
    margin = weighted - view.threshold if view.threshold is not None else weighted
    ranked = torch.where(weighted > 0, margin, torch.full_like(margin, -math.inf))
    values, idx = torch.topk(ranked, k_max, dim=-1, sorted=True)
    chosen = (torch.arange(k_max, device=gamma.device) < k_t) & torch.isfinite(values)
    keep = torch.zeros_like(gamma, dtype=torch.bool).scatter_(-1, idx, chosen)
    return torch.where(keep, gamma.relu(), torch.zeros_like(gamma))


def weight_acts(view: SAEView, gamma: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Weight (paper A.4 ablation): σ(γ ⊙ s)."""
    return view.act(gamma * scores)


def contamination(acts: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """c = Σ a'_i (1 − s_i) / Σ a'_i over the last dim (s NaN read as 0; 0 when Σ a' = 0)."""
    s = torch.nan_to_num(scores, nan=0.0)
    num = (acts * (1.0 - s)).sum(dim=-1)
    den = acts.sum(dim=-1)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(acts.dtype).tiny), torch.zeros_like(den))


def latents_changed(new_acts: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    """Number of latent indices whose value differs between a' and a (last dim)."""
    return (new_acts != acts).sum(dim=-1)


def effective_scores(spec: SteeringSpec) -> torch.Tensor | None:
    """Scores the intervention uses: NaN -> 0, then 1 − strength·(1 − s)."""
    if spec.scores is None:
        return None
    s = torch.nan_to_num(spec.scores, nan=0.0)
    return s if spec.strength == 1.0 else 1.0 - spec.strength * (1.0 - s)


def _stack_vectors(specs: Sequence[SteeringSpec], device: torch.device) -> torch.Tensor | None:
    """[R, 1, d_model] steering vectors of the specs (zeros where none), or None when no spec has one."""
    vecs = [s.vector for s in specs]
    present = [v for v in vecs if v is not None]
    if not present:
        return None
    width = present[0].numel()
    if any(v.numel() != width for v in present):
        raise SaealignError("steering vectors of one batch differ in width; fix: use vectors of the model's d_model")
    rows = [v if v is not None else torch.zeros(width) for v in vecs]
    return torch.stack(rows).to(device)[:, None, :]


def clamp_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean [d_sae]: the ``k`` highest-scored latents (NaN read as 0)."""
    idx = torch.topk(torch.nan_to_num(scores, nan=0.0), k).indices
    return torch.zeros(scores.shape[-1], dtype=torch.bool).index_fill_(0, idx, True)


# ---------------------------------------------------------------------------------------------
# Per-row specs stacked into tensors


@dataclass
class _Group:
    """Rows (indices into the SAE sub-batch) sharing one method, with their stacked parameters."""

    method: str
    rows: torch.Tensor  # [g] long
    scores: torch.Tensor  # [g, 1, d_sae] effective scores (ones where none)
    clamp_mask: torch.Tensor | None = None  # [g, 1, d_sae] bool (clamp: clamped; set: replaced)
    mult: torch.Tensor | None = None  # [g, 1, 1]
    add: torch.Tensor | None = None  # [g, 1, 1]
    values: torch.Tensor | None = None  # [g, 1, d_sae] set: the values of the replaced latents


@dataclass
class StepStats:
    """What one steered forward measured: contamination and latents changed [batch, seq] (NaN
    where not measured), and where the output was replaced (``steered`` [batch, seq])."""

    contamination: torch.Tensor
    latents_changed: torch.Tensor
    steered: torch.Tensor


class BatchSteerer:
    """Applies per-row specs to one batch of hook activations. One spec broadcasts to any batch."""

    def __init__(self, view: LatentView | None, specs: Sequence[SteeringSpec], device: str | torch.device = "cpu"):
        if not specs:
            raise SaealignError("no steering spec given; fix: pass one spec per prompt (or one for all)")
        self.specs = list(specs)
        self.view = view
        self.device = torch.device(device)
        sae_rows = [i for i, s in enumerate(self.specs) if s.needs_sae]
        self.vectors = _stack_vectors(self.specs, self.device)
        self.has_vector = torch.tensor([s.vector is not None for s in self.specs], device=self.device)
        self.uses_sae = bool(sae_rows)
        self.active = self.uses_sae or self.vectors is not None
        self.include_first = torch.tensor([s.include_first for s in self.specs], device=self.device)
        self.last_only = torch.tensor([s.positions == "last_prompt" for s in self.specs], device=self.device)
        self.any_last_only = bool(self.last_only.any())
        if not self.uses_sae:
            return
        if view is None:
            raise SaealignError("these steering specs need an SAE; fix: pass the SAE the scores were computed with")
        for spec in self.specs:
            spec.check_fits(view.d_sae)
            if spec.method in ("swap", "weight") and not isinstance(view, SAEView):
                raise SaealignError(
                    f"method '{spec.method}' needs a plain sae-lens SAE, not one with {view.kind} slots; "
                    "fix: use orig, sae, clamp or set with this SAE"
                )
        self._build(view, [self.specs[i] for i in sae_rows], sae_rows)

    def _build(self, view: LatentView, specs: list[SteeringSpec], sae_rows: list[int]) -> None:
        dev, d = self.device, view.d_sae
        self.sae_rows = torch.tensor(sae_rows, dtype=torch.long, device=dev)
        self.all_rows = len(sae_rows) == len(self.specs)
        ones = torch.ones(d)
        true = [torch.nan_to_num(s.scores, nan=0.0) if s.scores is not None else ones for s in specs]
        self.true_scores = torch.stack(true).to(dev)[:, None, :]  # [R, 1, d]
        self.measured = torch.tensor([s.scores is not None for s in specs], device=dev)
        self.modifies = torch.tensor([s.method != "orig" for s in specs], device=dev)
        self.any_modifies = bool(self.modifies.any())
        self.keep_error = torch.tensor([[[float(s.keep_error and s.method != "orig")]] for s in specs], device=dev)
        self.any_keep_error = bool(self.keep_error.any())
        self.groups: list[_Group] = []
        for method in METHODS[1:]:
            idx = [i for i, s in enumerate(specs) if s.method == method]
            if idx:
                self.groups.append(self._group(method, idx, specs, d))

    def _group(self, method: str, idx: list[int], specs: list[SteeringSpec], d: int) -> _Group:
        dev = self.device
        eff = [effective_scores(specs[i]) for i in idx]
        scores = torch.stack([e if e is not None else torch.ones(d) for e in eff]).to(dev)[:, None, :]
        group = _Group(method, torch.tensor(idx, dtype=torch.long, device=dev), scores)
        if method == "clamp":
            sel = [specs[i] for i in idx]
            group.clamp_mask = torch.stack([clamp_mask(s.scores, s.clamp_k) for s in sel]).to(dev)[:, None, :]  # type: ignore[arg-type]
            group.mult = torch.tensor([s.clamp_factor if s.clamp_mode == "multiply" else 1.0 for s in sel], device=dev)
            group.add = torch.tensor([s.clamp_factor if s.clamp_mode == "add" else 0.0 for s in sel], device=dev)
            group.mult, group.add = group.mult[:, None, None], group.add[:, None, None]
        if method == "set":
            group.clamp_mask = torch.zeros(len(idx), 1, d, dtype=torch.bool, device=dev)
            group.values = torch.zeros(len(idx), 1, d, device=dev)
            for row, i in enumerate(idx):
                latents = specs[i].latents or {}
                where = torch.tensor(list(latents), dtype=torch.long, device=dev)
                group.clamp_mask[row, 0, where] = True
                group.values[row, 0, where] = torch.tensor(list(latents.values()), device=dev)
        return group

    def check_batch(self, batch: int) -> None:
        if len(self.specs) not in (1, batch):
            raise SaealignError(f"{len(self.specs)} steering specs for a batch of {batch}; fix: one per row or one")

    def _intervene(self, gamma: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
        if not self.groups:  # only measuring rows (orig with scores)
            return acts
        if len(self.groups) == 1 and (len(self.specs) == 1 or len(self.groups[0].rows) == gamma.shape[0]):
            return self._apply_group(self.groups[0], gamma, acts)
        new = acts.clone()
        for g in self.groups:
            new[g.rows] = self._apply_group(g, gamma[g.rows], acts[g.rows])
        return new

    def _apply_group(self, g: _Group, gamma: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
        assert self.view is not None
        if g.method == "sae":
            return acts
        if g.method == "clamp":
            assert g.clamp_mask is not None and g.mult is not None and g.add is not None
            return clamp_acts(acts, g.clamp_mask, g.mult, g.add)
        if g.method == "set":
            assert g.clamp_mask is not None and g.values is not None
            return torch.where(g.clamp_mask, g.values.to(acts.dtype), acts)
        if not isinstance(self.view, SAEView):  # checked in __init__
            raise AssertionError(g.method)
        if g.method == "swap":
            return swap_acts(self.view, gamma, acts, g.scores)
        return weight_acts(self.view, gamma, g.scores)

    def apply(
        self, x: torch.Tensor, real: torch.Tensor, protected: torch.Tensor, last_prompt: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, StepStats | None]:
        """Steer x [B, S, D]; ``real`` [B, S] marks non-padding, ``protected`` [B, S] the first
        position and special tokens, ``last_prompt`` [B, S] the last prompt position (needed by
        specs with ``positions='last_prompt'``; :func:`last_prompt_positions`). Returns the new
        activations and the step's statistics."""
        self.check_batch(x.shape[0])
        if not self.active:
            return x, None
        include = self.include_first if len(self.specs) == x.shape[0] else self.include_first.expand(x.shape[0])
        steer = real & (include[:, None] | ~protected)
        if self.any_last_only:
            if last_prompt is None:
                raise SaealignError("a 'last_prompt' spec needs the last prompt positions; fix: pass last_prompt")
            only = self.last_only if len(self.specs) == x.shape[0] else self.last_only.expand(x.shape[0])
            steer = steer & (~only[:, None] | last_prompt.to(steer.device))
        if not self.uses_sae:
            nan = torch.full(steer.shape, math.nan, device=x.device)
            return self._add_vectors(x, steer), StepStats(nan, nan.clone(), steer & self.has_vector[:, None])
        out, stats = self._apply_sae(x, steer)
        if self.vectors is not None:
            out = self._add_vectors(out, steer)
            stats.steered = stats.steered | (steer & self.has_vector[:, None])
        return out, stats

    def _add_vectors(self, x: torch.Tensor, steer: torch.Tensor) -> torch.Tensor:
        assert self.vectors is not None
        if self.vectors.shape[-1] != x.shape[-1]:
            raise SAEMismatchError(
                f"steering vector has {self.vectors.shape[-1]} dims but the hook has {x.shape[-1]}; "
                "fix: compute the vector at this model's hook"
            )
        return x + steer[..., None].to(x.dtype) * self.vectors.to(x.dtype)

    def _apply_sae(self, x: torch.Tensor, steer: torch.Tensor) -> tuple[torch.Tensor, StepStats]:
        assert self.view is not None
        rows = None if (self.all_rows or len(self.specs) == 1) else self.sae_rows
        xs = x if rows is None else x.index_select(0, rows)
        st = steer if rows is None else steer.index_select(0, rows)
        gamma = self.view.pre(xs)
        acts = self.view.act(gamma)
        new_acts = self._intervene(gamma, acts)
        write = st & self.modifies[:, None]
        if self.any_modifies:
            x_new = self.view.decode(new_acts)
            if self.any_keep_error:
                x_new = x_new + self.keep_error * (xs - self.view.decode(acts))
            out = torch.where(write[..., None], x_new.to(xs.dtype), xs)
        else:  # only measuring
            out = xs
        nan = torch.full(st.shape, math.nan, device=x.device)
        c = torch.where(st & self.measured[:, None], contamination(new_acts, self.true_scores), nan)
        ch = torch.where(st, latents_changed(new_acts, acts).float(), nan)
        if rows is None:
            return out, StepStats(c, ch, write)
        full_nan = torch.full(steer.shape, math.nan, device=x.device)
        stats = StepStats(
            full_nan.index_copy(0, rows, c),
            full_nan.index_copy(0, rows, ch),
            torch.zeros_like(steer).index_copy(0, rows, write),
        )
        return x.index_copy(0, rows, out), stats


@dataclass
class SteeringRecord:
    """Statistics of one steered call, one :class:`StepStats` per forward (prefill first, then
    one per decode step)."""

    steps: list[StepStats] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Hook names and positions

_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.")


def hook_layer(hook_name: str) -> int:
    """Block index of a TransformerLens hook name such as ``blocks.6.hook_resid_post``."""
    match = _BLOCK_HOOK.match(hook_name)
    if not match:
        raise SaealignError(f"hook '{hook_name}' is not a per-block hook; fix: use e.g. 'blocks.6.hook_resid_post'")
    return int(match.group(1))


def protected_positions(
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    past_len: int,
    special_ids: torch.Tensor,
    shape: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(real, protected) [B, S] for the current chunk of a possibly KV-cached forward.

    ``attention_mask`` is the 2-D mask over past + current positions (left padding allowed); the
    first real position of a row is where its running count of real tokens is 1.
    """
    batch, seq = shape
    device = input_ids.device if input_ids is not None else special_ids.device
    if attention_mask is not None and attention_mask.dim() == 2:
        mask = attention_mask.bool()
        real = mask[:, -seq:]
        first = (mask.cumsum(dim=-1)[:, -seq:] == 1) & real
    else:
        real = torch.ones(shape, dtype=torch.bool, device=device)
        first = (torch.arange(seq, device=device) + past_len == 0).expand(batch, seq)
    special = torch.isin(input_ids, special_ids) if input_ids is not None else torch.zeros_like(real)
    return real, first | special


def last_prompt_positions(real: torch.Tensor, past_len: int) -> torch.Tensor:
    """[B, S] bool: the last real position of each row when this chunk starts the sequence
    (``past_len`` 0: a prefill or a plain forward), nothing in a KV-cached decode step."""
    if past_len > 0:
        return torch.zeros_like(real, dtype=torch.bool)
    after = real.flip(-1).long().cumsum(-1).flip(-1)  # real positions at or after each one
    return real.bool() & (after == 1)


def _config_special_ids(config: Any) -> list[int]:
    ids: set[int] = set()
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, name, None)
        ids.update(value if isinstance(value, list) else [] if value is None else [value])
    return sorted(ids)


def special_ids_of(tokenizer: Any) -> list[int]:
    """BOS, EOS, pad and every other special token id of a tokenizer."""
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    ids.update(getattr(tokenizer, "all_special_ids", []) or [])
    return sorted(i for i in ids if i is not None)


# ---------------------------------------------------------------------------------------------
# Hugging Face path: dispatching hooks + a ContextVar session


@dataclass
class _Session:
    steerer: BatchSteerer
    record: SteeringRecord
    special_ids: torch.Tensor
    base: torch.nn.Module
    layer: torch.nn.Module
    positions: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def capture(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self.steerer.active:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        embeds = kwargs.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        if ref is None:
            self.positions = None
            return
        past_len = _cached_length(kwargs)
        shape = (int(ref.shape[0]), int(ref.shape[1]))
        real, protected = protected_positions(ids, mask, past_len, self.special_ids.to(ref.device), shape)
        self.positions = (real, protected, last_prompt_positions(real, past_len))

    def steer(self, output: Any) -> Any:
        if not self.steerer.active:
            return None
        x = output[0] if isinstance(output, tuple) else output
        if self.positions is None or self.positions[0].shape != x.shape[:2]:
            raise SaealignError("steering hook saw a layer call without its model inputs; call the model normally")
        new_x, stats = self.steerer.apply(x, *self.positions)
        if stats is not None:
            self.record.steps.append(stats)
        return (new_x, *output[1:]) if isinstance(output, tuple) else new_x


def _cached_length(kwargs: dict[str, Any]) -> int:
    """Tokens already in the KV cache of this forward: read from the ``Cache`` object itself,
    whichever keyword carries it (``cache`` from transformers 5.24, ``past_key_values`` before)."""
    from transformers import Cache

    for value in kwargs.values():
        if isinstance(value, Cache):
            return int(value.get_seq_length())
    return 0


_ACTIVE: contextvars.ContextVar[tuple[_Session, ...]] = contextvars.ContextVar("saealign_steering", default=())
_LOCK = threading.Lock()
_INSTALLED: weakref.WeakKeyDictionary[torch.nn.Module, tuple[list[Any], int]] = weakref.WeakKeyDictionary()


def _capture_hook(
    layer: torch.nn.Module, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    for session in _ACTIVE.get():
        if session.layer is layer and session.base is module:
            session.capture(args, kwargs)


def _steer_hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    """Apply this context's sessions at ``module`` in the order they were entered."""
    changed = False
    for session in _ACTIVE.get():
        if session.layer is module:
            new = session.steer(output)
            if new is not None:
                output, changed = new, True
    return output if changed else None


@contextmanager
def _dispatchers(base: torch.nn.Module, layer: torch.nn.Module) -> Iterator[None]:
    """Register the dispatching hooks on first use, remove them when the last session ends."""
    with _LOCK:
        handles, count = _INSTALLED.get(layer, ([], 0))
        if count == 0:
            handles = [
                base.register_forward_pre_hook(functools.partial(_capture_hook, layer), with_kwargs=True),
                layer.register_forward_hook(_steer_hook),
            ]
        _INSTALLED[layer] = (handles, count + 1)
    try:
        yield
    finally:
        with _LOCK:
            handles, count = _INSTALLED[layer]
            if count == 1:
                for h in handles:
                    h.remove()
                del _INSTALLED[layer]
            else:
                _INSTALLED[layer] = (handles, count - 1)


STEERABLE_HOOKS = ("hook_resid_post", "hook_resid_pre")
"""Hook points the Hugging Face path can steer: the output of one decoder layer."""


def decoder_layer_of(hook_name: str) -> int:
    """Index of the decoder layer whose output is ``hook_name``: ``blocks.L.hook_resid_post`` is
    layer L's output, ``blocks.L.hook_resid_pre`` (L ≥ 1) layer L − 1's. Anything else (attention
    or MLP internals, ``blocks.0.hook_resid_pre``, the embeddings) has no decoder-layer output in
    every family's Hugging Face model, so it is refused with the fix."""
    layer = hook_layer(hook_name)
    point = hook_name.removeprefix(f"blocks.{layer}.")
    if point == "hook_resid_post":
        return layer
    if point == "hook_resid_pre" and layer >= 1:
        return layer - 1
    if point == "hook_resid_pre":
        fix = "use an SAE at blocks.0.hook_resid_post or blocks.1.hook_resid_pre"
    else:
        fix = f"use an SAE trained at blocks.{layer}.hook_resid_post or blocks.{layer + 1}.hook_resid_pre"
    raise SAEMismatchError(
        f"steering supports the residual stream between decoder layers "
        f"({', '.join(STEERABLE_HOOKS)}, resid_pre from block 1 on), not '{hook_name}'; fix: {fix}"
    )


def check_steerable(sae: Any, hook_name: str) -> None:
    """Raise (naming the combination and the fix) unless the steering hook can run ``sae`` at
    ``hook_name``: a job that builds a lake for steering checks this before doing any work."""
    own = getattr(sae, "steering_view", None)
    if not callable(own):
        steering_kind(sae)
    decoder_layer_of(hook_name)


def hf_hook_modules(hf: Any, hook_name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(base model, decoder layer) whose output is ``hook_name`` (:func:`decoder_layer_of`).
    The layers are ``model.layers`` (Llama, Gemma-2) or ``transformer.h`` (GPT-2)."""
    layer = decoder_layer_of(hook_name)
    base = getattr(hf, "model", None) or getattr(hf, "transformer", None)
    layers = getattr(base, "layers", None) or getattr(base, "h", None)
    if base is None or layers is None:
        raise SaealignError(
            f"cannot find the decoder layers of {type(hf).__name__} (model.layers or transformer.h); "
            "fix: use a Llama, GPT-2 or Gemma-2 model"
        )
    if layer >= len(layers):
        raise SAEMismatchError(f"hook '{hook_name}' is past the model's {len(layers)} layers")
    return base, layers[layer]


def _as_specs(specs: SteeringSpec | Sequence[SteeringSpec]) -> list[SteeringSpec]:
    return [specs] if isinstance(specs, SteeringSpec) else list(specs)


def make_steerer(sae: Any | None, specs: SteeringSpec | Sequence[SteeringSpec], device: Any = None) -> BatchSteerer:
    """A :class:`BatchSteerer` for ``specs`` (one per row, or one for all) on the SAE's device."""
    spec_list = _as_specs(specs)
    view = latent_view(sae) if sae is not None and any(s.needs_sae for s in spec_list) else None
    if device is None:
        device = _device_of(sae) if sae is not None else "cpu"
    return BatchSteerer(view, spec_list, device)


def _device_of(sae: Any) -> torch.device:
    """The device of an SAE's encoder: its own, or that of the sae-lens SAE it wraps."""
    for obj in (sae, getattr(sae, "sae", None), getattr(sae, "base", None)):
        weights = getattr(obj, "W_enc", None)
        if weights is not None:
            return weights.device
    return next(iter(sae.parameters())).device


@contextmanager
def steering_hook(
    hf: Any,
    sae: Any | None,
    hook_name: str,
    specs: SteeringSpec | Sequence[SteeringSpec],
    special_ids: Sequence[int] | None = None,
) -> Iterator[SteeringRecord]:
    """Steer every forward of ``hf`` (a Hugging Face causal LM) inside the block, in this context only.

    ``specs``: one per batch row, or one for all rows. Works for plain forwards, this project's
    decode loop and ``hf.generate`` alike: positions are derived from each call's ``input_ids``,
    2-D ``attention_mask`` (left padding) and KV cache, so decode steps are steered too.
    ``special_ids``: token ids left untouched (default: the model config's BOS, EOS and pad).
    Yields the call's :class:`SteeringRecord`.
    """
    base, layer = hf_hook_modules(hf, hook_name)
    if special_ids is None:
        special_ids = _config_special_ids(hf.config)
    device = next(hf.parameters()).device
    steerer = make_steerer(sae, specs, device)
    record = SteeringRecord()
    session = _Session(steerer, record, torch.tensor(list(special_ids), dtype=torch.long), base, layer)
    with _dispatchers(base, layer):
        token = _ACTIVE.set((*_ACTIVE.get(), session))
        try:
            yield record
        finally:
            _ACTIVE.reset(token)


# ---------------------------------------------------------------------------------------------
# TransformerLens path


def tl_steering_hook(
    sae: Any | None,
    specs: SteeringSpec | Sequence[SteeringSpec],
    tokens: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    special_ids: Sequence[int] = (),
) -> tuple[Callable[[torch.Tensor, Any], torch.Tensor], SteeringRecord]:
    """A hook function for ``HookedTransformer.run_with_hooks`` / ``hooks(fwd_hooks=...)`` at the
    SAE's hook, and its record.

    With ``tokens`` [B, S] (one full forward) positions are taken from them as on the HF path.
    Without tokens (e.g. TransformerLens ``generate`` with its KV cache) the hook counts
    positions across calls: position 0 of the first call is the protected first position;
    special tokens cannot be seen there.
    """
    steerer = make_steerer(sae, specs)
    record = SteeringRecord()
    special = torch.tensor(list(special_ids), dtype=torch.long)
    seen = [0]

    def hook_fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
        shape = (int(act.shape[0]), int(act.shape[1]))
        past = 0 if tokens is not None else seen[0]
        if tokens is not None:
            real, protected = protected_positions(tokens, attention_mask, 0, special.to(tokens.device), shape)
        else:
            real, protected = protected_positions(None, None, seen[0], special.to(act.device), shape)
            seen[0] += shape[1]
        real, protected = real.to(act.device), protected.to(act.device)
        new_act, stats = steerer.apply(act, real, protected, last_prompt_positions(real, past))
        if stats is not None:
            record.steps.append(stats)
        return new_act

    return hook_fn, record


@torch.no_grad()
def hook_activations(tl: Any, tokens: torch.Tensor, attention_mask: torch.Tensor, hook_name: str) -> torch.Tensor:
    """Activations [batch, seq, d_model] of a ``HookedTransformer`` at ``hook_name``, running only
    the blocks up to the hook's."""
    captured: dict[str, torch.Tensor] = {}

    def grab(act: torch.Tensor, hook: object) -> None:
        captured["x"] = act

    with tl.hooks(fwd_hooks=[(hook_name, grab)]):
        tl(tokens, attention_mask=attention_mask, stop_at_layer=hook_layer(hook_name) + 1)
    return captured["x"]
