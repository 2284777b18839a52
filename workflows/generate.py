"""``saealign generate``: steered generation from the command line.

Scores come from the lake (``saealign score`` wrote them; the topic must have been scored with
the SAE in use) or from a ``.npy`` file. All (prompt, method) rows run through one batched
generation with per-row steering specs (:func:`ops.steering.generation.generate`). ``--compare`` adds
``orig`` and prints a table of mean contamination, latents changed and time per token per method.

Example::

    saealign generate --prompt "My heart is broken, so I should" --topic medical --compare \\
        --method sae clamp swap
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ops.errors import SaealignError, SAEMismatchError
from ops.models.lm import EMBEDDED_MODEL, load_model, resolve_device
from ops.saes.registry import load_sae, sae_id
from ops.steering.engine import METHODS, SCORED_METHODS, SteeringOptions, SteeringSpec, check_scores_sae
from ops.steering.generation import GenerationResult, SamplingParams, check_prompts, generate
from workflows._config import parse_config

log = logging.getLogger(__name__)

CLI_METHODS = (*[m for m in METHODS if m != "set"], "diffmean")
"""What ``--method`` takes: the engine's methods but ``set`` (it needs latent values), and DiffMean."""


@dataclass(frozen=True)
class GenerateConfig:
    """Continue prompts with steered generation (orig, sae, clamp, swap, weight, diffmean) and report contamination."""

    prompt: tuple[str, ...] = ()
    """Prompt text(s) to continue (several: --prompt "A" "B")."""
    prompts_file: str | None = None
    """More prompts: a .txt file (one per line) or a text source (.jsonl/.csv/.parquet, embedded:demo-prompts)."""
    topic: str | None = None
    """Topic whose scores steer (scored in the lake with `saealign score`)."""
    method: tuple[str, ...] = ("swap",)
    """Steering method(s): orig, sae, clamp, swap, weight, diffmean (the topic's DiffMean vector, no SAE)."""
    compare: bool = False
    """Also run orig and print the methods side by side with mean contamination."""
    lake: str = "out/lake"
    """Lake root holding the topic scores."""
    dataset: str | None = None
    """Lake dataset the topic was scored on (needed only when it was scored on several)."""
    scores_file: str | None = None
    """Scores from a .npy file [d_sae] (NaN = unscored) instead of the lake."""
    model: str = EMBEDDED_MODEL
    """Language model (registry name or TransformerLens name)."""
    sae: str = "default"
    """SAE: 'default', a sae-lens directory, or saelens:<release>/<sae_id>."""
    hook: str | None = None
    """Hook to steer at (default: the SAE's own hook)."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    """How tokens are drawn (options --max-new-tokens … --stop-at-eos, declared in ops.steering.generation)."""
    steering: SteeringOptions = field(default_factory=SteeringOptions)
    """The methods' shared options (--clamp-k … --include-first, declared in ops.steering.engine)."""
    diffmean_scale: float = 4.0
    """DiffMean: scale of the vector (mean align-text activation - mean reference activation)."""
    batch_size: int = 8
    """Rows per generation batch (left padding, per-row specs)."""
    json_out: str | None = None
    """Write every result (tokens, per-token contamination, timings) to this JSON file."""
    device: str = "auto"
    """'auto' (cuda when available), 'cpu' or 'cuda'."""

    def __post_init__(self) -> None:
        unknown = [m for m in self.method if m not in CLI_METHODS]
        if unknown or not self.method:
            fix = ", ".join(CLI_METHODS)
            raise SaealignError(f"unknown --method {unknown or '(none)'}; fix: use one or more of {fix}")
        scored = [m for m in self.method if m in SCORED_METHODS]
        if scored and not (self.topic or self.scores_file):
            raise SaealignError(f"--method {scored[0]} needs topic scores; fix: pass --topic NAME (or --scores-file)")
        if "diffmean" in self.method and not self.topic:
            raise SaealignError("--method diffmean needs the topic's align texts; fix: pass --topic NAME")
        if self.topic and self.scores_file:
            raise SaealignError("pass either --topic or --scores-file, not both")
        if self.batch_size < 1:
            raise SaealignError(f"--batch-size must be at least 1, got {self.batch_size}")

    def methods(self) -> list[str]:
        chosen = list(dict.fromkeys(self.method))
        return ["orig", *[m for m in chosen if m != "orig"]] if self.compare else chosen

    def spec(self, method: str, scores: np.ndarray | None, diffmean: torch.Tensor | None = None) -> SteeringSpec:
        """The engine's spec of ``method``; diffmean is plain activation addition of the scaled vector."""
        if method == "diffmean":
            assert diffmean is not None
            return SteeringSpec(
                vector=self.diffmean_scale * diffmean, include_first=self.steering.include_first, topic=self.topic
            )
        scores_t = None if scores is None else torch.from_numpy(scores)
        return SteeringSpec.for_method(method, scores_t, self.steering, self.topic)


def read_prompts(cfg: GenerateConfig) -> list[str]:
    prompts = list(cfg.prompt)
    if cfg.prompts_file:
        path = Path(cfg.prompts_file)
        if path.suffix == ".txt":
            if not path.is_file():
                raise SaealignError(f"no prompts file at '{path}'; fix: pass an existing file")
            prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
        else:
            from ops.texts import read_texts

            prompts += read_texts(cfg.prompts_file).texts
    check_prompts(prompts)
    return prompts


def load_scores(cfg: GenerateConfig, hook: str | None) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Topic scores and their metadata; rejects scores made with another model, SAE or hook."""
    if cfg.scores_file:
        path = Path(cfg.scores_file)
        if not path.is_file():
            raise SaealignError(f"no scores file at '{path}'; fix: pass a .npy file of d_sae scores")
        return np.load(path).astype(np.float32), {"source": str(path)}
    if not cfg.topic:
        return None, {}
    from ops.scoring.scores import topic_scores

    scores, meta = topic_scores(cfg.lake, cfg.topic, cfg.dataset)
    check_scores_sae(meta.get("sae"), sae_id(cfg.sae))
    if meta.get("model") not in (None, cfg.model):
        raise SAEMismatchError(
            f"topic '{cfg.topic}' was scored with model '{meta['model']}', not '{cfg.model}'; fix: pass --model"
        )
    if hook and meta.get("hook") not in (None, hook):
        raise SAEMismatchError(f"topic '{cfg.topic}' was scored at hook '{meta['hook']}', not '{hook}'")
    return scores, meta


def build(cfg: GenerateConfig) -> dict[str, Any]:
    """Run the job; returns {"methods", "results": [GenerationResult...], "scores_meta"}."""
    prompts = read_prompts(cfg)
    scores, meta = load_scores(cfg, cfg.hook)
    methods = cfg.methods()
    device = resolve_device(cfg.device)
    model = load_model(cfg.model, device=device)
    hook = cfg.hook or meta.get("hook")
    diffmean = _diffmean(cfg, model, hook) if "diffmean" in methods else None
    specs = {m: cfg.spec(m, scores, diffmean) for m in methods}
    sae = load_sae(cfg.sae, device=device) if any(s.needs_sae for s in specs.values()) else None
    rows = [(p, m) for p in prompts for m in methods]
    results = generate(
        model,
        sae,
        [p for p, _ in rows],
        [specs[m] for _, m in rows],
        hook_name=hook,
        params=cfg.sampling,
        batch_size=cfg.batch_size,
    )
    results = [replace(r, method=m) for r, (_, m) in zip(results, rows, strict=True)]  # diffmean runs as orig + vector
    if cfg.json_out:
        out = Path(cfg.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"config": _jsonable(cfg), "scores": meta, "results": [r.to_dict() for r in results]}
        out.write_text(json.dumps(payload, indent=2, default=str))
    return {"methods": methods, "results": results, "scores_meta": meta}


def _diffmean(cfg: GenerateConfig, model: Any, hook: str | None) -> torch.Tensor:
    """The topic's DiffMean vector at ``hook`` (its align texts and the lake's reference prompts)."""
    from ops.evals.methods import diffmean_vector, reference_moments
    from ops.lake.contract import Lake
    from ops.scoring.scores import dataset_key, resolve_dataset, topic_align_texts

    assert cfg.topic is not None
    lake = Lake(cfg.lake)
    key = dataset_key(lake, resolve_dataset(lake, cfg.dataset))
    hook = hook or key.hook
    align = topic_align_texts(cfg.lake, cfg.topic, cfg.dataset)
    return diffmean_vector(model, hook, align, reference_moments(model, hook, lake, key)[0])


def _jsonable(cfg: GenerateConfig) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(cfg)


def _fmt(value: float, spec: str = ".3f") -> str:
    return "n/a" if math.isnan(value) else format(value, spec)


def render(methods: list[str], results: list[GenerationResult], compare: bool) -> str:
    """Continuations grouped by prompt, then (with --compare) a per-method summary table."""
    lines: list[str] = []
    by_prompt: dict[str, list[GenerationResult]] = defaultdict(list)
    for r in results:
        by_prompt[r.prompt].append(r)
    width = max(len(m) for m in methods)
    for prompt, rows in by_prompt.items():
        lines.append(f"\n=== {prompt}")
        for r in rows:
            note = "" if math.isnan(r.mean_contamination) else f"  (contamination {_fmt(r.mean_contamination)})"
            lines.append(f"[{r.method.ljust(width)}] {r.text.strip()}{note}")
    if compare:
        lines += ["", f"{'method'.ljust(width)}  contamination  latents changed  s/token"]
        for m in methods:
            rows = [r for r in results if r.method == m]
            cont = _mean([r.mean_contamination for r in rows])
            changed = _mean([r.mean_latents_changed for r in rows])
            spt = _mean([r.timings["s_per_token"] for r in rows])
            lines.append(f"{m.ljust(width)}  {_fmt(cont).rjust(13)}  {_fmt(changed, '.1f').rjust(15)}  {spt:7.3f}")
        lines.append("(s/token is per batch step: rows of one batch share it)")
    return "\n".join(lines)


def _mean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(GenerateConfig, argv, "saealign generate")
    out = build(cfg)
    print(render(out["methods"], out["results"], cfg.compare or len(out["methods"]) > 1))
    if cfg.json_out:
        print(f"\nresults written to {cfg.json_out}")
    return 0
