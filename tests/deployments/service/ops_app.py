"""Extra Serve applications for the reliability / security / observability tests.

They run beside the session's `deer` app (tests/deployments/service/conftest.py) in the same local Ray and
Serve instance, each under its own route prefix (`/NAME/v1/...`) and gRPC `application`
metadata, so a test module can kill its replicas or change its limits without touching the
other tests' app and without starting Ray again. Replicas ask for a tenth of a CPU each (the
session's Ray declares 4): tiny models, one torch thread each.
"""

from __future__ import annotations

import copy
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Optional

SMALL = {"num_cpus": 0.1, "num_gpus": 0}


@dataclass
class OpsApp:
    name: str
    http: str          # base URL with the route prefix: http://127.0.0.1:PORT/NAME
    grpc: str          # host:port of Serve's gRPC proxy
    model: str
    config: dict

    @property
    def metadata(self) -> tuple:
        return (("application", self.name),)

    def handle(self, deployment: str):
        from ray import serve

        return serve.get_deployment_handle(deployment, app_name=self.name)


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deploy(session, name: str, own_models: bool = True,
           models_from: tuple = ("deer", "Drafter", "Verifier"), **overrides) -> OpsApp:
    """An app from the session app's config + `overrides` (AppConfig fields). own_models=False:
    only a Router replica (its own limits, keys, tracing ...) over the session app's Drafter and
    Verifier deployments (handles passed to it): one new process instead of three.
    models_from: (app, drafter deployment, verifier deployment) whose handles such a Router
    gets."""
    from ray import serve

    from deployments.app import AppConfig, build_app

    config = merge({k: v for k, v in session.config.items()
                    if k not in ("drafter", "verifier", "router")},
                   {"drafter": {"ray_actor_options": SMALL, "max_ongoing_requests": 16},
                    "verifier": {"ray_actor_options": SMALL, "max_ongoing_requests": 16},
                    "router": {"ray_actor_options": SMALL, "max_ongoing_requests": 64}})
    config = merge(config, overrides)
    if own_models:
        app = build_app(config)
    else:
        from deployments.router import RouterSettings, make_ingress

        cfg = AppConfig.model_validate(config).resolved()
        settings = RouterSettings(
            served_model_name=cfg.served_model_name, tokenizer_path=cfg.tokenizer_path,
            block_size=cfg.block_size, limits=cfg.limits,
            drafter_timeout_s=cfg.drafter_timeout_s, verifier_timeout_s=cfg.verifier_timeout_s,
            max_concurrent_decodes=cfg.max_concurrent_decodes, **cfg.service.model_dump())
        handles = [serve.get_deployment_handle(d, app_name=models_from[0])
                   for d in models_from[1:]]
        app = serve.deployment(make_ingress(), name="Router", **cfg.router.options()).bind(
            *handles, settings.model_dump())
    serve.run(app, name=name, route_prefix=f"/{name}")
    return OpsApp(name=name, http=f"{session.http}/{name}", grpc=session.grpc,
                  model=session.model, config=config)


def plain_ar(target_path: str, prompts, max_tokens: int) -> dict:
    """{prompt: GenerationResult} of the target's plain greedy decoding, in-process, tokenized
    and detokenized as the service does: the reference the service's text must equal."""
    from transformers import AutoTokenizer

    from deer_serve.engine import generate
    from deer_serve.targets.hf import HFTarget
    from deer_serve.types import SamplingParams

    tok = AutoTokenizer.from_pretrained(target_path)
    target = HFTarget.from_pretrained(target_path, device="cpu")
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    return {p: generate(target, None, tok.encode(p, add_special_tokens=False),
                        SamplingParams(max_new_tokens=max_tokens), mode="ar", detokenize=decode)
            for p in prompts}


def delete(app: OpsApp) -> None:
    from ray import serve

    try:
        serve.delete(app.name)
    except Exception:
        pass


def replica_actors(app: str, deployment: str) -> list[str]:
    """Names of the live replica actors of `app`'s `deployment` (namespace "serve")."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(prefix))


def kill_replica(app: str, deployment: str, busiest_since: Optional[dict] = None) -> str:
    """Kill a replica of `deployment`: with `busiest_since` (an earlier Router.ops_state), the
    one that answered the most calls since then (a replica the Router has not started to use
    yet would die without anyone noticing), else the first."""
    import ray

    names = replica_actors(app, deployment)
    name = names[0]
    if busiest_since is not None:
        role = deployment.lower()
        before = busiest_since["replica_calls"][role]
        # A call is counted when it returns: the streams' first tokens (their prefill) can
        # come before the first draft has returned on a slow machine, so wait for one.
        t_end = time.monotonic() + 120.0
        while True:
            now = serve_handle(app, "Router").ops_state.remote().result(timeout_s=30)
            calls = {rid: n - before.get(rid, 0) for rid, n in now["replica_calls"][role].items()}
            live = [n for n in names if calls.get(n.rsplit("#", 1)[1], 0) > 0]
            if live or time.monotonic() > t_end:
                break
            time.sleep(0.02)
        assert live, f"no live {deployment} replica has answered the Router since: {calls}"
        name = max(live, key=lambda n: calls[n.rsplit("#", 1)[1]])
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    return name


def serve_handle(app: str, deployment: str):
    from ray import serve

    return serve.get_deployment_handle(deployment, app_name=app)


def wait_replicas(app: str, deployment: str, n: int, timeout: float = 600.0) -> None:
    from ray import serve

    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        st = serve.status().applications.get(app)
        if st is not None and st.status == "RUNNING":
            d = st.deployments[deployment]
            if d.replica_states.get("RUNNING", 0) >= n and len(replica_actors(app, deployment)) >= n:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{app}/{deployment}: fewer than {n} replicas after {timeout} s")


def http(method: str, url: str, body=None, headers: Optional[dict] = None, raw: bool = False,
         timeout: float = 120.0) -> tuple[int, dict, dict]:
    """(status, JSON body, headers)."""
    data = None if body is None else (body if raw else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        raw_body = e.read()
        try:
            parsed = json.loads(raw_body)
        except ValueError:
            parsed = {"raw": raw_body.decode(errors="replace")}
        return e.code, parsed, dict(e.headers)


def metrics_port() -> int:
    """The metrics export port of this (only) Ray node."""
    import ray

    return int(ray._private.worker.global_worker.node.metrics_export_port)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        return r.read().decode()
