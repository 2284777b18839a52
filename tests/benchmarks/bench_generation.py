"""Benchmark: the project's decode loop (steered or not) vs plain Hugging Face ``generate``, side by
side in one run (not a test).

    .venv/bin/python -m tests.benchmarks.bench_generation [--sae DIR] [--tokens 32] [--repeats 3]
        [--batches 1,8,40] [--threads 0] [--skip-tl]

At every batch size B the first B demo prompts (``embedded:demo-prompts``, cycled if B is larger)
run as one left-padded batch through: Hugging Face ``generate`` with no hook (the reference), and
``ops.steering.generation.generate`` with no hook, Swap, Clamp and a diff-of-means-style steering
vector (``orig`` + vector: no SAE work). Every row generates ``--tokens`` new tokens (top-k 5
sampling, seed 0, no stop at EOS). Time = wall time of the whole call (tokenize, prefill, decode);
tokens/s = B · tokens ÷ time. The cases run round-robin, ``--repeats`` times, so that load drift
hits every case alike; a case's ratio to HF is the median over repeats of (its tokens/s ÷ HF's
tokens/s at the same batch in the same repeat). TransformerLens rows (batch 1, one run, slow)
unless ``--skip-tl``. Process CPU time is recorded too: on a shared machine it is less disturbed
by other load than wall time.

Goals: unsteered ≥ 0.9× and Swap ≥ 0.8× HF tokens/s at batch 40; Swap at batch 1 within
1.25× HF's time per token; Swap tokens/s at batch 8 ≥ 4× batch 1.

The SAE defaults to the shipped one, else a random TopK SAE of the same shape (d_sae 4,608,
k 32): the cost of the hook does not depend on the trained weights. Scores are random, the
vector is a random direction of norm 4. Writes the table with the machine, date and command to
``docs/data/generation.json`` (``--out``), from which ``make docs`` renders ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ops.models.lm import LanguageModel, load_model
from ops.saes.registry import DEFAULT_SAE_DIR, load_sae
from ops.steering.engine import SteeringSpec, tl_steering_hook
from ops.steering.generation import SamplingParams, generate, left_pad
from ops.texts import read_texts
from tests.benchmarks.machine import DATA, write_result

PROMPTS = "embedded:demo-prompts"
HOOK = "blocks.6.hook_resid_post"
HF = "HF generate, no hook"
METHODS = ("no hook", "swap", "clamp", "vector")


def _sae(path: str | None, d_in: int) -> tuple[Any, str]:
    for candidate in [path, str(DEFAULT_SAE_DIR)]:
        if candidate and (Path(candidate) / "cfg.json").is_file():
            return load_sae(candidate), candidate
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    torch.manual_seed(0)
    cfg = TopKSAEConfig(d_in=d_in, d_sae=4608, k=32, metadata=SAEMetadata(hook_name=HOOK))
    sae = TopKSAE(cfg)
    with torch.no_grad():
        sae.W_enc.normal_(0, d_in**-0.5)
        sae.W_dec.copy_(sae.W_enc.T)
    return sae.eval(), "random TopK d_sae=4608 k=32"


def _specs(d_sae: int, d_model: int) -> dict[str, SteeringSpec | None]:
    """The steering cases: none, Swap and Clamp on random scores, and a fixed random vector."""
    scores = torch.rand(d_sae, generator=torch.Generator().manual_seed(0))
    vector = torch.randn(d_model, generator=torch.Generator().manual_seed(1))
    return {
        "no hook": None,
        "swap": SteeringSpec("swap", scores),
        "clamp": SteeringSpec("clamp", scores),
        "vector": SteeringSpec("orig", vector=4.0 * vector / vector.norm()),
    }


def _prompts(batch: int) -> list[str]:
    texts = read_texts(PROMPTS).texts
    return [texts[i % len(texts)] for i in range(batch)]


@dataclass
class Case:
    """One timed call: its label, batch size, and what it measured per repeat."""

    label: str
    batch: int
    fn: Callable[[], Any]
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def run(self) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        self.fn()
        self.wall.append(time.perf_counter() - t0)
        self.cpu.append(time.process_time() - c0)
        print(f"  {self.label}, batch {self.batch}: {self.wall[-1]:.2f}s", file=sys.stderr, flush=True)


def _hf_case(model: LanguageModel, prompts: list[str], tokens: int) -> Callable[[], Any]:
    """Plain ``hf.generate`` on the same left-padded batch the project's loop builds."""
    tok = model.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    batch = left_pad(model.tokenize(prompts, max_length=10**9), pad_id, model.device)
    kw: dict[str, Any] = {
        "max_new_tokens": tokens,
        "min_new_tokens": tokens,
        "do_sample": True,
        "top_k": 5,
        "pad_token_id": pad_id,
    }

    hf: Any = model.hf

    def run() -> Any:
        torch.manual_seed(0)
        return hf.generate(batch.input_ids, attention_mask=batch.attention_mask, **kw)

    return run


def _cases(model: LanguageModel, sae: Any, hook: str, batches: list[int], tokens: int) -> list[Case]:
    specs = _specs(int(sae.cfg.d_sae), model.d_model)
    params = SamplingParams(max_new_tokens=tokens, seed=0, stop_at_eos=False)
    cases = []
    for b in batches:
        prompts = _prompts(b)
        cases.append(Case(HF, b, _hf_case(model, prompts, tokens)))
        for name, spec in specs.items():
            run = partial_generate(model, sae, prompts, spec, hook, params)
            cases.append(Case(f"ops.steering.generation, {name}", b, run))
    return cases


def partial_generate(
    model: LanguageModel, sae: Any, prompts: list[str], spec: SteeringSpec | None, hook: str, params: SamplingParams
) -> Callable[[], Any]:
    """The project's ``generate`` on one batch of ``prompts`` with one spec for all rows."""
    return lambda: generate(model, sae, prompts, spec, hook_name=hook, params=params, batch_size=len(prompts))


def _tl_rows(model: LanguageModel, sae: Any, hook: str, tokens: int) -> list[Case]:
    """TransformerLens generate at batch 1, with no hook and with Swap (one run each)."""
    model.tl  # noqa: B018 - build the TransformerLens view outside the timed region
    ids = torch.tensor([model.tokenize(_prompts(1))[0]])
    swap = _specs(int(sae.cfg.d_sae), model.d_model)["swap"]
    assert swap is not None
    kw: dict[str, Any] = {
        "max_new_tokens": tokens,
        "top_k": 5,
        "do_sample": True,
        "stop_at_eos": False,
        "verbose": False,
    }

    def plain() -> Any:
        return model.tl.generate(ids, **kw)

    def steered() -> Any:
        fn, _ = tl_steering_hook(sae, swap)
        with model.tl.hooks(fwd_hooks=[(hook, fn)]):
            return model.tl.generate(ids, **kw)

    cases = [Case("TransformerLens generate, no hook", 1, plain), Case("TransformerLens generate, swap", 1, steered)]
    for case in cases:
        case.run()
    return cases


def _ratio_to_hf(case: Case, hf: Case) -> float:
    """Median over repeats of case tokens/s ÷ HF tokens/s at the same batch (same repeat)."""
    return statistics.median(h / c for h, c in zip(hf.wall, case.wall, strict=False))


def _rows(cases: list[Case], tokens: int) -> list[dict[str, Any]]:
    hf = {c.batch: c for c in cases if c.label == HF}
    rows = []
    for c in cases:
        sec = statistics.median(c.wall)
        ref = hf.get(c.batch, hf[min(hf)])
        rows.append(
            {
                "path": c.label,
                "batch": c.batch,
                "seconds": sec,
                "cpu_seconds": statistics.median(c.cpu),
                "s_per_token": sec / tokens,
                "tokens_per_s": c.batch * tokens / sec,
                "vs_hf_plain": _ratio_to_hf(c, ref) if len(c.wall) == len(ref.wall) else ref.wall[0] / sec,
                "median_of": len(c.wall),
            }
        )
    return rows


def _goal(what: str, value: float, goal: str, met: bool) -> dict[str, Any]:
    return {"what": what, "value": value, "goal": goal, "met": met}


def _ratios(rows: list[dict[str, Any]], batches: list[int]) -> list[dict[str, Any]]:
    """The issue's goals, from the rows (tokens/s ratios to HF at the same batch)."""
    by = {(r["path"], r["batch"]): r for r in rows}
    out = []
    big = max(batches)
    for name, goal in (("no hook", 0.9), ("swap", 0.8)):
        v = by[(f"ops.steering.generation, {name}", big)]["vs_hf_plain"]
        out.append(_goal(f"{name} tokens/s ÷ HF generate tokens/s, batch {big}", v, f"≥ {goal}", v >= goal))
    if 1 in batches:
        v = 1 / by[("ops.steering.generation, swap", 1)]["vs_hf_plain"]
        out.append(_goal("Swap s/token ÷ HF generate s/token, batch 1", v, "≤ 1.25", v <= 1.25))
        if 8 in batches:
            swap = "ops.steering.generation, swap"
            v = by[(swap, 8)]["tokens_per_s"] / by[(swap, 1)]["tokens_per_s"]
            out.append(_goal("Swap tokens/s, batch 8 ÷ batch 1", v, "≥ 4", v >= 4))
    return out


def _print(rows: list[dict[str, Any]], ratios: list[dict[str, Any]]) -> None:
    print(f"\n{'path':<42} {'batch':>5} {'s/call':>8} {'cpu s':>8} {'tokens/s':>9} {'× HF':>6}")
    for r in rows:
        print(
            f"{r['path']:<42} {r['batch']:>5} {r['seconds']:>8.2f} {r['cpu_seconds']:>8.2f} "
            f"{r['tokens_per_s']:>9.1f} {r['vs_hf_plain']:>6.2f}"
        )
    for g in ratios:
        print(f"{g['what']}: {g['value']:.3f}  (goal {g['goal']}: {'met' if g['met'] else 'NOT met'})")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sae", default=None, help="sae-lens directory (default: the shipped SAE, else random)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", default="1,8,40", help="comma-separated batch sizes")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--skip-tl", action="store_true", help="skip the slow TransformerLens rows")
    ap.add_argument("--out", default=str(DATA / "generation.json"), help="where the numbers go (JSON)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    batches = sorted({int(b) for b in args.batches.split(",")})

    model = load_model()
    sae, sae_name = _sae(args.sae, model.d_model)
    hook = getattr(sae.cfg.metadata, "hook_name", None) or HOOK
    cases = _cases(model, sae, hook, batches, args.tokens)
    for case in cases:  # warm-up: kernels, caches (not recorded)
        case.fn()
    for _ in range(args.repeats):  # round-robin, so that load drift hits every case alike
        for case in cases:
            case.run()
    if not args.skip_tl:
        cases += _tl_rows(model, sae, hook, args.tokens)
    rows = _rows(cases, args.tokens)
    ratios = _ratios(rows, batches)
    print(f"\nSAE: {sae_name}; hook {hook}; {args.tokens} new tokens; threads {torch.get_num_threads()}")
    _print(rows, ratios)
    write_result(
        args.out,
        "tests.benchmarks.bench_generation",
        {
            "bench": {"seconds": time.perf_counter() - t_start},
            "config": {
                "sae": sae_name,
                "hook": hook,
                "prompt": f"{PROMPTS}, the first B (left-padded batch of B)",
                "tokens": args.tokens,
                "repeats": args.repeats,
                "batches": batches,
                "threads": torch.get_num_threads(),
                "sampling": "top-k 5, seed 0, no stop at EOS",
                "vs_hf_plain": "median over repeats of tokens/s ÷ HF generate's tokens/s at the same batch",
            },
            "rows": rows,
            "ratios": ratios,
        },
        argv,
    )


if __name__ == "__main__":
    main()
