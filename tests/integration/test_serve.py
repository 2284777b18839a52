"""The Ray Serve service on a local Ray: every endpoint, the OpenAI client, streaming, isolation
of concurrent requests, bad input.

A small lake (32 pool prompts, a random TopK SAE, topics medical and sport) is built once per
pytest session under the session's base temp dir (``service_lake``; the browser test reuses it).
Generation asks for 4–8 tokens so the module stays within a few minutes on 2 cores.
"""

from __future__ import annotations

import concurrent.futures
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.integration

PROMPT = "My heart is broken, so I should"
TIMEOUT = 180.0


# ---------------------------------------------------------------------------------------------
# helpers shared with test_browser.py


def service_lake(base: Path) -> Path:
    """A lake with topics medical and sport under ``base`` (built once; needs a running Ray)."""
    from ops.scoring.scores import list_topics, score_topic
    from ops.texts import read_texts
    from tests.conftest import make_topk_sae
    from workflows.build_lake import BuildLakeConfig, build

    lake, sae = base / "serve_lake", base / "serve_sae"
    if (lake / "scores" / "topic=sport").is_dir():
        return lake
    if not (sae / "cfg.json").is_file():
        make_topk_sae(576, 256, 8, "blocks.6.hook_resid_post").save_model(sae)
    build(BuildLakeConfig(lake=str(lake), sae=str(sae), pool=("embedded:pool#:32",), shard_size=16, context=64))
    scored = {r["topic"] for r in list_topics(str(lake))}
    for topic in ("medical", "sport"):
        if topic not in scored:
            score_topic(str(lake), topic, read_texts(f"embedded:topic:{topic}").texts[:20], min_support=2)
    return lake


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_service(base: Path, **overrides: Any) -> Iterator[str]:
    """Local Ray (2 CPUs) + Serve on a free loopback port; yields the base URL; shuts down after."""
    import ray
    from ray import serve

    from workflows.serve import ServeConfig, build_app

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    try:
        lake = service_lake(base)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings: dict[str, Any] = {
            "lake": str(lake),
            "torch_threads": 2,
            "max_prompt_chars": 400,
            "max_new_tokens": 64,
            "max_align_texts": 20,
            **overrides,
        }
        serve.run(build_app(ServeConfig(**settings)), name="saealign", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from start_service(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        yield c


def _generate(client: httpx.Client, **body: Any) -> dict[str, Any]:
    resp = client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 6, **body})
    assert resp.status_code == 200, resp.text
    return resp.json()


def _sse_events(client: httpx.Client, path: str, body: dict[str, Any]) -> list[tuple[float, str, Any]]:
    """(arrival time, event, data) of a server-sent event stream."""
    out: list[tuple[float, str, Any]] = []
    with client.stream("POST", path, json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        event = "message"
        for line in resp.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: "):
                raw = line.removeprefix("data: ")
                out.append((time.perf_counter(), event, raw if raw == "[DONE]" else json.loads(raw)))
                event = "message"
    return out


# ---------------------------------------------------------------------------------------------
# endpoints


def test_health_page_and_static_files(client: httpx.Client) -> None:
    health = client.get("/healthz").json()
    assert health["status"] == "ok"
    assert {"medical", "sport"} <= set(health["topics"])
    assert health["d_sae"] == 256 and health["hook"] == "blocks.6.hook_resid_post"
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="prompt"' in page.text and "static/app.js" in page.text
    assert "compare" in client.get("/static/app.js").text
    assert client.get("/static/style.css").status_code == 200
    assert client.get("/static/../serve.py").status_code == 404


def test_generate_returns_tokens_with_contamination(client: httpx.Client) -> None:
    out = _generate(client, topic="medical", method="swap", seed=1)
    n = len(out["token_ids"])
    assert 1 <= n <= 6 and len(out["tokens"]) == len(out["contamination"]) == len(out["latents_changed"]) == n
    assert out["method"] == "swap" and out["topic"] == "medical"
    assert all(c is not None and 0.0 <= c <= 1.0 for c in out["contamination"])
    assert all(ch is not None and ch >= 0 for ch in out["latents_changed"])
    assert {"prefill_s", "decode_s", "s_per_token", "queue_s", "request_s", "batch_size"} <= out["timings"].keys()
    assert _generate(client, topic="medical", method="swap", seed=1)["token_ids"] == out["token_ids"]
    plain = _generate(client, method="orig", seed=1)  # no topic: nothing measured
    assert plain["contamination"] == [None] * len(plain["token_ids"]) and plain["topic"] is None


def test_stream_sends_tokens_as_they_are_made(client: httpx.Client) -> None:
    body = {"prompt": PROMPT, "topic": "medical", "method": "clamp", "max_new_tokens": 8, "seed": 2}
    events = _sse_events(client, "/generate/stream", body)
    tokens = [(t, data) for t, ev, data in events if ev == "token"]
    (done,) = [data for _, ev, data in events if ev == "done"]
    assert events[-1][1] == "done"
    assert [d["token_id"] for _, d in tokens] == done["token_ids"] == _generate(client, **body)["token_ids"]
    np.testing.assert_allclose([d["contamination"] for _, d in tokens], done["contamination"], atol=1e-5)
    assert [d["index"] for _, d in tokens] == list(range(len(tokens)))
    # incremental: token events are spread over the decode time, not sent together at the end
    if len(tokens) >= 4:
        spread = tokens[-2][0] - tokens[0][0]
        assert spread > 0.3 * done["timings"]["decode_s"] * (len(tokens) - 2) / len(tokens)


def test_compare_equals_each_method_alone(client: httpx.Client) -> None:
    body = {"prompt": PROMPT, "topic": "medical", "methods": ["swap", "clamp"], "max_new_tokens": 6, "seed": 4}
    resp = client.post("/compare", json=body)
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    assert [r["method"] for r in results] == ["orig", "swap", "clamp"]
    for r in results:
        alone = _generate(client, topic="medical", method=r["method"], seed=4)
        assert r["token_ids"] == alone["token_ids"]
        np.testing.assert_allclose(r["contamination"], alone["contamination"], atol=1e-4)
    assert results[0]["latents_changed"] == [0.0] * len(results[0]["token_ids"])  # orig changes nothing


def test_topics_list_top_latents_and_new_topic(client: httpx.Client) -> None:
    listed = {t["topic"]: t for t in client.get("/topics").json()["topics"]}
    assert {"medical", "sport"} <= listed.keys() and listed["medical"]["n_align"] == 20
    assert listed["medical"]["created"][:2] == "20"  # the topics table's TIMESTAMP, as text
    top = client.get("/topics/medical", params={"top": 5}).json()["top"]
    assert len(top) == 5 and [r["score"] for r in top] == sorted((r["score"] for r in top), reverse=True)
    assert client.get("/topics/nope").status_code == 404

    texts = [
        "The telescope revealed a distant spiral galaxy.",
        "Astronomers measured the orbit of the new comet.",
        "The rocket carried a probe toward Jupiter's moons.",
        "A supernova lit up the night sky for weeks.",
        "The planets of the solar system orbit the sun.",
        "Stars form inside cold clouds of gas and dust.",
    ]
    resp = client.post("/topics", json={"name": "astro", "texts": texts, "min_support": 2, "top": 7})
    assert resp.status_code == 201, resp.text
    info = resp.json()
    assert info["topic"] == "astro" and info["n_align"] == len(texts) and len(info["top"]) == 7
    assert "astro" in {t["topic"] for t in client.get("/topics").json()["topics"]}
    assert _generate(client, topic="astro", method="swap")["topic"] == "astro"
    clash = client.post("/topics", json={"name": "astro", "texts": texts})
    assert clash.status_code == 409 and "astro" in clash.json()["error"]["message"]
    too_many = client.post("/topics", json={"name": "astro2", "texts": texts * 4})
    assert too_many.status_code == 422 and too_many.json()["error"]["param"] == "texts"


def test_openai_client_completions_and_stream(url: str, client: httpx.Client) -> None:
    openai = pytest.importorskip("openai")
    oa = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)
    assert [m.id for m in oa.models.list().data] == ["smollm2-135m"]
    extra = {"topic": "sport", "method": "swap"}
    done = oa.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=6, seed=5, extra_body=extra)
    expected = _generate(client, topic="sport", method="swap", seed=5)
    assert done.choices[0].text == expected["text"]
    assert done.usage is not None and done.usage.completion_tokens == len(expected["token_ids"])
    assert done.choices[0].finish_reason in ("length", "stop")
    chunks = list(
        oa.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=6, seed=5, extra_body=extra, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == expected["text"]
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    with pytest.raises(openai.UnprocessableEntityError):
        oa.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=-1)
    with pytest.raises(openai.NotFoundError):
        oa.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=2, extra_body={"topic": "nope"})


def test_openai_client_chat_completions_and_stream(url: str, client: httpx.Client) -> None:
    openai = pytest.importorskip("openai")
    oa = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)
    listed = client.get("/v1/models").json()["data"][0]["saealign"]
    assert {"medical", "sport"} <= set(listed["topics"]) and "swap" in listed["methods"]
    assert listed["options"]["clamp_k"]["default"] == 5
    messages = [{"role": "user", "content": "Tell me about your day."}]
    extra = {"topic": "sport", "method": "swap"}
    done = oa.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=6, seed=3, extra_body=extra)
    # the same as /generate on the conversation written by the model's chat template
    from ops.models.lm import EMBEDDED_MODEL, load_model

    tokenizer = load_model(EMBEDDED_MODEL).tokenizer
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = _generate(client, prompt=prompt, topic="sport", method="swap", seed=3)
    assert done.choices[0].message.role == "assistant"
    assert done.choices[0].message.content == expected["text"]
    assert done.usage is not None and done.usage.completion_tokens == len(expected["token_ids"])
    chunks = list(
        oa.chat.completions.create(
            model="smollm2-135m", messages=messages, max_tokens=6, seed=3, extra_body=extra, stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected["text"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    with pytest.raises(openai.UnprocessableEntityError):
        oa.chat.completions.create(model="smollm2-135m", messages=[], max_tokens=2)


def test_openai_raw_http_stop_and_greedy(client: httpx.Client) -> None:
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    first = client.post("/v1/completions", json=body).json()
    again = client.post("/v1/completions", json={**body, "seed": 99}).json()
    assert first["choices"][0]["text"] == again["choices"][0]["text"]  # greedy ignores the seed
    text = first["choices"][0]["text"]
    if len(text.strip()) > 2:
        stop = text.strip()[1:3]
        cut = client.post("/v1/completions", json={**body, "stop": [stop]}).json()["choices"][0]
        assert cut["finish_reason"] == "stop" and cut["text"] == text[: text.find(stop)]
    events = _sse_events(client, "/v1/completions", {**body, "stream": True})
    assert events[-1][2] == "[DONE]"
    assert "".join(d["choices"][0]["text"] for _, _, d in events[:-1]) == text


# ---------------------------------------------------------------------------------------------
# isolation and errors

ISOLATION = [
    {"topic": "medical", "method": "swap", "seed": 0, "prompt": "My heart is broken, so I should"},
    {"topic": "sport", "method": "swap", "seed": 1, "prompt": "Our team needs a shot in the arm before"},
    {"topic": "medical", "method": "clamp", "seed": 2, "prompt": "The economy caught a cold after"},
    {"topic": "sport", "method": "weight", "seed": 3, "prompt": "I have butterflies in my stomach so I should"},
    {"topic": None, "method": "orig", "seed": 4, "prompt": "Tell me about the weather today."},
    {"topic": "medical", "method": "sae", "seed": 5, "prompt": "A short one"},
    {"topic": "sport", "method": "clamp", "seed": 6, "prompt": "My heart is broken, so I should", "max_new_tokens": 4},
    {"topic": "medical", "method": "swap", "seed": 7, "prompt": "The recipe needs", "options": {"keep_error": True}},
]


def test_concurrent_requests_equal_each_alone(client: httpx.Client) -> None:
    bodies = [{"max_new_tokens": 6, **b} for b in ISOLATION]
    alone = [_generate(client, **b) for b in bodies]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda b: _generate(client, **b), bodies))
    for body, a, t in zip(bodies, alone, together, strict=True):
        assert (t["method"], t["topic"], t["prompt"]) == (body["method"], body["topic"], body["prompt"])
        assert t["token_ids"] == a["token_ids"], body
        got = np.array(t["contamination"], dtype=float)
        want = np.array(a["contamination"], dtype=float)
        np.testing.assert_allclose(got, want, atol=1e-4, equal_nan=True)
    assert all(a["timings"]["batch_size"] == 1 for a in alone)
    assert max(t["timings"]["batch_size"] for t in together) > 1  # they were batched


def test_a_request_arriving_while_a_long_one_decodes_starts_and_ends_first(client: httpx.Client) -> None:
    """Iteration-level scheduling: the short request joins the running batch at the next step."""
    long_body = {"prompt": PROMPT, "topic": "medical", "method": "swap", "max_new_tokens": 64, "ignore_eos": True}
    first_token = threading.Event()
    arrivals: list[tuple[float, str]] = []

    def long_stream() -> None:
        with client.stream("POST", "/generate/stream", json=long_body) as resp:
            event = ""
            for line in resp.iter_lines():
                if line.startswith("event: "):
                    event = line.removeprefix("event: ")
                    arrivals.append((time.perf_counter(), event))
                    first_token.set()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(long_stream)
        assert first_token.wait(TIMEOUT)
        short = _generate(client, topic="sport", method="swap", max_new_tokens=3, seed=2)
        short_done = time.perf_counter()
        running.result(TIMEOUT)
    done_at = next(t for t, e in arrivals if e == "done")
    assert short_done < done_at  # it did not wait for the long one
    assert short["timings"]["batch_size"] > 1  # it decoded beside the long one
    assert short["token_ids"] == _generate(client, topic="sport", method="swap", max_new_tokens=3, seed=2)["token_ids"]


def test_a_client_that_leaves_takes_its_row_out_of_the_batch(client: httpx.Client) -> None:
    body = {"prompt": PROMPT, "method": "orig", "max_new_tokens": 64, "ignore_eos": True}
    with client.stream("POST", "/generate/stream", json=body) as resp:
        for line in resp.iter_lines():
            if line.startswith("event: token"):
                break  # leave after the first token
    deadline = time.perf_counter() + 1.0  # the other 63 tokens would take longer than that
    while client.get("/healthz").json()["batching"]["running_rows"] and time.perf_counter() < deadline:
        time.sleep(0.05)
    health = client.get("/healthz").json()["batching"]
    assert health["running_rows"] == 0 and health["queued_rows"] == 0


def test_bad_requests_get_4xx_and_the_service_stays_up(client: httpx.Client) -> None:
    def err(resp: httpx.Response, status: int) -> dict[str, Any]:
        assert resp.status_code == status, resp.text
        return resp.json()["error"]

    headers = {"content-type": "application/json"}
    assert "malformed JSON" in err(client.post("/generate", content=b'{"prompt": ', headers=headers), 400)["message"]
    assert "malformed JSON" in err(client.post("/v1/completions", content=b"{x", headers=headers), 400)["message"]
    not_utf8 = err(client.post("/generate", content=b'{"prompt": "\xff\xfe"}', headers=headers), 400)
    assert not_utf8["type"] == "invalid_request_error" and not_utf8["message"]
    assert err(client.get("/no/such/path"), 404)["code"] == 404
    e = err(client.post("/generate", json={"prompt": PROMPT, "topic": "nope", "method": "swap"}), 404)
    assert "nope" in e["message"] and e["param"] == "topic"
    e = err(client.post("/generate", json={"prompt": "x" * 401, "method": "orig"}), 422)
    assert e["param"] == "prompt" and "400" in e["message"]
    e = err(client.post("/generate", json={"prompt": "x" * 9000, "method": "orig"}), 422)
    assert e["param"] == "prompt"
    e = err(client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": -3}), 422)
    assert e["param"] == "max_new_tokens"
    e = err(client.post("/generate", json={"prompt": PROMPT, "method": "orig", "max_new_tokens": 65}), 422)
    assert e["param"] == "max_new_tokens" and "64" in e["message"]
    assert err(client.post("/generate", json={"prompt": PROMPT, "method": "swap"}), 422)["param"] == "topic"
    assert err(client.post("/generate", json={"prompt": PROMPT, "methd": "swap"}), 422)["param"] == "methd"
    assert err(client.post("/generate", json={"prompt": "   "}), 422)["param"] == "prompt"
    assert err(client.post("/generate", json=[1, 2]), 422)["message"]
    e = err(client.post("/compare", json={"prompt": PROMPT, "topic": "medical", "methods": ["zap"]}), 422)
    assert e["param"].startswith("methods")
    assert err(client.post("/topics", json={"name": "../evil", "texts": ["a"]}), 422)["param"] == "name"
    assert err(client.post("/topics", json={"name": "ok", "texts": []}), 422)["param"] == "texts"
    stream = client.post("/generate/stream", json={"prompt": PROMPT, "topic": "nope", "method": "swap"})
    assert stream.status_code == 404
    assert client.get("/healthz").json()["status"] == "ok"
    assert len(_generate(client, topic="medical", method="swap")["token_ids"]) >= 1


def test_sigterm_stops_the_service_and_every_process_it_started(tmp_path_factory: pytest.TempPathFactory) -> None:
    """``saealign serve`` under SIGTERM (as a container runtime or systemd stops it): it exits 0
    and leaves none of the processes it started (Ray's raylet, agents, Serve replicas)."""
    import signal
    import subprocess
    import sys

    import psutil

    lake = service_lake(tmp_path_factory.getbasetemp())
    port = free_port()
    cmd = [sys.executable, "-m", "workflows.cli", "serve", "--lake", str(lake), "--port", str(port)]
    log = tmp_path_factory.mktemp("sigterm") / "serve.log"
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text(errors="replace")[-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail("the service did not come up")
        started = psutil.Process(proc.pid).children(recursive=True)
        assert started, "saealign serve started no processes"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        _, alive = psutil.wait_procs(started, timeout=30)
        assert not alive, [p.info if hasattr(p, "info") else p.pid for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
