"""`service.loop: engine`: each request is one streaming call to a Verifier replica, whose step
engine (deer_serve.step_engine) runs every request it holds in one loop. Through the official
`openai` client: concurrent greedy requests (deer and mode ar) equal the in-process plain AR
decoding, and a client that goes away frees its request's slot in the engine (the replica's
counters show it cancelled, out of the running set, its caches released). The tests wait on
the engine's counters, never on wall-clock windows."""

from __future__ import annotations

import threading
import time

import pytest

from ops_app import delete, deploy, plain_ar

pytestmark = pytest.mark.service

APP = "engine"
MAX_TOKENS = 24
WORDS = ["def", "for", "class", "import", "while", "print"]
PROMPTS = [f"{WORDS[i % 6]} x{i} in range({i}):\n" * (1 + i % 3) for i in range(6)]
DEADLINE_S = 120.0  # how long a test waits for a counter before it fails


@pytest.fixture(scope="module")
def app(service):
    # block 4 (the session's), budget 12: six requests share a verify of <= 12 decode tokens
    a = deploy(service, APP, service={"loop": "engine", "engine_verify_budget": 12},
               limits={"max_tokens": 1024})
    try:
        yield a
    finally:
        delete(a)


@pytest.fixture(scope="module")
def client(app):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=app.http + "/v1", api_key="unused", max_retries=0, timeout=180)


def engine_stats(app) -> dict:
    return app.handle("Verifier").engine_stats.remote().result(timeout_s=60)


def wait_for(app, pred) -> dict:
    t_end = time.monotonic() + DEADLINE_S
    while True:
        s = engine_stats(app)
        if pred(s) or time.monotonic() > t_end:
            return s
        time.sleep(0.05)


def test_concurrent_greedy_requests_equal_plain_ar(service, app, client):
    reference = plain_ar(service.target_path, PROMPTS, MAX_TOKENS)
    before = engine_stats(app)
    assert before["engine"]
    out: dict = {}
    go = threading.Barrier(len(PROMPTS), timeout=180)

    def one(i, prompt):
        try:
            go.wait()
            mode = "ar" if i % 3 == 2 else "deer"  # mode ar rows share the engine's steps
            r = client.completions.create(model=app.model, prompt=prompt, max_tokens=MAX_TOKENS,
                                          temperature=0, extra_body={"mode": mode})
            out[prompt] = (r.choices[0].text, r.model_extra["deer"], mode)
        except Exception as e:  # noqa: BLE001 - reported below
            out[prompt] = e

    threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(PROMPTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in PROMPTS:
        assert not isinstance(out[p], Exception), out[p]
        text, deer, mode = out[p]
        assert text == reference[p].text, p
        assert not deer["fallback"]
        if mode == "deer":
            assert deer["cycles"] > 0
        else:
            assert deer["accept_lengths"] == []
    after = wait_for(app, lambda s: s["finished"] - before["finished"] >= len(PROMPTS))
    assert after["finished"] - before["finished"] == len(PROMPTS)
    assert after["released"] - before["released"] == len(PROMPTS)
    assert after["running"] == []
    # the requests shared steps: more rows than verify forwards
    assert after["rows"] - before["rows"] > after["steps"] - before["steps"]


def test_a_cancelled_stream_frees_its_slot_in_the_engine(app, client):
    before = engine_stats(app)
    stream = client.completions.create(model=app.model, prompt=PROMPTS[0], max_tokens=1000,
                                       temperature=0, stream=True)
    n = 0
    for _chunk in stream:
        n += 1
        if n == 3:
            break
    running = engine_stats(app)
    assert len(running["running"]) == 1  # it is in the engine's step now
    stream.close()                       # the client goes away
    after = wait_for(app, lambda s: s["cancelled"] > before["cancelled"] and not s["running"])
    assert after["cancelled"] == before["cancelled"] + 1, after
    assert after["running"] == [] and after["waiting"] == 0
    assert after["released"] == after["finished"] + after["cancelled"] + after["failed"]
    assert after["finished"] == before["finished"]  # it did not run to its 1000 tokens
