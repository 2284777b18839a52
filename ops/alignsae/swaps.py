"""Concept swaps (docs/algorithms.md §6): edit concept slots at the hook, let the LM continue, judge the result.

For a text of concept A: zero slot A, set slot B to α × B's typical activation (its mean on B's
training texts), decode, and write the result back at the hook. The edit is a ``set`` spec of
the one intervention engine (:mod:`ops.steering.engine`), so it follows the engine's rules: every
steered position (prompt and generated tokens, KV-cached steps included; never the first
position, special tokens or padding), any mix of specs per batch row. ``keep_error`` (default
True) adds back the SAE error ``x − x̂``, so only the edited slots change the residual stream;
without it the plain reconstruction alone costs far more perplexity than the 30 % bound allows.
The no-SAE control (DiffMean) is a steering vector spec of the same engine.

Where: every steered position by default; ``positions='last_prompt'`` edits only the last prompt
token in the prefill (the engine's option), as the paper's bio-QA swaps add h' − h there.

Judging is pluggable (a :class:`SwapJudge` names the concept a continuation shows):
:class:`CentroidClassifier`, for open-ended concepts: the *continuation alone* (the prompt is A's
text and would bias the judgement) is embedded with MiniLM and classified by the nearest centroid
among the concepts of B's family (centroids of their training texts); :class:`AnswerJudge`, for
questions with known answers (bio-QA): the answer before EOS is matched exactly against each
concept's expected answer for the same prompt (the person's value of each relation). A swap
succeeds when the judge names B. Perplexity of
the continuation is measured under the unsteered model, and an α qualifies when the geometric
mean over its continuations is at most (1 + bound) × that of the unsteered continuations of the
same prompts (``ops.alignsae.metrics.best_alpha``: one sample's perplexity is too noisy to judge).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from ops.errors import SaealignError
from ops.models.lm import LanguageModel
from ops.steering.engine import Positions, SAEView, SteeringSpec
from ops.steering.generation import DecodeRequest, SamplingParams, continuation_perplexities, run_requests

log = logging.getLogger(__name__)


class ConceptSAE(Protocol):
    """An SAE with one named slot per concept: :class:`ops.alignsae.training.AlignedSAE` or
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

    def steering_view(self) -> SAEView:
        return SAEView.of(self.sae)


def check_concepts(csae: ConceptSAE, concepts: Sequence[str]) -> None:
    """Raise on a concept the SAE has no slot for."""
    known = csae.concept_slots
    unknown = [c for c in concepts if c not in known]
    if unknown:
        raise SaealignError(f"unknown concept(s) in swap: {', '.join(unknown)}; fix: use one of {', '.join(known)}")


def slot_spec(
    csae: ConceptSAE,
    set_concepts: Mapping[str, float],
    zero_concepts: Sequence[str] = (),
    keep_error: bool = True,
    positions: Positions = "all",
) -> SteeringSpec:
    """The engine's spec of a slot edit: each concept of ``zero_concepts`` set to 0, each of
    ``set_concepts`` to α × its typical activation (α the mapped value), written at ``positions``."""
    check_concepts(csae, [*set_concepts, *zero_concepts])
    slots = csae.concept_slots
    latents = {slots[c]: 0.0 for c in zero_concepts}
    latents.update({slots[c]: alpha * csae.typical_activation(c) for c, alpha in set_concepts.items()})
    return SteeringSpec("set", latents=latents, keep_error=keep_error, positions=positions)


# ---------------------------------------------------------------------------------------------
# Generation and perplexity


def generate_ids(
    model: LanguageModel,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    seed: int | None = 0,
    top_k: int = 5,
    hook: str | None = None,
    sae: Any | None = None,
    specs: Sequence[SteeringSpec] | None = None,
) -> list[list[int]]:
    """Continue each prompt in the project's running batch (``ops.steering.generation.run_requests``:
    KV cache, one sampling generator per row), steered by ``specs`` (one per prompt) at ``hook``
    through the one intervention engine. ``seed`` None or ``top_k`` 1 = greedy; else top-k
    sampling with every row seeded by ``seed``. Returns the new token ids per prompt, up to and
    including the first EOS."""
    if specs is not None and len(specs) != len(prompt_ids):
        raise SaealignError(f"{len(specs)} specs for {len(prompt_ids)} prompts; fix: one per prompt")
    greedy = seed is None or top_k == 1
    params = SamplingParams(max_new_tokens=max_new_tokens, greedy=greedy, top_k=top_k, seed=seed or 0)
    steered = specs is not None and bool(hook)
    requests = [
        DecodeRequest("", list(ids), specs[i] if specs is not None and steered else SteeringSpec(), params, seed or 0)
        for i, ids in enumerate(prompt_ids)
    ]
    results = run_requests(model, sae, hook if steered else None, requests, max(len(requests), 1))
    return [r.token_ids for r in results]


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
        from ops.models.embedders import EMBEDDED_EMBEDDER, embed

        name = embedder or EMBEDDED_EMBEDDER
        cents = []
        for texts in texts_by_concept.values():
            mean = embed(list(texts), name).mean(0)
            cents.append(mean / max(float(np.linalg.norm(mean)), 1e-8))
        return cls(list(texts_by_concept), np.stack(cents), name)

    def predict(self, texts: Sequence[str], candidates: Sequence[Sequence[str]]) -> list[str]:
        """For each text, the nearest of its candidate concepts ('' for an empty text)."""
        from ops.models.embedders import embed

        sims = embed(list(texts), self.embedder) @ self.centroids.T if texts else np.zeros((0, 0))
        index = {c: j for j, c in enumerate(self.concepts)}
        out = []
        for i, (text, cands) in enumerate(zip(texts, candidates, strict=True)):
            cols = [index[c] for c in cands]
            out.append(cands[int(np.argmax(sims[i, cols]))] if text.strip() and cols else "")
        return out

    def judge(self, texts: Sequence[str], trials: Sequence[SwapTrial]) -> list[str]:
        """The :class:`SwapJudge` view: each continuation's nearest concept of its trial's candidates."""
        return self.predict(texts, [t.candidates for t in trials])


class SwapJudge(Protocol):
    """Names, for each trial's continuation, the concept it shows ('' for none)."""

    def judge(self, texts: Sequence[str], trials: Sequence[SwapTrial]) -> list[str]: ...


def answer_of(text: str) -> str:
    """The answer in a continuation: its first line, spaces normalised."""
    return " ".join(text.strip().split("\n", 1)[0].split())


@dataclass(frozen=True)
class AnswerJudge:
    """Exact match of the continuation's answer (:func:`answer_of`) with each candidate concept's
    expected answer for the trial (``SwapTrial.answers``); '' when it matches none."""

    def judge(self, texts: Sequence[str], trials: Sequence[SwapTrial]) -> list[str]:
        out = []
        for text, trial in zip(texts, trials, strict=True):
            if trial.answers is None:
                raise SaealignError(
                    "the answer judge needs expected answers per prompt; fix: give the ontology "
                    "an 'answers' column (concept -> answer)"
                )
            said = answer_of(text)
            hits = [c for c in trial.candidates if trial.answers.get(c) == said]
            out.append(trial.target if trial.target in hits else (hits[0] if hits else ""))
        return out


# ---------------------------------------------------------------------------------------------
# Swap success vs α (the AlignSAE table)


@dataclass(frozen=True)
class SwapTrial:
    """Steer ``prompt`` (a text of concept ``source``) towards ``target``; ``candidates`` are the
    concepts the continuation is classified among (the target's family); ``answers`` (optional)
    the expected answer per concept for this prompt (the exact-match judge)."""

    prompt: str
    source: str
    target: str
    candidates: tuple[str, ...]
    answers: Mapping[str, str] | None = field(default=None, compare=False)


def plan_swaps(
    texts: Sequence[str],
    labels: Sequence[str],
    families: Mapping[str, str],
    per_family: int,
    seed: int = 0,
    max_prompt_chars: int = 400,
    answers: Sequence[Mapping[str, str]] | None = None,
    all_targets: bool = False,
) -> list[SwapTrial]:
    """Up to ``per_family`` prompts per family with at least two concepts, drawn round-robin over
    the family's concepts; each gets a seeded random target among the family's others, or, with
    ``all_targets``, one trial per other concept (every ordered pair). ``answers``: per text,
    the expected answer per concept (carried into the trials)."""
    if all_targets:
        return _all_pair_swaps(texts, labels, families, per_family, seed, max_prompt_chars, answers)
    rng = np.random.default_rng(seed)
    trials: list[SwapTrial] = []
    for members in _swappable_families(families):
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


def _swappable_families(families: Mapping[str, str]) -> list[list[str]]:
    """The concepts of each family that has at least two (concept -> family order kept)."""
    by_family: dict[str, list[str]] = {}
    for concept, fam in families.items():
        by_family.setdefault(fam, []).append(concept)
    return [members for members in by_family.values() if len(members) >= 2]


def _all_pair_swaps(
    texts: Sequence[str],
    labels: Sequence[str],
    families: Mapping[str, str],
    per_family: int,
    seed: int,
    max_prompt_chars: int,
    answers: Sequence[Mapping[str, str]] | None,
) -> list[SwapTrial]:
    rng = np.random.default_rng(seed)
    trials: list[SwapTrial] = []
    for members in _swappable_families(families):
        pools = {c: [i for i, lab in enumerate(labels) if lab == c] for c in members}
        for c in members:
            rng.shuffle(pools[c])
        for i in range(per_family):
            source = members[i % len(members)]
            if i // len(members) >= len(pools[source]):
                continue
            row = pools[source][i // len(members)]
            ans = None if answers is None else answers[row]
            trials += [
                SwapTrial(texts[row][:max_prompt_chars], source, target, tuple(members), ans)
                for target in members
                if target != source
            ]
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
    classifier: SwapJudge,
    max_new_tokens: int,
    seed: int | None,
    hook: str | None = None,
    sae: Any | None = None,
    specs: Sequence[SteeringSpec] | None = None,
    batch_size: int = 32,
) -> SwapOutcome:
    """Generate for every trial (steered by ``specs``, one per trial, when given), judge (``seed``
    None: greedy), measure perplexity."""
    if specs is not None and len(specs) != len(trials):
        raise SaealignError(f"{len(specs)} steering specs for {len(trials)} trials; fix: one per trial")
    prompts = model.tokenize([t.prompt for t in trials])
    new: list[list[int]] = []
    for start in range(0, len(trials), batch_size):
        stop = min(start + batch_size, len(trials))
        sub = None if specs is None else specs[start:stop]
        new += generate_ids(model, prompts[start:stop], max_new_tokens, seed, 5, hook, sae, sub)
    texts = [str(model.tokenizer.decode(ids, skip_special_tokens=True)) for ids in new]
    predicted = classifier.judge(texts, trials)
    return SwapOutcome(texts, predicted, continuation_perplexities(model, prompts, new))


def swap_specs(
    csae: ConceptSAE, trials: Sequence[SwapTrial], alpha: float, keep_error: bool = True, positions: Positions = "all"
) -> list[SteeringSpec]:
    """The spec of each trial: zero the source slot, set the target slot to α × typical."""
    return [slot_spec(csae, {t.target: alpha}, (t.source,), keep_error, positions) for t in trials]


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


def diffmean_specs(
    means: Mapping[str, torch.Tensor], trials: Sequence[SwapTrial], alpha: float, positions: Positions = "all"
) -> list[SteeringSpec]:
    """The no-SAE control of a concept swap: per trial, a steering vector α × (mean of the target
    − mean of the source) added at every steered position (DiffMean; α = 1 moves the source
    concept's mean onto the target's)."""
    missing = sorted({c for t in trials for c in (t.source, t.target) if c not in means})
    if missing:
        raise SaealignError(f"no mean activation for concept(s) {', '.join(missing)}; fix: give them training texts")
    return [
        SteeringSpec("orig", vector=alpha * (means[t.target] - means[t.source]), positions=positions) for t in trials
    ]
