"""`service.loop: vllm`: each Verifier replica runs vLLM's AsyncLLM over the target with the
shipped DFlash drafter inside vLLM (its native DFlash proposer), and every request segment is
one streaming call to it (deployments.vllm_loop). Real local Ray, real vLLM, the official
`openai` client:

* concurrent greedy requests (deer, mode ar, one with a stop string) give the token ids and
  text of in-process plain AR decoding (HFTarget), and drafts were accepted;
* a streamed request gives the same text and token ids;
* a client that goes away aborts its request in vLLM (the replica's counters and vLLM's own
  count of unfinished requests), waited for on the counters, never on wall-clock windows;
* a config whose drafter is not in DFlash format is refused with the reason.

One app, one vLLM engine (start ~50 s on 2 cores). When the session already runs Ray and Serve
(tests/deployments/service's session fixture), the app is deployed beside it under its own route prefix;
otherwise Ray is started here as tests/deer_serve/vllm/test_vllm_service.py does it.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Optional

import pytest

from tiny_models import REPO

# vLLM missing: a failure, not a skip (tests/deer_serve/vllm/conftest.py)
pytest.importorskip("ray")
pytest.importorskip("openai")

pytestmark = [pytest.mark.slow, pytest.mark.service]

HERE = Path(__file__).resolve().parent
APP, PREFIX = "deer-vllm-loop", "/vllm-loop"
K, MAX_TOKENS = 8, 40
# k by the step's batch size (vLLM's dynamic speculative decoding): the 6 concurrent requests of
# the first test decode plain steps while 4 or more are in the batch, drafts when fewer
SCHEDULE = [[1, 3, K], [4, 64, 0]]
DEADLINE_S = 120.0  # how long a test waits for a counter before it fails
PROMPTS = [json.loads(line)["prompt"] for line in
           (HERE / "code_prompts.jsonl").read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pair():
    from deer_serve.assets import ASSETS_DIR, is_checkpoint

    target, drafter = ASSETS_DIR / "target", ASSETS_DIR / "drafter-dflash"
    if not is_checkpoint(target):
        pytest.fail(f"the embedded target is missing ({target})")
    if not (drafter / "config.json").is_file():
        pytest.fail(f"the shipped DFlash drafter is missing ({drafter})")
    return str(target), str(drafter)


def app_config(target: str, drafter: str, verifier: Optional[dict] = None,
               service: Optional[dict] = None) -> dict:
    """The module's app: `loop: vllm`, the schedule above; `verifier`, `service`: more
    Verifier and service options."""
    small = {"ray_actor_options": {"num_cpus": 0.25}}
    return {"target_path": target, "drafter_path": drafter, "device": "cpu",
            "block_size": K, "limits": {"max_tokens": 2000},
            "service": {"loop": "vllm", "vllm_spec_schedule": SCHEDULE,
                        "vllm_stream_interval": 4, **(service or {})},
            "verifier": {**small, **(verifier or {})}, "router": small}


@pytest.fixture(scope="module")
def vllm_loop_app(pair):
    import ray
    from ray import serve

    from deployments.app import build_app

    target, drafter = pair
    own = not ray.is_initialized()
    if own:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")
        pythonpath = os.pathsep.join([str(REPO)] + ([os.environ["PYTHONPATH"]]
                                                    if os.environ.get("PYTHONPATH") else []))
        for i in range(3):  # as tests/deployments/service/conftest.start_ray: a loaded machine starts slowly
            try:
                ray.init(address="local", num_cpus=4, include_dashboard=False,
                         object_store_memory=256 << 20, log_to_driver=False,
                         runtime_env={"env_vars": {"PYTHONPATH": pythonpath,
                                                   "OMP_NUM_THREADS": "1"}})
                break
            except Exception:
                ray.shutdown()
                if i == 2:
                    raise
        from ray.serve.config import gRPCOptions

        serve.start(http_options={"host": "127.0.0.1", "port": free_port()},
                    grpc_options=gRPCOptions(port=free_port(), grpc_servicer_functions=[
                        "deer_serve.protos.deer_pb2_grpc.add_DeerServiceServicer_to_server"]))
    from ray.serve.context import _get_global_client

    port = _get_global_client().http_config.port
    try:
        serve.run(build_app(app_config(target, drafter)), name=APP, route_prefix=PREFIX)
        yield f"http://127.0.0.1:{port}{PREFIX}", Path(target).name
    finally:
        try:
            serve.delete(APP)
        finally:
            if own:
                serve.shutdown()
                ray.shutdown()


@pytest.fixture(scope="module")
def client(vllm_loop_app):
    import openai

    url, _ = vllm_loop_app
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)


def ar_reference(target: str, max_tokens: int) -> dict:
    """prompt -> in-process plain AR (torch HFTarget), greedy, `max_tokens`."""
    from transformers import AutoTokenizer

    from deer_serve.engine import generate
    from deer_serve.targets.hf import HFTarget
    from deer_serve.types import SamplingParams

    tok = AutoTokenizer.from_pretrained(target)
    t = HFTarget.from_pretrained(target, device="cpu")
    return {p: generate(t, None, tok.encode(p, add_special_tokens=False),
                        SamplingParams(max_new_tokens=max_tokens), mode="ar",
                        detokenize=lambda ids: tok.decode(ids, skip_special_tokens=True))
            for p in PROMPTS}


@pytest.fixture(scope="module")
def reference(pair):
    return ar_reference(pair[0], MAX_TOKENS)


def engine_stats(app: str = APP) -> dict:
    from ray import serve

    h = serve.get_deployment_handle("Verifier", app_name=app)
    return h.engine_stats.remote().result(timeout_s=60)


def wait_for(pred, app: str = APP) -> dict:
    t_end = time.monotonic() + DEADLINE_S
    while True:
        s = engine_stats(app)
        if pred(s) or time.monotonic() > t_end:
            return s
        time.sleep(0.05)


def test_concurrent_greedy_requests_equal_plain_ar(vllm_loop_app, client, reference):
    _, model = vllm_loop_app
    before = engine_stats()
    assert before["engine"] == "vllm" and before["block_size"] == K
    # a stop string: the second line of the first prompt's greedy completion
    stop_prompt = PROMPTS[0]
    ref_text = reference[stop_prompt].text
    stop = ref_text[ref_text.index("\n") + 1:][:6]
    assert stop and stop in ref_text
    jobs = [(p, "deer", None) for p in PROMPTS] + [(PROMPTS[1], "ar", None),
                                                   (stop_prompt, "deer", stop)]
    out: dict = {}
    go = threading.Barrier(len(jobs), timeout=300)

    def one(i, prompt, mode, stop):
        try:
            go.wait()
            r = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS,
                                          temperature=0, stop=stop, extra_body={"mode": mode})
            out[i] = r.choices[0], r.model_extra["deer"]
        except Exception as e:  # noqa: BLE001 - reported below
            out[i] = e

    threads = [threading.Thread(target=one, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (prompt, mode, stop) in enumerate(jobs):
        assert not isinstance(out[i], Exception), out[i]
        choice, deer = out[i]
        ref = reference[prompt]
        assert not deer["fallback"]
        if stop is None:
            assert choice.token_ids == ref.token_ids, (i, mode)
            assert choice.text == ref.text
            assert choice.finish_reason == ref.finish_reason
        else:  # cut as deer-serve's own loops cut: the text before the stop string
            assert choice.text == ref.text[:ref.text.index(stop)]
            assert choice.finish_reason == "stop"
            n = len(choice.token_ids)
            assert choice.token_ids == ref.token_ids[:n] and n < len(ref.token_ids)
    after = wait_for(lambda s: s["finished"] - before["finished"] >= len(jobs))
    assert after["finished"] - before["finished"] == len(jobs), after
    assert after["started"] - before["started"] == len(jobs)
    assert after["running"] == 0 and after["vllm_unfinished"] == 0
    assert after["aborted"] == before["aborted"]
    assert after["peak_running"] >= 2, "concurrent requests should share vLLM's batch"
    # (whether the batch above drafted depends on how the requests arrived: 4 or more in the
    # batch decode plain steps, so its spec_steps are not asserted; the lone request's are)
    # one request alone drafts with k = K: its exact per-step counts (vLLM's, the outputs merge
    # with stream_interval 4) show drafts accepted, and one count per verify step
    solo = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=MAX_TOKENS,
                                     temperature=0)
    acc = solo.model_extra["deer"]["accept_lengths"]
    assert solo.choices[0].token_ids == reference[PROMPTS[0]].token_ids
    assert sum(acc) > 0 and all(0 <= a <= K for a in acc), acc
    assert len(acc) >= (MAX_TOKENS - 1) // (K + 1) and sum(acc) + len(acc) <= MAX_TOKENS - 1 + K
    alone = wait_for(lambda s: s["spec_steps"] > after["spec_steps"])
    assert alone["spec_steps"] > after["spec_steps"], alone  # vLLM's own count of verify steps
    assert alone["spec_accepted"] > after["spec_accepted"], alone


def test_streaming_gives_the_same_tokens(vllm_loop_app, client, reference):
    _, model = vllm_loop_app
    prompt = PROMPTS[2]
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS,
                                       temperature=0, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    ids = [t for c in chunks if c.choices for t in (c.choices[0].model_extra or {}).get(
        "token_ids", []) or []]
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # it streamed
    assert text == reference[prompt].text
    if ids:  # token_ids: deer-serve's extension, when the chunks carry it
        assert ids == reference[prompt].token_ids


def test_a_cancelled_stream_is_aborted_in_vllm(vllm_loop_app, client):
    _, model = vllm_loop_app
    before = engine_stats()
    stream = client.completions.create(model=model, prompt=PROMPTS[3], max_tokens=2000,
                                       temperature=0, stream=True)
    n = 0
    for _chunk in stream:
        n += 1
        if n == 3:
            break
    live = engine_stats()
    assert live["running"] == 1 and live["vllm_unfinished"] == 1, live  # it is in vLLM now
    stream.close()  # the client goes away
    after = wait_for(lambda s: s["aborted"] > before["aborted"] and s["vllm_unfinished"] == 0)
    assert after["aborted"] == before["aborted"] + 1, after
    assert after["running"] == 0 and after["vllm_unfinished"] == 0, after
    assert after["finished"] == before["finished"]  # it did not run to its 2000 tokens


def test_loop_vllm_refuses_a_drafter_not_in_dflash_format(pair):
    from deer_serve.assets import default_paths
    from deployments.app import build_app

    target, _ = pair
    _, deer_drafter = default_paths()  # the embedded DeerDrafter
    with pytest.raises(ValueError, match="DFlash-format drafter"):
        build_app({"target_path": target, "drafter_path": str(deer_drafter),
                   "service": {"loop": "vllm"}})


# ---- `service.ingress: verifier`: one deployment, each Verifier replica its own ingress -------
INGRESS_APP, INGRESS_PREFIX = "deer-vllm-ingress", "/vllm-ingress"


@pytest.fixture
def ingress_app(vllm_loop_app, pair):
    """A second app beside the module's, for one test (its engine gone before the next): the
    same loop with `service.ingress: verifier`."""
    from ray import serve
    from ray.serve.context import _get_global_client

    from deployments.app import build_app

    serve.run(build_app(app_config(*pair, service={"ingress": "verifier"})), name=INGRESS_APP,
              route_prefix=INGRESS_PREFIX)
    try:
        details = _get_global_client().get_serve_details()
        url = f"http://127.0.0.1:{details['http_options']['port']}{INGRESS_PREFIX}"
        yield url, f"127.0.0.1:{details['grpc_options']['port']}"
    finally:
        serve.delete(INGRESS_APP)


def test_the_verifier_as_its_own_ingress_serves_http_and_grpc_with_plain_ar_ids(
        ingress_app, pair, reference):
    """`service.ingress: verifier`: the app is ONE deployment (no Router); concurrent greedy
    requests over HTTP (deer and ar, one streamed) and gRPC give plain AR's ids and text, and
    a stream whose client goes away is aborted in the replica's vLLM engine."""
    import grpc
    import openai
    from ray import serve

    from deer_serve.protos import deer_pb2, deer_pb2_grpc

    url, grpc_addr = ingress_app
    model = Path(pair[0]).name
    deployments = serve.status().applications[INGRESS_APP].deployments
    assert set(deployments) == {"Verifier"}, set(deployments)
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    before = engine_stats(INGRESS_APP)
    jobs = [(p, "deer", False) for p in PROMPTS] + [(PROMPTS[1], "ar", False),
                                                   (PROMPTS[2], "deer", True)]
    out: dict = {}
    go = threading.Barrier(len(jobs) + 1, timeout=300)

    def one(i, prompt, mode, stream):
        try:
            go.wait()
            kw = dict(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                      extra_body={"mode": mode})
            if stream:
                chunks = [c for c in client.completions.create(stream=True, **kw) if c.choices]
                out[i] = ("".join(c.choices[0].text for c in chunks),
                          [t for c in chunks for t in c.choices[0].model_extra["token_ids"]])
            else:
                r = client.completions.create(**kw)
                out[i] = r.choices[0].text, r.choices[0].token_ids
        except Exception as e:  # noqa: BLE001 - reported below
            out[i] = e

    def over_grpc():
        try:
            go.wait()
            with grpc.insecure_channel(grpc_addr) as ch:
                r = deer_pb2_grpc.DeerServiceStub(ch).Generate(
                    deer_pb2.GenerateRequest(prompt=PROMPTS[3], max_tokens=MAX_TOKENS),
                    metadata=(("application", INGRESS_APP),), timeout=300)
            out["grpc"] = r.text, list(r.token_ids)
        except Exception as e:  # noqa: BLE001 - reported below
            out["grpc"] = e

    threads = [threading.Thread(target=one, args=(i, *job)) for i, job in enumerate(jobs)]
    threads.append(threading.Thread(target=over_grpc))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (prompt, *_) in [*enumerate(jobs), ("grpc", (PROMPTS[3],))]:
        assert not isinstance(out[i], Exception), (i, out[i])
        assert out[i] == (reference[prompt].text, reference[prompt].token_ids), i
    n = len(jobs) + 1
    after = wait_for(lambda s: s["finished"] - before["finished"] >= n, INGRESS_APP)
    assert after["finished"] - before["finished"] == n and after["peak_running"] >= 2, after
    # a client that goes away: its request is aborted in vLLM
    stream = client.completions.create(model=model, prompt=PROMPTS[3], max_tokens=2000,
                                       temperature=0, stream=True)
    for n_chunks, _chunk in enumerate(stream, 1):
        if n_chunks == 3:
            break
    assert engine_stats(INGRESS_APP)["vllm_unfinished"] == 1
    stream.close()
    gone = wait_for(lambda s: s["aborted"] > after["aborted"] and s["vllm_unfinished"] == 0,
                    INGRESS_APP)
    assert gone["aborted"] == after["aborted"] + 1 and gone["running"] == 0, gone
    assert gone["finished"] == after["finished"]


def test_ingress_verifier_needs_loop_vllm():
    from deployments.app import AppConfig

    with pytest.raises(ValueError, match="ingress 'verifier' needs loop 'vllm'"):
        AppConfig.model_validate({"service": {"loop": "router", "ingress": "verifier"}})


# ---- last in the module: it kills the app's one Verifier replica ---------------------------------
KILL_TOKENS = 800  # long: every stream is far from its end when the replica dies


@pytest.fixture(scope="module")
def long_reference(pair):
    return ar_reference(pair[0], KILL_TOKENS)  # the streams the kill test cuts


def verifier_replicas() -> list[str]:
    import ray

    prefix = f"SERVE_REPLICA::{APP}#Verifier#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(prefix))


def test_killing_the_verifier_replica_gives_full_text_or_a_retriable_error(
        vllm_loop_app, client, reference, long_reference):
    """The default config's loop under a replica crash: the app's one Verifier replica (its
    vLLM engine inside) is killed (`ray.kill`, SIGKILL) once every one of 4 long streams has
    its first tokens. Every stream ends with its full plain-AR text (resumed from its token ids
    on the replica Serve starts in its place) or a retriable error (`verifier_unavailable` /
    503) after a correct prefix, never a hang; the kill hits streams (resumes or errors counted
    by the Router); the dead replica's vLLM engine processes exit with it (none left behind);
    and the replacement replica serves the plain-AR text."""
    import openai
    import psutil
    import ray
    from ray import serve

    _, model = vllm_loop_app
    (name,) = verifier_replicas()
    stats = engine_stats()
    engines = [psutil.Process(pid) for pid in stats["engine_pids"]]
    assert engines, "the replica runs its vLLM engine core in a child process"
    assert all(e.ppid() == stats["pid"] for e in engines)
    assert all(len(long_reference[p].token_ids) > 100 for p in PROMPTS)  # far from their end
    router = serve.get_deployment_handle("Router", app_name=APP)
    state0 = router.ops_state.remote().result(timeout_s=60)
    started = threading.Barrier(len(PROMPTS) + 1, timeout=300)
    out: dict = {}

    def one(prompt):
        ids, text, error, first = [], "", None, True
        try:
            for chunk in client.completions.create(model=model, prompt=prompt,
                                                   max_tokens=KILL_TOKENS, temperature=0,
                                                   stream=True):
                for ch in chunk.choices:
                    text += ch.text
                    ids += (ch.model_extra or {}).get("token_ids") or []
                if first and ids:
                    first = False
                    started.wait()
        except Exception as e:  # noqa: BLE001 - judged below
            error = e
        finally:
            if first:
                started.abort()
        out[prompt] = ids, text, error

    threads = [threading.Thread(target=one, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    started.wait()
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    for t in threads:
        t.join(timeout=600)
        assert not t.is_alive(), "a stream hung after the kill"
    full, retriable = 0, 0
    for p in PROMPTS:
        ids, text, error = out[p]
        ref = long_reference[p]
        if error is None:
            assert ids == ref.token_ids and text == ref.text, p
            full += 1
        else:  # mid-stream: OpenAI's error object, code verifier_unavailable
            assert isinstance(error, openai.APIError), repr(error)
            body = error.body if isinstance(error.body, dict) else {}
            assert body.get("code") == "verifier_unavailable" or \
                getattr(error, "status_code", None) == 503, repr(error)
            assert ids == ref.token_ids[:len(ids)]  # what came before it is right
            retriable += 1
    state = router.ops_state.remote().result(timeout_s=60)
    resumed = state["resumed"] - state0["resumed"]
    print(f"verifier kill: {full} full and correct, {retriable} retriable errors, "
          f"{resumed} resumes")
    assert full + retriable == len(PROMPTS)
    assert retriable + resumed >= 1, "the kill hit no stream"
    # the dead replica's engine core does not outlive it (an event: the processes' exit)
    _, alive = psutil.wait_procs(engines, timeout=DEADLINE_S)
    assert not alive, f"vLLM engine processes left behind: {alive}"
    # Serve replaces the replica; the new one serves the right text
    t_end = time.monotonic() + 600
    while True:
        names = verifier_replicas()
        app = serve.status().applications.get(APP)
        if (names and name not in names and app is not None and app.status == "RUNNING"
                and app.deployments["Verifier"].status == "HEALTHY") \
                or time.monotonic() > t_end:
            break
        time.sleep(0.5)
    assert names and name not in names, names
    r = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=MAX_TOKENS,
                                  temperature=0)
    assert r.choices[0].token_ids == reference[PROMPTS[0]].token_ids


def test_the_verifier_pool_scales_out_on_ongoing_streams(vllm_loop_app, pair, client, reference,
                                                         long_reference):
    """The loop's replicas under Serve's autoscaling (its own rule: ongoing requests per
    replica; each request's segment is one streaming call to a Verifier replica, so a replica
    holding vLLM's batch counts every stream in it). The app is redeployed with
    `verifier.autoscaling_config` {min 1, max 2, target_ongoing_requests 1}; 4 long streams
    make Serve start a second replica (its own vLLM engine), waited for on the deployment's
    replica states; every stream gives plain AR's text; then concurrent short requests reach
    both replicas (each replica's own counters, read through the handle) and give plain AR's
    ids. Power: with target_ongoing_requests 64 no second replica starts and the test fails on
    the replica count."""
    from ray import serve

    from deployments.app import build_app

    target, drafter = pair
    _, model = vllm_loop_app
    scaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
               "upscale_delay_s": 0, "downscale_delay_s": 3600, "metrics_interval_s": 0.5,
               "look_back_period_s": 2}
    serve.run(build_app(app_config(target, drafter, {"autoscaling_config": scaling})),
              name=APP, route_prefix=PREFIX)
    first = {s["pid"] for s in (engine_stats() for _ in range(8))}
    assert len(first) == 1, first  # one replica before the load

    def replicas() -> dict:  # {"RUNNING": n, "STARTING": m, ...}
        app = serve.status().applications.get(APP)
        dep = app.deployments.get("Verifier") if app is not None else None
        return dict(dep.replica_states or {}) if dep is not None else {}

    out: dict = {}

    def stream(prompt):
        ids, text = [], ""
        for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=KILL_TOKENS,
                                               temperature=0, stream=True):
            for ch in chunk.choices:
                text += ch.text
                ids += (ch.model_extra or {}).get("token_ids") or []
        out[prompt] = ids, text

    threads = [threading.Thread(target=stream, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    most = 0  # the most replicas (any state) seen while the streams ran
    while any(t.is_alive() for t in threads):
        most = max(most, sum(replicas().values()))
        time.sleep(0.5)
    for t in threads:
        t.join()
    assert most == 2, f"Serve did not scale the Verifier pool out under 4 streams ({most})"
    t_end = time.monotonic() + 600  # the new replica starts its vLLM engine: about a minute
    while replicas().get("RUNNING", 0) < 2 and time.monotonic() < t_end:
        time.sleep(0.5)
    assert replicas().get("RUNNING", 0) == 2, replicas()
    for p in PROMPTS:
        assert out[p] == (long_reference[p].token_ids, long_reference[p].text), p

    def started() -> dict:  # requests go to either replica: read both replicas' counters
        seen: dict = {}
        for _ in range(40):
            s = engine_stats()
            seen.setdefault(s["pid"], s["started"])
            if len(seen) == 2:
                break
        return seen

    before = started()
    assert len(before) == 2, before
    got: dict = {}

    def short(i, prompt):
        r = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS,
                                      temperature=0)
        got[i] = prompt, r.choices[0].token_ids

    jobs = [threading.Thread(target=short, args=(i, PROMPTS[i % len(PROMPTS)])) for i in range(8)]
    for t in jobs:
        t.start()
    for t in jobs:
        t.join(timeout=600)
    assert len(got) == 8 and all(ids == reference[p].token_ids for p, ids in got.values())
    after = started()
    assert after.keys() == before.keys()
    served = {pid: after[pid] - before[pid] for pid in before}
    assert sum(served.values()) == 8 and all(v > 0 for v in served.values()), served
