"""Topic scoring (spec §2): the DuckDB query on hand-made lakes, storage, loaders, the top-k check."""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ops.scoring.scores as scoring
from ops.errors import SaealignError
from ops.lake.contract import ACTIVATIONS, EMBEDDING_DIM, EMBEDDINGS, PROMPTS, DatasetKey, Lake
from ops.scoring.topk_check import firing_sets, min_ranks, score_ranks, token_latent_sets, topk_check
from workflows import score as score_job

KEY = DatasetKey(model="tiny-lm", sae="tiny-sae", hook="blocks.0.hook_resid_post")
D_SAE = 6


def write_lake(
    root: Path,
    acts: list[tuple[int, int, float]],
    embeddings: dict[int, np.ndarray] | None = None,
    key: DatasetKey = KEY,
    shards: int = 2,
) -> Lake:
    """A tiny lake: activations over ``shards`` files, optional embeddings and prompts, a manifest."""
    lake = Lake(str(root))
    for shard in range(shards):
        rows = acts[shard::shards]
        table = pa.table(
            {"prompt_id": [r[0] for r in rows], "latent": [r[1] for r in rows], "value": [r[2] for r in rows]},
            schema=ACTIVATIONS,
        )
        lake.write_table(lake.shard_path("activations", key, shard), table, ACTIVATIONS)
    if embeddings is not None:
        ids = list(embeddings)
        emb = pa.table(
            {
                "prompt_id": ids,
                "embedding": [embeddings[i].astype(np.float32).tolist() for i in ids],
                "embedder": ["stub-embedder"] * len(ids),
            },
            schema=EMBEDDINGS,
        )
        lake.write_table(lake.shard_path("embeddings", key, 0), emb, EMBEDDINGS)
        prompts = pa.table(
            {
                "prompt_id": ids,
                "text": [f"prompt {i}" for i in ids],
                "source": ["test"] * len(ids),
                "task": ["t"] * len(ids),
                "n_tokens": [3] * len(ids),
                "truncated": [False] * len(ids),
            }
        )
        lake.write_table(lake.shard_path("prompts", key, 0), prompts, PROMPTS)
    manifest = {
        "dataset": key.name,
        "key": asdict(key),
        "embedder": "stub-embedder",
        "d_sae": D_SAE,
        "config": {"sae": "tiny-sae-dir"},
    }
    lake.write_json(lake.manifest_path(key), manifest)
    return lake


def distances(d: dict[int, float]) -> pa.Table:
    return pa.table({"prompt_id": list(d), "d": list(d.values())}, schema=scoring.DISTANCES)


# ---------------------------------------------------------------------------------------------
# hand fixture: 4 prompts with a distance, one without, 4 latents
#
#   prompt  d     s(p): latent=value
#   1       0.5   0=0.6  1=0.4
#   2       1.0   0=0.2  2=0.8
#   3       1.5   1=0.5  2=0.5
#   4       2.0   2=0.5  3=0.5
#   5       -     0=1.0            (no embedding: ignored)

HAND_ACTS = [
    (1, 0, 0.6),
    (1, 1, 0.4),
    (2, 0, 0.2),
    (2, 2, 0.8),
    (3, 1, 0.5),
    (3, 2, 0.5),
    (4, 2, 0.5),
    (4, 3, 0.5),
    (5, 0, 1.0),
]
HAND_D = {1: 0.5, 2: 1.0, 3: 1.5, 4: 2.0}


def as_rows(table: pa.Table) -> dict[int, tuple[float, int, float | None]]:
    return {r["latent"]: (r["g"], r["support"], r["score"]) for r in table.to_pylist()}


def test_hand_fixture_power_1(tmp_path: Path) -> None:
    lake = write_lake(tmp_path, HAND_ACTS)
    got = as_rows(scoring.score_latents(lake, KEY, distances(HAND_D), power=1, min_support=2))
    # g0 = (0.6*0.5 + 0.2*1.0) / (0.6+0.2)          = 0.5/0.8   = 5/8
    # g1 = (0.4*0.5 + 0.5*1.5) / (0.4+0.5)          = 0.95/0.9  = 19/18
    # g2 = (0.8*1.0 + 0.5*1.5 + 0.5*2.0) / 1.8      = 2.55/1.8  = 17/12
    # g3 = (0.5*2.0) / 0.5 = 2, support 1 < 2        -> score NULL
    # scored: max g = 17/12, min g = 5/8, range = 34/24 - 15/24 = 19/24
    # score1 = (17/12 - 19/18) / (19/24) = (13/36) * (24/19) = 26/57
    expected = {0: (5 / 8, 2, 1.0), 1: (19 / 18, 2, 26 / 57), 2: (17 / 12, 3, 0.0), 3: (2.0, 1, None)}
    assert got.keys() == expected.keys()
    for latent, (g, support, score) in expected.items():
        assert got[latent][0] == pytest.approx(g, abs=1e-7)
        assert got[latent][1] == support
        assert (got[latent][2] is None) if score is None else got[latent][2] == pytest.approx(score, abs=1e-7)


def test_hand_fixture_power_2(tmp_path: Path) -> None:
    lake = write_lake(tmp_path, HAND_ACTS)
    got = as_rows(scoring.score_latents(lake, KEY, distances(HAND_D), power=2, min_support=2))
    # d^2 = 0.25, 1, 2.25, 4
    # g0 = (0.6*0.25 + 0.2*1) / 0.8                 = 0.35/0.8  = 7/16
    # g1 = (0.4*0.25 + 0.5*2.25) / 0.9              = 1.225/0.9 = 49/36
    # g2 = (0.8*1 + 0.5*2.25 + 0.5*4) / 1.8         = 3.925/1.8 = 157/72
    # range = 157/72 - 7/16 = 251/144; score1 = (157/72 - 98/72) / (251/144) = 118/251
    assert got[0][0] == pytest.approx(7 / 16) and got[0][2] == pytest.approx(1.0)
    assert got[1][0] == pytest.approx(49 / 36) and got[1][2] == pytest.approx(118 / 251)
    assert got[2][0] == pytest.approx(157 / 72) and got[2][2] == pytest.approx(0.0)
    assert got[3] == (pytest.approx(4.0), 1, None)


def test_one_scored_latent_scores_one(tmp_path: Path) -> None:
    # min_support 3: only latent 2 is scored; max g == min g, so its score is 1.0 (stated rule)
    lake = write_lake(tmp_path, HAND_ACTS)
    got = as_rows(scoring.score_latents(lake, KEY, distances(HAND_D), power=1, min_support=3))
    assert got[2][2] == 1.0
    assert [got[i][2] for i in (0, 1, 3)] == [None, None, None]


# ---------------------------------------------------------------------------------------------
# property: the SQL equals a NumPy reference of spec §2


def numpy_reference(acts: list[tuple[int, int, float]], d: dict[int, float], power: int, min_support: int) -> dict:
    if not acts:
        return {}
    pid = np.array([a[0] for a in acts])
    lat = np.array([a[1] for a in acts])
    val = np.array([a[2] for a in acts], dtype=np.float32).astype(np.float64)
    has = np.array([p in d for p in pid]) & (val > 0)
    pid, lat, val = pid[has], lat[has], val[has]
    w = np.array([d[p] ** power for p in pid], dtype=np.float64)
    n = int(lat.max()) + 1 if len(lat) else 0
    num, den = np.bincount(lat, val * w, n), np.bincount(lat, val, n)
    support = np.bincount(lat, minlength=n)
    fired = np.flatnonzero(support)
    g = num[fired] / den[fired]
    scored = support[fired] >= min_support
    out = {}
    if scored.any():
        gmax, gmin = g[scored].max(), g[scored].min()
    for i, latent in enumerate(fired):
        if not scored[i]:
            score = None
        elif gmax - gmin <= 1e-9 * gmax:
            score = 1.0
        else:
            score = (gmax - g[i]) / (gmax - gmin)
        out[int(latent)] = (g[i], int(support[latent]), score)
    return out


@st.composite
def random_lakes(draw: st.DrawFn) -> tuple[list[tuple[int, int, float]], dict[int, float]]:
    n_prompts = draw(st.integers(1, 10))
    d_sae = draw(st.integers(1, 8))
    values = st.integers(1, 16).map(lambda k: k / 16)  # exact in float32
    acts, d = [], {}
    for p in range(n_prompts):
        fired = draw(st.lists(st.integers(0, d_sae - 1), unique=True, max_size=d_sae))
        acts += [(p, latent, draw(values)) for latent in fired]
        if draw(st.booleans()) or p == 0:
            d[p] = draw(st.integers(0, 16)) / 8
    return acts, d


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lake=random_lakes(),
    power=st.sampled_from([1, 2]),
    min_support=st.integers(0, 4),
    shards=st.integers(1, 3),
)
def test_sql_matches_numpy_reference(lake, power: int, min_support: int, shards: int) -> None:
    acts, d = lake
    with tempfile.TemporaryDirectory() as root:
        got = as_rows(
            scoring.score_latents(write_lake(Path(root), acts, shards=shards), KEY, distances(d), power, min_support)
        )
    want = numpy_reference(acts, d, power, min_support)
    assert got.keys() == want.keys()
    for latent, (g, support, score) in want.items():
        assert got[latent][0] == pytest.approx(g, abs=1e-6)
        assert got[latent][1] == support
        if score is None:
            assert got[latent][2] is None
        else:
            assert got[latent][2] == pytest.approx(score, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# distances


def test_min_distances_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    ref, align = rng.normal(size=(50, 16)), rng.normal(size=(7, 16))
    got = scoring.min_distances(ref, align, block=20)  # several blocks
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    want = np.linalg.norm(unit(ref)[:, None, :] - unit(align)[None, :, :], axis=2).min(axis=1)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert scoring.min_distances(align[:3], align)[0] == pytest.approx(0.0, abs=1e-7)


def test_empty_align_set_is_an_error() -> None:
    with pytest.raises(SaealignError, match="align set is empty"):
        scoring.min_distances(np.ones((2, 4)), np.empty((0, 4)))
    with pytest.raises(SaealignError, match="align set is empty"):
        scoring.clean_align_texts(["", "   "])


# ---------------------------------------------------------------------------------------------
# the whole topic job with a stub embedder


def unit_at(distance: float) -> np.ndarray:
    """A unit vector at Euclidean ``distance`` from e0 (in the e0-e1 plane)."""
    theta = 2 * math.asin(distance / 2)
    v = np.zeros(EMBEDDING_DIM)
    v[0], v[1] = math.cos(theta), math.sin(theta)
    return v


@pytest.fixture
def hand_lake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Lake:
    embeddings = {p: unit_at(d) for p, d in HAND_D.items()}
    lake = write_lake(tmp_path / "lake", HAND_ACTS, embeddings)
    calls: list[str] = []

    def stub_embed(texts, name, progress=False):  # every align text embeds to e0
        calls.append(name)
        out = np.zeros((len(texts), EMBEDDING_DIM), dtype=np.float32)
        out[:, 0] = 1
        return out

    monkeypatch.setattr(scoring, "embed", stub_embed)
    lake.calls = calls  # type: ignore[attr-defined]
    return lake


def test_score_topic_stores_exports_and_loads(hand_lake: Lake) -> None:
    row = scoring.score_topic(hand_lake.uri, "medical", ["a text", "  ", "another"], min_support=2)
    assert hand_lake.calls == ["stub-embedder"]  # the lake's embedder
    assert row["n_align"] == 2 and row["n_scored"] == 3 and row["n_prompts"] == 4
    scores, meta = scoring.topic_scores(hand_lake.uri, "medical")
    assert scores.dtype == np.float32 and scores.shape == (D_SAE,)
    np.testing.assert_allclose(scores[:3], [1.0, 26 / 57, 0.0], atol=1e-5)
    assert np.isnan(scores[3:]).all()  # latent 3 under the support, 4 and 5 never fire
    assert meta["topic"] == "medical" and meta["dataset"] == KEY.name and meta["sae"] == "tiny-sae"
    assert meta["distance_power"] == 1.0 and meta["min_support"] == 2
    assert [t["topic"] for t in scoring.list_topics(hand_lake.uri)] == ["medical"]
    assert scoring.topic_align_texts(hand_lake.uri, "medical") == ["a text", "another"]
    assert hand_lake.exists(hand_lake.scores_export_path("medical", KEY.name))
    assert row["top"][0]["latent"] == 0


def test_existing_topic_needs_replace(hand_lake: Lake) -> None:
    scoring.score_topic(hand_lake.uri, "medical", ["x"], min_support=2)
    with pytest.raises(SaealignError, match="--replace"):
        scoring.score_topic(hand_lake.uri, "medical", ["x"], min_support=2)
    scoring.score_topic(hand_lake.uri, "medical", ["x", "y"], power=2, min_support=2, replace=True)
    scores, meta = scoring.topic_scores(hand_lake.uri, "medical")
    assert meta["distance_power"] == 2.0 and meta["n_align"] == 2
    assert scores[1] == pytest.approx(118 / 251, abs=1e-5)
    conn = duckdb.connect(hand_lake.scores_db_path(), read_only=True)
    counts = conn.execute("SELECT (SELECT count(*) FROM topics), (SELECT count(*) FROM scores)").fetchone()
    conn.close()
    assert counts == (1, 4)  # replaced, not duplicated


def test_failed_write_leaves_database_unchanged(hand_lake: Lake, monkeypatch: pytest.MonkeyPatch) -> None:
    scoring.score_topic(hand_lake.uri, "medical", ["x"], min_support=2)

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(scoring, "_write_export_tmp", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        scoring.score_topic(hand_lake.uri, "medical", ["x", "y"], power=2, min_support=2, replace=True)
    with pytest.raises(RuntimeError, match="disk full"):
        scoring.score_topic(hand_lake.uri, "sport", ["x"], min_support=2)
    conn = duckdb.connect(hand_lake.scores_db_path(), read_only=True)
    topics = conn.execute("SELECT topic, distance_power, n_align FROM topics").fetchall()
    n_scores = conn.execute("SELECT count(*) FROM scores").fetchone()
    n_texts = conn.execute("SELECT count(*) FROM align_texts").fetchone()
    conn.close()
    assert topics == [("medical", 1.0, 1)] and n_scores == (4,) and n_texts == (1,)
    assert [t["topic"] for t in scoring.list_topics(hand_lake.uri)] == ["medical"]


def test_bad_inputs_are_clear_errors(hand_lake: Lake, tmp_path: Path) -> None:
    with pytest.raises(SaealignError, match="align set is empty"):
        scoring.score_topic(hand_lake.uri, "medical", [" "])
    with pytest.raises(SaealignError, match=r"unknown topic 'nope'.*saealign score"):
        scoring.topic_scores(hand_lake.uri, "nope")
    with pytest.raises(SaealignError, match="bad topic name"):
        scoring.score_topic(hand_lake.uri, "../etc", ["x"])
    with pytest.raises(SaealignError, match="no dataset 'other'"):
        scoring.score_topic(hand_lake.uri, "medical", ["x"], dataset="other")
    with pytest.raises(SaealignError, match=r"no dataset manifest.*build-lake"):
        scoring.score_topic(str(tmp_path / "empty"), "medical", ["x"])


def test_missing_table_and_ambiguous_dataset(tmp_path: Path) -> None:
    lake = write_lake(tmp_path, HAND_ACTS)  # no embeddings table
    with pytest.raises(SaealignError, match=r"no 'embeddings' table.*build-lake"):
        scoring.score_topic(lake.uri, "medical", ["x"])
    lake.fs.delete_dir(lake.path("activations"))
    with pytest.raises(SaealignError, match=r"no 'activations' table.*build-lake"):
        scoring.score_latents(lake, KEY, distances(HAND_D))
    write_lake(tmp_path, HAND_ACTS, key=DatasetKey(model="tiny-lm", sae="other-sae", hook=KEY.hook))
    with pytest.raises(SaealignError, match=r"several datasets.*--dataset"):
        scoring.resolve_dataset(lake)


def test_score_job_cli(hand_lake: Lake, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    align = tmp_path / "align.jsonl"
    align.write_text('{"text": "a"}\n{"text": "b"}\n')
    argv = ["--lake", hand_lake.uri, "--topic", "t1", "--align-file", str(align), "--align-text", "c"]
    assert score_job.main([*argv, "--min-support", "2", "--distance-power", "2"]) == 0
    assert "topic t1" in capsys.readouterr().out
    _, meta = scoring.topic_scores(hand_lake.uri, "t1")
    assert meta["n_align"] == 3 and meta["distance_power"] == 2.0 and str(align) in meta["align_source"]
    with pytest.raises(SaealignError, match="align set is empty"):
        score_job.main(["--lake", hand_lake.uri, "--topic", "t2"])
    exported = pq.read_table(hand_lake.scores_export_path("t1", KEY.name))
    assert exported.schema.names == scoring.SCORES.names


# ---------------------------------------------------------------------------------------------
# the top-k check (paper Fig. 4)


def test_topk_check_by_hand() -> None:
    scores = np.array([0.2, np.nan, 1.0, 0.5], dtype=np.float32)  # order: 2, 3, 0; latent 1 unscored
    np.testing.assert_array_equal(score_ranks(scores), [2, 4, 0, 1])
    aligned = [np.array([2]), np.array([0, 1]), np.array([3])]
    unaligned = [np.array([1]), np.array([], dtype=np.int32), np.array([0])]
    np.testing.assert_array_equal(min_ranks(score_ranks(scores), unaligned), [4, 4, 2])
    result = topk_check(scores, aligned, unaligned, [1, 2, 3])
    # k=1: {2}     aligned 1/3 (token 0), unaligned 0
    # k=2: {2,3}   aligned 2/3,           unaligned 0
    # k=3: {2,3,0} aligned 3/3,           unaligned 1/3
    assert result.aligned == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert result.unaligned == pytest.approx([0.0, 0.0, 1 / 3])
    assert result.passed and result.top_latents == [2, 3, 0]
    assert "aligned" in result.table()


def test_firing_sets_from_dense() -> None:
    acts = np.array([[0.0, 1.0, 0.5], [0.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    got = firing_sets(acts)
    assert [g.tolist() for g in got] == [[1, 2], [], [0]]


class TinySAE(torch.nn.Module):
    """A d_in=16, d_sae=8 ReLU encoder standing in for a sae-lens SAE."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = torch.nn.Linear(16, 8)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.enc(x))


def tiny_model() -> SimpleNamespace:
    """Just enough of a LanguageModel for iter_batches/run_to_hook: a 1-layer HookedTransformer and
    a character tokenizer (BOS = 1, pad = 0)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_ctx=32, d_head=4, n_heads=4, d_vocab=40, act_fn="relu")
    tl = HookedTransformer(cfg)
    tokenizer = SimpleNamespace(bos_token_id=1, eos_token_id=2, pad_token_id=0, all_special_ids=[0, 1, 2])

    def tokenize(texts: list[str], max_length: int | None = None) -> list[list[int]]:
        return [[1, *[3 + ord(c) % 37 for c in t]][:max_length] for t in texts]

    return SimpleNamespace(tl=tl, tokenizer=tokenizer, tokenize=tokenize, device="cpu")


def test_token_latent_sets_with_a_tiny_model() -> None:
    model, sae = tiny_model(), TinySAE()
    texts = ["abc", "hello there", "x"]
    got = token_latent_sets(model, sae, "blocks.0.hook_resid_post", texts, context=8, max_tokens=16)
    assert len(got) == 3 + 7 + 1  # counted tokens: BOS (position 0) excluded, truncated to 8 tokens
    tokens = torch.tensor([model.tokenize(["hello there"], 8)[0]])
    _, cache = model.tl.run_with_cache(tokens)
    want = firing_sets(sae.encode(cache["blocks.0.hook_resid_post"][0, 1:]))
    assert all(np.array_equal(a, b) for a, b in zip(got[-7:], want, strict=True))  # longest text comes last


def test_score_check_job_with_stub_models(hand_lake: Lake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ops.models.lm
    import ops.saes.registry
    import ops.scoring.topk_check

    scoring.score_topic(hand_lake.uri, "medical", ["aligned one", "aligned two"], min_support=2)
    seen: list[list[str]] = []

    def fake_sets(model, sae, hook, texts, context=256):  # aligned tokens fire latent 0 (top), others 5
        seen.append(list(texts))
        latent = 0 if texts[0].startswith("aligned") else 5
        return [np.array([latent])] * 4

    monkeypatch.setattr(ops.models.lm, "load_model", lambda name, device="cpu": name)
    monkeypatch.setattr(ops.saes.registry, "load_sae", lambda spec, device="cpu": spec)
    monkeypatch.setattr(ops.saes.registry, "check_sae_fits", lambda sae, model, hook: hook)
    monkeypatch.setattr(ops.scoring.topk_check, "token_latent_sets", fake_sets)
    unaligned = tmp_path / "u.jsonl"
    unaligned.write_text('{"text": "other"}\n')
    argv = ["--check", "--lake", hand_lake.uri, "--topic", "medical", "--unaligned-file", str(unaligned)]
    assert score_job.main([*argv, "--k-max", "3", "--out", str(tmp_path / "check")]) == 0
    assert seen == [["aligned one", "aligned two"], ["other"]]  # default aligned text: the topic's
    report = json.loads((tmp_path / "check" / "topk_check.json").read_text())
    assert report["aligned"] == [1.0, 1.0, 1.0] and report["unaligned"] == [0.0, 0.0, 0.0] and report["passed"]
    assert (tmp_path / "check" / "topk_check.png").stat().st_size > 0


def test_older_database_layout_is_a_clear_error(hand_lake: Lake) -> None:
    conn = duckdb.connect(hand_lake.scores_db_path())
    conn.execute("CREATE TABLE scores (topic VARCHAR, dataset VARCHAR, latent INTEGER, g DOUBLE)")
    conn.close()
    with pytest.raises(SaealignError, match=r"older 'scores' table.*move the file away"):
        scoring.score_topic(hand_lake.uri, "medical", ["x"], min_support=2)


def test_failed_insert_rolls_back(hand_lake: Lake, monkeypatch: pytest.MonkeyPatch) -> None:
    scoring.score_topic(hand_lake.uri, "medical", ["x"], min_support=2)
    broken = {**scoring.sql_sections("scores_db"), "insert_align_texts": "INSERT INTO no_such_table VALUES (1)"}
    monkeypatch.setattr(scoring, "sql_sections", lambda name: broken)
    with pytest.raises(SaealignError, match=r"nothing written.*no_such_table"):
        scoring.score_topic(hand_lake.uri, "medical", ["x", "y"], power=2, min_support=2, replace=True)
    monkeypatch.undo()
    conn = duckdb.connect(hand_lake.scores_db_path(), read_only=True)
    state = conn.execute("SELECT (SELECT max(n_align) FROM topics), (SELECT count(*) FROM scores)").fetchone()
    conn.close()
    assert state == (1, 4)  # the first scoring, untouched
