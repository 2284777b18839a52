"""The architecture matrix (paper A's constraint C1: any SAE, any LM), end to end, offline.

Every steerable sae-lens SAE kind (standard, JumpReLU, TopK, BatchTopK as saved for inference,
gated) on every model family with a TransformerLens twin (Llama, GPT-2, Gemma-2), each a tiny
random model saved as a local Hugging Face directory with the embedded SmolLM2 tokenizer:
build-lake (32 prompts) → score a topic → generate with orig, sae, clamp, swap, weight and
keep_error → one request through the service's replica engine (:class:`Engine`, no HTTP). The
two hooks alternate so that every family and every SAE kind meets both.

The 15 lakes are built by build-lake's own ``build`` with its two Ray Data stages run in this
process (:func:`_in_process`), because an actor pool costs ~25 s per job on 2 cores; one
combination runs on the real local Ray pipeline and must write the same rows. What steering
cannot serve (a transcoder, attention-internal hooks) fails before any work, with the fix.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pytest
import torch

from ops.errors import SAEMismatchError
from ops.lake.contract import DatasetKey
from ops.models.lm import load_model
from ops.steering.engine import SteeringOptions, hf_hook_modules, hook_activations
from ops.steering.generation import GenerationResult, SamplingParams
from tests.conftest import LM_FAMILIES, SAE_KINDS, save_sae, save_tiny_lm
from workflows import build_lake
from workflows.build_lake import BuildLakeConfig

pytestmark = pytest.mark.integration

D_MODEL, D_SAE = 64, 256
HOOKS = ("blocks.1.hook_resid_pre", "blocks.1.hook_resid_post")
COMBOS = [(f, k, HOOKS[(i + j) % 2]) for i, f in enumerate(LM_FAMILIES) for j, k in enumerate(SAE_KINDS)]
METHODS = ("orig", "sae", "clamp", "swap", "weight")
PROMPTS = ("My heart is broken, so I should", "The best way to cook rice is")
SENTENCES = ["The patient was admitted to the hospital with chest pain today.", "Shoes and boots, on sale."]
GREEDY = SamplingParams(max_new_tokens=4, greedy=True, stop_at_eos=False)


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("matrix_lms")
    return {family: save_tiny_lm(family, base / family) for family in LM_FAMILIES}


def _in_process(cfg: BuildLakeConfig, key: DatasetKey, rows: list[dict[str, Any]], n_prompts: int) -> dict[str, float]:
    """build-lake's two stages, one shard at a time in this process, through the same actor
    classes the Ray Data pipeline maps (a row of a ``batch_size=1`` batch is a one-item list)."""
    latents, embeddings = build_lake.ShardLatents(cfg, key), build_lake.ShardEmbeddings(cfg, key)
    for row in rows:
        embeddings(latents({name: [value] for name, value in row.items()}))
    return {"first_shard_s": 0.0, "pipeline_s": 0.0}


def _lake_cfg(lake: Path, model: Path, sae: Path) -> BuildLakeConfig:
    return BuildLakeConfig(
        lake=str(lake),
        model=str(model),
        sae=str(sae),
        pool=("embedded:pool#:32",),
        shard_size=16,
        context=48,
        workers=1,
    )


def _rows(lake: Path) -> list[tuple[Any, ...]]:
    glob = f"{lake}/activations/**/*.parquet"
    return duckdb.sql(f"SELECT prompt_id, latent, round(value, 4) FROM read_parquet('{glob}') ORDER BY ALL").fetchall()


# ---------------------------------------------------------------------------------------------
# The two views of each family


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_hf_and_transformer_lens_views_agree(lm_dirs: dict[str, Path], family: str) -> None:
    """Logits, and the activation at every steerable hook: the lake reads it from
    TransformerLens, steering edits it on the Hugging Face decoder layer."""
    model = load_model(str(lm_dirs[family]))
    ids = model.tokenize(SENTENCES)
    width = max(map(len, ids))
    tokens = torch.tensor([row + [0] * (width - len(row)) for row in ids])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
    with torch.no_grad():
        hf_logits, tl_logits = model.hf(tokens, attention_mask=mask).logits, model.tl(tokens, attention_mask=mask)
    real = mask.bool()
    assert (hf_logits - tl_logits)[real].abs().max().item() <= 1e-4, family
    for hook in ("blocks.0.hook_resid_post", *HOOKS):
        tl_x = hook_activations(model.tl, tokens, mask, hook)
        assert (_hf_hook_output(model.hf, hook, tokens, mask) - tl_x)[real].abs().max().item() <= 1e-4, (family, hook)


def _hf_hook_output(hf: Any, hook: str, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The output of the decoder layer the steering hook edits for ``hook``."""
    seen: dict[str, torch.Tensor] = {}

    def grab(_module: Any, _args: Any, out: Any) -> None:
        seen["x"] = out[0] if isinstance(out, tuple) else out

    handle = hf_hook_modules(hf, hook)[1].register_forward_hook(grab)
    try:
        with torch.no_grad():
            hf(tokens, attention_mask=mask)
    finally:
        handle.remove()
    return seen["x"]


# ---------------------------------------------------------------------------------------------
# The whole path per combination


def _generate(lake: Path, model: Path, sae: Path, methods: tuple[str, ...], **steering: Any) -> list[GenerationResult]:
    from workflows.generate import GenerateConfig, build

    cfg = GenerateConfig(
        prompt=PROMPTS,
        topic="medical",
        method=methods,
        lake=str(lake),
        model=str(model),
        sae=str(sae),
        sampling=GREEDY,
        steering=SteeringOptions(**steering),
        device="cpu",
    )
    return list(build(cfg)["results"])


def _served(lake: Path) -> dict[str, Any]:
    """One /generate request as a replica runs it: the request body → rows → batch → result."""
    from workflows.serve_api import GenerateRequest
    from workflows.serve_engine import Engine, ServeConfig, result_dict

    engine = Engine(ServeConfig(lake=str(lake), device="cpu", warmup=False))
    req = GenerateRequest(
        prompt=PROMPTS[0], topic="medical", method="swap", max_new_tokens=4, greedy=True, ignore_eos=True
    )
    rows = engine.rows(req, [req.method])
    [res] = engine.run_rows(rows)
    assert isinstance(res, GenerationResult), res
    return result_dict(res, rows[0], 0.0)


@pytest.mark.parametrize(("family", "kind", "hook"), COMBOS)
def test_build_score_generate_serve(
    tmp_path: Path,
    lm_dirs: dict[str, Path],
    local_ray: None,
    monkeypatch: pytest.MonkeyPatch,
    family: str,
    kind: str,
    hook: str,
) -> None:
    from workflows.score import ScoreConfig
    from workflows.score import build as score

    monkeypatch.setattr(build_lake, "_run_pipeline", _in_process)
    sae, lake = save_sae(kind, tmp_path / "sae", D_MODEL, D_SAE, hook), tmp_path / "lake"
    manifest = build_lake.build(_lake_cfg(lake, lm_dirs[family], sae))
    assert manifest["rows"]["prompts"] == manifest["rows"]["embeddings"] == 32
    assert manifest["rows"]["activations"] > 0 and manifest["key"]["hook"] == hook

    topic = score(
        ScoreConfig(lake=str(lake), topic="medical", align_file=("embedded:topic:medical#:12",), min_support=2)
    )
    assert topic["n_scored"] > 0

    generated = _generate(lake, lm_dirs[family], sae, METHODS, clamp_mode="add")
    out = {(r.method, PROMPTS.index(r.prompt)): r for r in generated}
    for (method, _), res in out.items():
        assert len(res.token_ids) == GREEDY.max_new_tokens, (method, res.token_ids)
        measured = np.array(res.contamination, dtype=float)
        assert np.all((measured >= 0) & (measured <= 1)), method  # every token measured (scores given)
    changed = {m: [c for i in (0, 1) for c in out[m, i].latents_changed] for m in METHODS}
    assert set(changed["sae"]) == {0} and set(changed["clamp"]) == {SteeringOptions().clamp_k}
    assert max(changed["swap"]) > 0  # the topic re-selects latents

    kept = _generate(lake, lm_dirs[family], sae, ("sae",), keep_error=True)  # sae + error = the model
    assert [r.token_ids for r in kept] == [out["orig", 0].token_ids, out["orig", 1].token_ids]

    served = _served(lake)
    assert served["token_ids"] == out["swap", 0].token_ids and served["topic"] == "medical"
    assert all(c is not None and 0 <= c <= 1 for c in served["contamination"])


def test_a_local_model_directory_builds_on_the_ray_pipeline_as_in_process(
    tmp_path: Path, lm_dirs: dict[str, Path], local_ray: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray actors load the model by its directory: the real pipeline writes the rows of the
    in-process stand-in the matrix uses."""
    sae = save_sae("gated", tmp_path / "sae", D_MODEL, D_SAE, HOOKS[0])
    on_ray = build_lake.build(_lake_cfg(tmp_path / "ray", lm_dirs["gemma2"], sae))
    with monkeypatch.context() as m:
        m.setattr(build_lake, "_run_pipeline", _in_process)
        build_lake.build(_lake_cfg(tmp_path / "local", lm_dirs["gemma2"], sae))
    assert on_ray["rows"]["prompts"] == 32 and on_ray["timings"]["pipeline_s"] > 0
    assert _rows(tmp_path / "ray") == _rows(tmp_path / "local")


# ---------------------------------------------------------------------------------------------
# What steering cannot serve


@pytest.mark.parametrize(
    ("kind", "hook", "message"),
    [
        ("transcoder", "blocks.1.hook_resid_post", r"cannot use a 'transcoder' SAE.*fix: use a standard, jumprelu"),
        (
            "standard",
            "blocks.1.attn.hook_z",
            r"not 'blocks.1.attn.hook_z'; fix: use an SAE trained at blocks.1.hook_resid_post",
        ),
        ("standard", "blocks.0.hook_mlp_out", r"not 'blocks.0.hook_mlp_out'; fix: .*blocks.1.hook_resid_pre"),
        (
            "jumprelu",
            "blocks.0.hook_resid_pre",
            r"not 'blocks.0.hook_resid_pre'; fix: use an SAE at blocks.0.hook_resid_post",
        ),
    ],
)
def test_unsupported_combinations_fail_before_any_work_with_the_fix(
    tmp_path: Path, lm_dirs: dict[str, Path], capsys: pytest.CaptureFixture[str], kind: str, hook: str, message: str
) -> None:
    from workflows.cli import main

    sae = save_sae(kind, tmp_path / "sae", D_MODEL, D_SAE, hook)
    with pytest.raises(SAEMismatchError, match=message):
        build_lake.build(_lake_cfg(tmp_path / "lake", lm_dirs["gpt2"], sae))
    assert not (tmp_path / "lake").exists()
    argv = ["build-lake", "--lake", str(tmp_path / "lake"), "--model", str(lm_dirs["gpt2"]), "--sae", str(sae)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]) and "Traceback" not in err[0]


def test_generate_refuses_an_sae_at_an_mlp_hook(tmp_path: Path, lm_dirs: dict[str, Path]) -> None:
    """The same refusal on the generation path (scores from a file: no lake could be built)."""
    from workflows.generate import GenerateConfig, build

    sae = save_sae("topk", tmp_path / "sae", D_MODEL, D_SAE, "blocks.1.hook_mlp_out")
    np.save(tmp_path / "scores.npy", np.linspace(0, 1, D_SAE, dtype=np.float32))
    cfg = GenerateConfig(
        prompt=PROMPTS[:1],
        scores_file=str(tmp_path / "scores.npy"),
        model=str(lm_dirs["llama"]),
        sae=str(sae),
        sampling=GREEDY,
        device="cpu",
    )
    with pytest.raises(SAEMismatchError, match=r"not 'blocks.1.hook_mlp_out'; fix: use an SAE trained at"):
        build(cfg)
