"""Property-based fuzzing of the HTTP API (hypothesis, >= 1000 cases over real HTTP).

Bodies mix well-formed fields with wrong types, out-of-range numbers, odd strings, nulls,
unknown fields, deep nesting and raw bytes. The property: never a 5xx; an error is OpenAI's
error object; a 200 is a well-formed completion (or an SSE stream ending in [DONE]); and the
server still answers normally afterwards. The app's limits are small (max_tokens 6, prompts of
64 tokens) so that the valid cases are cheap.
"""

from __future__ import annotations

import json

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ops_app import delete, deploy  # noqa: E402

pytestmark = [pytest.mark.service, pytest.mark.slow]

APP = "fuzz"
N_CASES = 1000

# ---- strategies --------------------------------------------------------------------------------
junk = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                         max_size=4),
                    max_leaves=8)
text = st.text(max_size=40) | st.sampled_from(["def f(x):\n", "", " ", "\x00", "\ud7ff",
                                                "é" * 30, "<|endoftext|>", "<|mask|>"])
ints = st.integers(-3, 12) | st.integers(-(2**70), 2**70)
floats = st.floats(allow_nan=True, allow_infinity=True) | st.floats(0, 3) | st.sampled_from(
    [0, 1e-320, 1e-4, 1e-3, 0.5, 1.0, 101.0, 1e308])
FIELDS = {
    "model": st.none() | st.sampled_from(["", "gpt-4", "MODEL"]) | text,
    "prompt": text | st.lists(ints, max_size=12) | st.lists(st.integers(0, 299), min_size=1,
                                                             max_size=80),
    "messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool", "robot"]) | junk,
         "content": text | st.lists(st.fixed_dictionaries({"type": st.just("text"),
                                                           "text": text}), max_size=3) | junk}),
        max_size=3) | junk,
    "max_tokens": ints | junk, "max_completion_tokens": ints,
    "temperature": floats | junk, "top_p": floats, "top_k": ints,
    "block_size": ints, "seed": ints,
    "stop": text | st.lists(text, max_size=6) | junk,
    "stream": st.booleans() | junk, "stream_options": st.fixed_dictionaries(
        {"include_usage": st.booleans() | junk}) | junk,
    "mode": st.sampled_from(["deer", "ar", "fast"]) | junk,
    "n": ints, "user": text | junk, "logprobs": junk, "unknown_field": junk,
}


@st.composite
def bodies(draw):
    """(path, raw bytes) of one request."""
    path = draw(st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
    kind = draw(st.integers(0, 9))
    if kind == 0:  # not JSON, or not an object, or absurdly nested
        raw = draw(st.binary(max_size=64) | st.sampled_from(
            [b"[" * 5000 + b"]" * 5000, b'{"prompt": "x"', b"null", b"[1,2]", b'"s"',
             b'{"prompt": 1e999}', b'{"prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}"]))
        return path, raw
    keys = draw(st.lists(st.sampled_from(sorted(FIELDS)), unique=True, max_size=8))
    body = {k: draw(FIELDS[k]) for k in keys}
    if kind >= 4:  # mostly well-formed: the field the endpoint needs, small budgets
        if path.endswith("chat/completions"):
            body["messages"] = [{"role": "user", "content": draw(text)}]
            body.pop("prompt", None)
        else:
            body["prompt"] = draw(text.filter(bool))
            body.pop("messages", None)
        body["max_tokens"] = draw(st.integers(1, 6))
        body.pop("max_completion_tokens", None)
    return path, json.dumps(body, allow_nan=True).encode()


@pytest.fixture(scope="module")
def app(service):
    a = deploy(service, APP, own_models=False, limits={"max_tokens": 6, "max_prompt_tokens": 64,
                                     "max_body_bytes": 16384})
    try:
        yield a
    finally:
        delete(a)


def check_answer(status: int, content_type: str, data: bytes, path: str, raw: bytes):
    assert status < 500, (status, raw[:300], data[:300])
    if status != 200:
        err = json.loads(data)
        assert set(err) == {"error"} and err["error"]["message"], (status, data[:300])
        return
    if content_type.startswith("text/event-stream"):
        events = [e for e in data.decode().split("\n\n") if e]
        assert events[-1] == "data: [DONE]", data[-300:]
        for e in events[:-1]:
            chunk = json.loads(e[6:])
            assert "error" not in chunk, (raw[:300], chunk)
        return
    body = json.loads(data)
    assert body["choices"] and body["usage"]["completion_tokens"] >= 0, body


def test_fuzz_the_http_api(app):
    import requests

    session = requests.Session()
    seen = {"cases": 0, "ok": 0, "statuses": {}}

    @settings(max_examples=N_CASES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(bodies())
    def case(req):
        path, raw = req
        r = session.post(app.http + path, data=raw, timeout=120,
                         headers={"Content-Type": "application/json"})
        seen["cases"] += 1
        seen["statuses"][r.status_code] = seen["statuses"].get(r.status_code, 0) + 1
        check_answer(r.status_code, r.headers.get("content-type", ""), r.content, path, raw)

    case()
    print(f"fuzz: {seen['cases']} HTTP cases, statuses {seen['statuses']}")
    assert seen["cases"] >= N_CASES
    assert seen["statuses"].get(200, 0) >= 100  # the valid part of the space was reached
    # still serving
    r = session.get(app.http + "/healthz", timeout=60)
    assert r.status_code == 200
    r = session.post(app.http + "/v1/completions", json={"prompt": "def f(x):\n",
                                                         "max_tokens": 4}, timeout=120)
    assert r.status_code == 200 and r.json()["choices"][0]["token_ids"]
