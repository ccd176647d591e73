"""The decode loop's transport on a live app with 2 Drafter and 2 Verifier replicas:

- affinity (on by default): every draft and verify call of one request lands on the same
  replica of each pool (Serve's consistent-hash router, the request id as session), read from
  the `deer.replica` attribute of the request's spans; without it Serve's power-of-two-choices
  spreads a request's ~10 calls over both replicas;
- every transport setting (channel / object store, argmax replies / logits) gives the plain
  AR text at temperature 0, and sampled requests (which need the logits) still work;
- `loop: colocated` (the loop in a Verifier replica with its own drafter) gives the same text,
  and a client that goes away stops that loop.
"""

from __future__ import annotations

import pytest

from ops_app import delete, deploy, http, plain_ar

pytestmark = [pytest.mark.service, pytest.mark.slow]

PROMPTS = ["def add(a, b):\n", "for i in range(10):\n", "class Stack:\n", "import os\n",
           "while True:\n", "print('x')\n"]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def app(service):
    a = deploy(service, "transport", drafter={"num_replicas": 2}, verifier={"num_replicas": 2},
               service={"tracing": {"exporter": "memory"}})
    try:
        yield a
    finally:
        delete(a)


@pytest.fixture(scope="module")
def reference(service):
    return {p: r.token_ids for p, r in plain_ar(service.target_path, PROMPTS, MAX_TOKENS).items()}


def complete(app, prompt: str, **kw) -> tuple[dict, str]:
    status, body, headers = http("POST", app.http + "/v1/completions",
                                 {"prompt": prompt, "max_tokens": MAX_TOKENS, **kw})
    assert status == 200, body
    return body, {k.lower(): v for k, v in headers.items()}.get("x-trace-id")


def replicas_of(app, trace_id: str) -> dict[str, set]:
    spans = app.handle("Router").recent_spans.remote(trace_id).result(timeout_s=30)
    out: dict[str, set] = {"draft": set(), "verify": set()}
    for s in spans:
        name = "verify" if s["name"] == "prefill" else s["name"]
        if name in out:
            out[name].add(s["attributes"]["deer.replica"])
    return out


def test_affinity_keeps_each_request_on_one_replica_per_pool(app, reference):
    seen = {"draft": set(), "verify": set()}
    for p in PROMPTS:
        body, trace = complete(app, p, temperature=0)
        assert body["choices"][0]["token_ids"] == reference[p], p
        assert body["deer"]["cycles"] >= 3, body["deer"]  # several calls to each pool
        reps = replicas_of(app, trace)
        assert len(reps["verify"]) == 1 and len(reps["draft"]) == 1, (p, reps)
        for k in seen:
            seen[k] |= reps[k]
    print(f"affinity: {len(PROMPTS)} requests used verifier replicas {sorted(seen['verify'])}, "
          f"drafter replicas {sorted(seen['draft'])}")


@pytest.mark.parametrize("service_opts", [
    {"transport": "object-store", "affinity": False},
    {"transport": "object-store", "affinity": True},
    {"transport": "channel", "affinity": False},
    {"transport": "channel", "affinity": True, "pipeline": True},
], ids=["object-store", "object-store+affinity", "channel", "channel+affinity+pipeline"])
def test_every_transport_gives_the_plain_ar_text(service, reference, service_opts):
    a = deploy(service, "transport-alt", own_models=False,
               service={"tracing": {"exporter": "memory"}, **service_opts})
    try:
        for p in PROMPTS[:3]:
            body, _ = complete(a, p, temperature=0)
            assert body["choices"][0]["token_ids"] == reference[p], (service_opts, p)
        body, _ = complete(a, PROMPTS[0], temperature=0.8, seed=1)  # logits needed here
        assert len(body["choices"][0]["token_ids"]) >= 1
    finally:
        delete(a)


def test_sampled_requests_get_logits_and_stay_seeded(app):
    a, _ = complete(app, PROMPTS[1], temperature=0.8, seed=7)
    b, _ = complete(app, PROMPTS[1], temperature=0.8, seed=7)
    assert a["choices"][0]["token_ids"] == b["choices"][0]["token_ids"]


def test_the_colocated_loop_gives_the_plain_ar_text_and_its_stats(service, reference):
    """`loop: colocated`: one streaming call per request segment, the Verifier replica drafts
    with its own drafter. Greedy text is plain AR's, streamed or not, pipelined or not; stop
    strings hold."""
    import openai

    # a Verifier that holds a drafter: an app of its own
    a = deploy(service, "transport-vloop", service={"loop": "colocated"})
    try:
        for p in PROMPTS[:3]:
            body, _ = complete(a, p, temperature=0)
            assert body["choices"][0]["token_ids"] == reference[p], p
            d = body["deer"]
            # every cycle but a last plain step (no room left for a draft) accepted drafts
            assert d["accept_lengths"] and d["cycles"] - len(d["accept_lengths"]) in (0, 1), d
            assert not d["fallback"]
        piped, _ = complete(a, PROMPTS[2], temperature=0, pipeline=True)
        assert piped["choices"][0]["token_ids"] == reference[PROMPTS[2]]
        assert piped["deer"]["pipeline_hits"] + piped["deer"]["pipeline_misses"] > 0, piped["deer"]
        client = openai.OpenAI(base_url=a.http + "/v1", api_key="unused", max_retries=0)
        ids = []
        for chunk in client.completions.create(model=a.model, prompt=PROMPTS[3],
                                               max_tokens=MAX_TOKENS, temperature=0, stream=True):
            ids += chunk.choices[0].token_ids if chunk.choices else []
        assert ids == reference[PROMPTS[3]]
        ar, _ = complete(a, PROMPTS[4], temperature=0, mode="ar")
        assert ar["choices"][0]["token_ids"] == reference[PROMPTS[4]]
        full, _ = complete(a, PROMPTS[0], temperature=0)
        text = full["choices"][0]["text"]
        stop = text[len(text) // 2: len(text) // 2 + 3]
        if stop.strip():
            cut, _ = complete(a, PROMPTS[0], temperature=0, stop=[stop])
            assert cut["choices"][0]["text"] == text[:text.find(stop)]
            assert cut["choices"][0]["finish_reason"] == "stop"
        s1, _ = complete(a, PROMPTS[1], temperature=0.8, seed=3)
        s2, _ = complete(a, PROMPTS[1], temperature=0.8, seed=3)
        assert s1["choices"][0]["token_ids"] == s2["choices"][0]["token_ids"]
    finally:
        delete(a)


def test_a_client_that_goes_away_stops_the_loop_in_the_verifier(service):
    """`loop: colocated`: closing the HTTP stream cancels the Verifier's decode stream, and the
    loop stops (no more verify forwards), rather than running on to max_tokens."""
    import http.client as httpclient
    import json
    import time
    from urllib.parse import urlparse

    DEADLINE_S = 120.0  # how long the test waits for a condition before it fails

    # a request long enough (1792 tokens, each its own verifier call) that running on to
    # max_tokens is told apart from stopping by the count of verifier calls alone
    a = deploy(service, "transport-cancel", service={"loop": "colocated"},
               limits={"max_tokens": 1792})
    verifier, router = a.handle("Verifier"), a.handle("Router")
    try:
        def served() -> int:
            return int(verifier.batch_stats.remote().result(timeout_s=30).get("items", 0))

        def cancelled() -> int:
            return router.ops_state.remote().result(timeout_s=30)["cancelled"]

        req = {"prompt": PROMPTS[0], "max_tokens": 1792, "temperature": 0, "block_size": 1}
        n_full0 = served()
        status, body, _ = http("POST", a.http + "/v1/completions", req)
        assert status == 200, body
        n_full = served() - n_full0
        assert n_full > 20 and len(body["choices"][0]["token_ids"]) == 1792
        c0, n0 = cancelled(), served()
        u = urlparse(a.http)
        conn = httpclient.HTTPConnection(u.hostname, u.port, timeout=60)
        conn.request("POST", u.path + "/v1/completions", json.dumps({**req, "stream": True}),
                     {"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200
        r.fp.readline()  # the first event: the loop is running
        conn.sock.shutdown(2)
        conn.close()
        t_end = time.monotonic() + DEADLINE_S
        while cancelled() == c0:  # the Router saw the client go
            assert time.monotonic() < t_end, "the Router never cancelled the request"
            time.sleep(0.05)
        # then the verifier's count settles (a loop that ran on would keep it moving until it
        # reached the full request's count): two equal readings a second apart
        last = served()
        while True:
            time.sleep(1.0)
            now = served()
            if now == last:
                time.sleep(1.0)
                if served() == now:
                    break
            assert time.monotonic() < t_end, "the verifier's call count never settled"
            last = served()
        n_cancelled = now - n0
        print(f"full request: {n_full} verifier calls; the cancelled one: {n_cancelled}")
        assert n_cancelled < n_full, \
            f"the verifier ran the cancelled request to its end ({n_cancelled} calls)"
    finally:
        delete(a)
