"""Concept swaps (spec §6): edit concept slots at the hook, let the LM continue, judge the result.

For a text of concept A: zero slot A, set slot B to α × B's typical activation (its mean on B's
training texts), decode, and write the result back at the hook on every counted position
(prompt and generated tokens, KV-cached steps included; never position 0 or special tokens,
spec §3). ``keep_error`` (default True) adds back the SAE error ``x − x̂``, so only the edited
slots change the residual stream; without it the plain reconstruction alone costs far more
perplexity than the 30 % bound allows.

Judging: the *continuation alone* (the prompt is A's text and would bias the judgement) is
embedded with MiniLM and classified by the nearest centroid among the concepts of B's family
(centroids of their training texts); a swap succeeds when it is classified as B. Perplexity of
the continuation is measured under the unsteered model, and an α qualifies when the geometric
mean over its continuations is at most (1 + bound) × that of the unsteered continuations of the
same prompts (``ops.concept_metrics.best_alpha``: one sample's perplexity is too noisy to judge).

Generation runs on the Hugging Face model with a forward hook on the decoder layer
(``blocks.L.hook_resid_post`` = output of layer L, ``blocks.L.hook_resid_pre`` = its input):
TransformerLens ``generate`` is ~6× slower on CPU. Batches are left-padded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from ops.activations import special_token_ids
from ops.errors import SaealignError
from ops.generation import SamplingParams, continuation_perplexities, decode_loop, left_pad
from ops.models import LanguageModel

log = logging.getLogger(__name__)


class ConceptSAE(Protocol):
    """An SAE with one named slot per concept: :class:`ops.alignsae.AlignedSAE` or
    :class:`VanillaConceptSAE`."""

    @property
    def concept_slots(self) -> dict[str, int]: ...

    def typical_activation(self, concept: str) -> float: ...

    def encode(self, x: torch.Tensor) -> torch.Tensor: ...

    def decode(self, acts: torch.Tensor) -> torch.Tensor: ...


@dataclass
class VanillaConceptSAE:
    """A plain sae-lens SAE read through one chosen latent per concept (the vanilla baseline)."""

    sae: Any
    slots: dict[str, int]
    typical: dict[str, float]

    @property
    def concept_slots(self) -> dict[str, int]:
        return dict(self.slots)

    def typical_activation(self, concept: str) -> float:
        return self.typical[concept]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.sae.encode(x)

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        return self.sae.decode(acts)


@dataclass(frozen=True)
class SwapSpec:
    """One row's edit: slots of ``zero_concepts`` set to 0, slots of ``set_concepts`` set to
    α × typical activation (α the mapped value)."""

    set_concepts: Mapping[str, float] = field(default_factory=dict)
    zero_concepts: tuple[str, ...] = ()


def check_swap_concepts(csae: ConceptSAE, spec: SwapSpec) -> None:
    """Raise on a concept the SAE has no slot for."""
    known = csae.concept_slots
    unknown = [c for c in (*spec.set_concepts, *spec.zero_concepts) if c not in known]
    if unknown:
        raise SaealignError(f"unknown concept(s) in swap: {', '.join(unknown)}; fix: use one of {', '.join(known)}")


@dataclass
class SlotEdit:
    """Per-row slot edits for a batch: ``replace`` [b, d_sae] bool, ``values`` [b, d_sae]."""

    replace: torch.Tensor
    values: torch.Tensor

    @classmethod
    def build(cls, csae: ConceptSAE, specs: Sequence[SwapSpec], d_sae: int) -> SlotEdit:
        replace = torch.zeros(len(specs), d_sae, dtype=torch.bool)
        values = torch.zeros(len(specs), d_sae)
        slots = csae.concept_slots
        for row, spec in enumerate(specs):
            check_swap_concepts(csae, spec)
            for concept in spec.zero_concepts:
                replace[row, slots[concept]] = True
            for concept, alpha in spec.set_concepts.items():
                replace[row, slots[concept]] = True
                values[row, slots[concept]] = alpha * csae.typical_activation(concept)
        return cls(replace, values)


def make_editor(
    csae: ConceptSAE, specs: Sequence[SwapSpec], keep_error: bool = True
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``edit(x [n, d], rows [n]) -> x'``: the swap of ``specs[rows[i]]`` applied to token i."""
    probe = csae.encode(torch.zeros(1, _d_in(csae), device=_device(csae)))
    edit = SlotEdit.build(csae, specs, probe.shape[-1])
    replace, values = edit.replace.to(probe.device), edit.values.to(probe.device, probe.dtype)

    def apply(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        acts = csae.encode(x)
        edited = torch.where(replace[rows], values[rows], acts)
        out = csae.decode(edited)
        return out + (x - csae.decode(acts)) if keep_error else out

    return apply


def _sae_of(csae: Any) -> Any:
    base = getattr(csae, "base", None)
    return base if base is not None else csae.sae


def _d_in(csae: Any) -> int:
    return int(_sae_of(csae).cfg.d_in)


def _device(csae: Any) -> torch.device:
    return _sae_of(csae).W_enc.device


# ---------------------------------------------------------------------------------------------
# Hooking the Hugging Face model


def _layer_and_kind(model: LanguageModel, hook_name: str) -> tuple[Any, str]:
    parts = hook_name.split(".")
    kinds = {"hook_resid_post": "post", "hook_resid_pre": "pre"}
    if len(parts) != 3 or parts[0] != "blocks" or not parts[1].isdigit() or parts[2] not in kinds:
        raise SaealignError(
            f"concept swaps support blocks.L.hook_resid_post / hook_resid_pre, not '{hook_name}'; "
            "fix: use an SAE trained on the residual stream"
        )
    layers = model.hf.model.layers
    layer = int(parts[1])
    if layer >= len(layers):
        raise SaealignError(f"hook '{hook_name}' is past the model's {len(layers)} layers; fix: use a smaller block")
    return layers[layer], kinds[parts[2]]


@dataclass
class _HookState:
    keep: torch.Tensor | None = None


@contextmanager
def steering_hook(
    model: LanguageModel, hook_name: str, edit: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> Iterator[_HookState]:
    """Install ``edit`` at ``hook_name`` for the duration of the block; the caller sets
    ``state.keep`` ([batch, seq] bool: positions to edit) before every forward call."""
    module, kind = _layer_and_kind(model, hook_name)
    state = _HookState()

    def apply(hidden: torch.Tensor) -> torch.Tensor:
        keep = state.keep
        if keep is None or not keep.any():
            return hidden
        keep = keep.to(hidden.device)
        rows = keep.nonzero()[:, 0]
        out = hidden.clone()
        out[keep] = edit(hidden[keep], rows).to(hidden.dtype)
        return out

    if kind == "post":
        handle = module.register_forward_hook(lambda _m, _a, out: apply(out))
    else:
        handle = module.register_forward_pre_hook(lambda _m, args: (apply(args[0]), *args[1:]))
    try:
        yield state
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------
# Generation and perplexity


def generate_ids(
    model: LanguageModel,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    seed: int | None = 0,
    top_k: int = 5,
    hook_name: str | None = None,
    edit: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> list[list[int]]:
    """Continue each prompt with the project's decode loop (``ops.generation.decode_loop``:
    batched, KV cache, one sampling generator per row), with ``edit`` applied at ``hook_name`` on
    every counted position. ``seed`` None or ``top_k`` 1 = greedy; else top-k sampling with every
    row seeded by ``seed``. Returns the new token ids per prompt, cut after the first EOS."""
    special = torch.tensor(special_token_ids(model))
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    eos = model.tokenizer.eos_token_id
    batch = left_pad([list(row) for row in prompt_ids], pad, str(model.device))
    mask = batch.attention_mask.cpu()
    keep = mask.bool() & ~torch.isin(batch.input_ids.cpu(), special)
    keep &= mask.cumsum(1) > 1  # not the first real position
    greedy = seed is None or top_k == 1
    params = SamplingParams(max_new_tokens=max_new_tokens, greedy=greedy, top_k=top_k, seed=seed or 0)
    finished = torch.zeros(len(batch.ids), dtype=torch.bool)

    def next_positions(_step: int, nxt: torch.Tensor) -> None:
        nxt = nxt.cpu()
        state.keep = (~finished & ~torch.isin(nxt, special))[:, None]
        finished.logical_or_(nxt == eos)

    hooked: AbstractContextManager[_HookState] = (
        steering_hook(model, hook_name, edit) if edit is not None and hook_name else nullcontext(_HookState())
    )
    with hooked as state:
        state.keep = keep
        ids, dead, _ = decode_loop(model.hf, batch, params, [eos], pad, on_step=next_positions)
    out = []
    for row, gone in zip(ids.tolist(), dead.tolist(), strict=True):
        new = [t for t, d in zip(row, gone, strict=True) if not d]
        out.append(new[: new.index(eos) + 1] if eos in new else new)
    return out


# ---------------------------------------------------------------------------------------------
# Classification of continuations


@dataclass
class CentroidClassifier:
    """Nearest centroid (cosine) of L2-normalised sentence embeddings, one centroid per concept."""

    concepts: list[str]
    centroids: np.ndarray
    embedder: str

    @classmethod
    def fit(cls, texts_by_concept: Mapping[str, Sequence[str]], embedder: str | None = None) -> CentroidClassifier:
        from ops.embedders import EMBEDDED_EMBEDDER, embed

        name = embedder or EMBEDDED_EMBEDDER
        cents = []
        for texts in texts_by_concept.values():
            mean = embed(list(texts), name).mean(0)
            cents.append(mean / max(float(np.linalg.norm(mean)), 1e-8))
        return cls(list(texts_by_concept), np.stack(cents), name)

    def predict(self, texts: Sequence[str], candidates: Sequence[Sequence[str]]) -> list[str]:
        """For each text, the nearest of its candidate concepts ('' for an empty text)."""
        from ops.embedders import embed

        sims = embed(list(texts), self.embedder) @ self.centroids.T if texts else np.zeros((0, 0))
        index = {c: j for j, c in enumerate(self.concepts)}
        out = []
        for i, (text, cands) in enumerate(zip(texts, candidates, strict=True)):
            cols = [index[c] for c in cands]
            out.append(cands[int(np.argmax(sims[i, cols]))] if text.strip() and cols else "")
        return out


# ---------------------------------------------------------------------------------------------
# The function the generate command calls


@dataclass(frozen=True)
class SwapGeneration:
    prompt: str
    continuation: str
    token_ids: list[int]


def concept_swap_generate(
    model: LanguageModel,
    aligned_sae: ConceptSAE,
    hook: str,
    prompt: str,
    set_concepts: Mapping[str, float],
    zero_concepts: Sequence[str] = (),
    max_new_tokens: int = 64,
    seed: int | None = 0,
    top_k: int = 5,
    keep_error: bool = True,
) -> SwapGeneration:
    """Generate from ``prompt`` with concept slots edited at ``hook``: each concept in
    ``set_concepts`` set to α × its typical activation, each in ``zero_concepts`` set to 0.
    Unknown concepts raise :class:`SaealignError`."""
    spec = SwapSpec(dict(set_concepts), tuple(zero_concepts))
    check_swap_concepts(aligned_sae, spec)
    ids = model.tokenize([prompt])
    editor = make_editor(aligned_sae, [spec], keep_error)
    new = generate_ids(model, ids, max_new_tokens, seed, top_k, hook, editor)[0]
    text = str(model.tokenizer.decode(new, skip_special_tokens=True))
    return SwapGeneration(prompt=prompt, continuation=text, token_ids=new)


# ---------------------------------------------------------------------------------------------
# Swap success vs α (the AlignSAE table)


@dataclass(frozen=True)
class SwapTrial:
    """Steer ``prompt`` (a text of concept ``source``) towards ``target``; ``candidates`` are the
    concepts the continuation is classified among (the target's family)."""

    prompt: str
    source: str
    target: str
    candidates: tuple[str, ...]


def plan_swaps(
    texts: Sequence[str],
    labels: Sequence[str],
    families: Mapping[str, str],
    per_family: int,
    seed: int = 0,
    max_prompt_chars: int = 400,
) -> list[SwapTrial]:
    """Up to ``per_family`` trials per family with at least two concepts: prompts drawn round-robin
    over the family's concepts, each with a seeded random target among the family's others."""
    rng = np.random.default_rng(seed)
    by_family: dict[str, list[str]] = {}
    for concept, fam in families.items():
        by_family.setdefault(fam, []).append(concept)
    trials: list[SwapTrial] = []
    for members in by_family.values():
        if len(members) < 2:
            continue
        pools = {c: [t[:max_prompt_chars] for t, lab in zip(texts, labels, strict=True) if lab == c] for c in members}
        for c in members:
            rng.shuffle(pools[c])
        for i in range(per_family):
            source = members[i % len(members)]
            if i // len(members) >= len(pools[source]):
                continue
            others = [m for m in members if m != source]
            target = others[int(rng.integers(len(others)))]
            trials.append(SwapTrial(pools[source][i // len(members)], source, target, tuple(members)))
    return trials


@dataclass
class SwapOutcome:
    """Continuations of a list of trials: predicted concept and perplexity per trial."""

    continuations: list[str]
    predicted: list[str]
    perplexities: list[float]


def run_trials(
    model: LanguageModel,
    trials: Sequence[SwapTrial],
    classifier: CentroidClassifier,
    max_new_tokens: int,
    seed: int | None,
    hook: str | None = None,
    editor: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 32,
) -> SwapOutcome:
    """Generate for every trial (steered when ``editor`` is given), classify, measure perplexity."""
    prompts = model.tokenize([t.prompt for t in trials])
    new: list[list[int]] = []
    for start in range(0, len(trials), batch_size):
        rows = list(range(start, min(start + batch_size, len(trials))))
        sub_edit = None if editor is None else _row_offset(editor, start)
        new += generate_ids(model, [prompts[r] for r in rows], max_new_tokens, seed, 5, hook, sub_edit)
    texts = [str(model.tokenizer.decode(ids, skip_special_tokens=True)) for ids in new]
    predicted = classifier.predict(texts, [t.candidates for t in trials])
    return SwapOutcome(texts, predicted, continuation_perplexities(model, prompts, new))


def _row_offset(
    editor: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], offset: int
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return lambda x, rows: editor(x, rows + offset)


def swap_specs(trials: Sequence[SwapTrial], alpha: float) -> list[SwapSpec]:
    """The spec of each trial: zero the source slot, set the target slot to α × typical."""
    return [SwapSpec({t.target: alpha}, (t.source,)) for t in trials]


def concept_means(tokens: torch.Tensor, offsets: torch.Tensor, labels: Sequence[str]) -> dict[str, torch.Tensor]:
    """Mean hook activation over every counted token of each concept's texts (text i owns
    ``tokens[offsets[i]:offsets[i+1]]``); float32 vectors keyed by concept."""
    if len(offsets) != len(labels) + 1:
        raise SaealignError(f"{len(offsets) - 1} texts of activations for {len(labels)} labels")
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for i, label in enumerate(labels):
        part = tokens[int(offsets[i]) : int(offsets[i + 1])].float()
        if len(part):
            sums[label] = sums.get(label, torch.zeros(tokens.shape[-1])) + part.sum(0)
            counts[label] = counts.get(label, 0) + len(part)
    return {c: sums[c] / counts[c] for c in sums}


def make_diffmean_editor(
    means: Mapping[str, torch.Tensor], trials: Sequence[SwapTrial], alpha: float
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The no-SAE control of a concept swap: add α × (mean of the target − mean of the source) to
    the hook activation of every counted token of trial ``rows[i]`` (a DiffMean steering vector;
    α = 1 moves the source concept's mean onto the target's)."""
    missing = sorted({c for t in trials for c in (t.source, t.target) if c not in means})
    if missing:
        raise SaealignError(f"no mean activation for concept(s) {', '.join(missing)}; fix: give them training texts")
    deltas = torch.stack([alpha * (means[t.target] - means[t.source]) for t in trials])

    def apply(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return x + deltas.to(x.device, x.dtype)[rows]

    return apply


def parse_concept_settings(items: Sequence[str]) -> dict[str, float]:
    """``["topic:sports=2", "sentiment:positive=0.5"]`` -> {concept: α} (for ``--concept-set``)."""
    out: dict[str, float] = {}
    for item in items:
        name, _, value = item.rpartition("=")
        try:
            alpha = float(value)
        except ValueError:
            name = ""
        if not name.strip():
            raise SaealignError(f"bad concept setting '{item}'; fix: write CONCEPT=ALPHA, e.g. topic:sports=2")
        out[name.strip()] = alpha
    return out
