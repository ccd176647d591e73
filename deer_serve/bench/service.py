"""Service methods of the bench (`deer-ray`, `deer-ray-nopipe`, `deer-ray-engine`): an HTTP
client for a running deer-serve app, and `local_service`, which starts one in this process
through the service side's plugin (`deer_serve.plugins`; `deployments.bench_service` starts Ray and the app).

The service is driven through its OpenAI-compatible HTTP API, as a user would: POST
/v1/completions with the prompt as token ids (so every method sees the same ids) and the
extension fields `mode`, `block_size` and `pipeline` (false = pipelining off for this request).
The response's `choices[0].token_ids` are the new tokens; its `deer` object gives
`accept_lengths` and `cycles`, and, when the service reports them, `pipeline_hits` /
`pipeline_misses` and a per-cycle `timings` dict (seconds: draft, verify, transport, waiting).
A service that ignores `pipeline` (no pipeline counters in its answer) is reported as such.

This module is stdlib-only: Ray and `deployments` are imported only by the plugin, and only
when a local service is started.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from typing import Optional, Sequence
from urllib.parse import urlparse

from deer_serve.bench.methods import Sample, cut_at_eos
from deer_serve.types import SamplingParams


class ServiceError(RuntimeError):
    pass


class ServiceClient:
    """A minimal keep-alive HTTP client (one connection per thread; stdlib only)."""

    def __init__(self, url: str, timeout_s: float = 600.0):
        u = urlparse(url if "://" in url else f"http://{url}")
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"--url must be http://HOST:PORT, got {url!r}")
        self.host, self.port, self.timeout_s = u.hostname, u.port or 80, timeout_s
        self.prefix = u.path.rstrip("/")
        self._local = threading.local()

    def _conn(self) -> http.client.HTTPConnection:
        c = getattr(self._local, "conn", None)
        if c is None:
            c = self._local.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        return c

    def request(self, method: str, path: str, body: Optional[dict] = None) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        for attempt in (0, 1):  # a kept-alive connection the server closed: reconnect once
            c = self._conn()
            try:
                c.request(method, self.prefix + path, body=data, headers=headers)
                r = c.getresponse()
                raw = r.read()
                break
            except (http.client.HTTPException, ConnectionError, TimeoutError, OSError):
                c.close()
                self._local.conn = None
                if attempt:
                    raise
        try:
            return r.status, json.loads(raw or b"{}")
        except json.JSONDecodeError:
            return r.status, {"raw": raw[:500].decode(errors="replace")}

    def healthy(self) -> bool:
        try:
            return self.request("GET", "/healthz")[0] == 200
        except OSError:
            return False

    def complete(self, prompt_ids: Sequence[int], sampling: SamplingParams, block_size: int,
                 pipeline: bool) -> dict:
        body = {"prompt": [int(t) for t in prompt_ids], "max_tokens": sampling.max_new_tokens,
                "temperature": sampling.temperature, "top_p": sampling.top_p,
                "top_k": sampling.top_k, "seed": sampling.seed, "block_size": block_size,
                "mode": "deer", "pipeline": pipeline}
        status, out = self.request("POST", "/v1/completions", {k: v for k, v in body.items()
                                                               if v is not None})
        if status != 200:
            raise ServiceError(f"POST /v1/completions -> {status}: {json.dumps(out)[:300]}")
        return out


class ServiceMethod:
    """`deer-ray` (pipeline as the service has it), `deer-ray-nopipe` (pipeline off) or
    `deer-ray-engine` (a second app beside the local one, with `service.loop: engine`: the
    Verifier replica's step engine batches all requests; pipelining off, which it lacks)."""

    def __init__(self, name: str, client: ServiceClient, block_size: int, eos: Optional[int]):
        self.name, self.client, self.block_size, self.eos = name, client, block_size, eos
        self.pipeline = name == "deer-ray"
        if name == "deer-ray-engine":
            self.client = ServiceClient(engine_url(client))

    def run(self, prompt_ids: Sequence[int], sampling: SamplingParams) -> Sample:
        t0 = time.perf_counter()
        out = self.client.complete(prompt_ids, sampling, self.block_size, self.pipeline)
        wall = time.perf_counter() - t0
        return sample_of(out, wall, self.eos)


def engine_url(client: ServiceClient) -> str:
    """The `loop: engine` app for `deer-ray-engine`: beside the service this process started
    (the plugin starts it on first ask), else the service at the client's URL itself."""
    from deer_serve import plugins

    url = f"http://{client.host}:{client.port}{client.prefix}"
    try:
        cls = plugins.load(plugins.BENCH_SERVICES, "local")
    except plugins.PluginMissing:
        return url
    return cls.engine_url_for(url)


def sample_of(resp: dict, wall: float, eos: Optional[int]) -> Sample:
    ids = resp["choices"][0].get("token_ids") or []
    d = resp.get("deer") or {}
    extra = {}
    for key in ("pipeline_hits", "pipeline_misses", "fallback"):
        if d.get(key) is not None:  # null: the request did not pipeline
            extra[key] = d[key]
    timings = {k: float(v) for k, v in (d.get("timings") or {}).items()
               if isinstance(v, (int, float))}
    cycles = int(d.get("cycles") or 0)
    return Sample(token_ids=cut_at_eos(ids, eos), wall_s=wall,
                  accept_lengths=list(d.get("accept_lengths") or []), timings=timings,
                  cycles=cycles, target_forwards=cycles + 1, extra=extra)


def local_service(target_path: str, drafter_path: str, block_size: int,
                  startup_timeout_s: float = 300.0, extra_args: Optional[dict] = None):
    """The deer-serve app to start in this process (`with local_service(...) as s: s.url`).

    The service side provides it: the `deer_serve.bench_services` entry point `local`
    (`deployments.bench_service.LocalService`), so this package imports neither Ray nor
    `deployments`. Nothing starts until the context is entered."""
    from deer_serve import plugins

    try:
        cls = plugins.load(plugins.BENCH_SERVICES, "local")
    except plugins.PluginMissing as e:
        raise ServiceError(f"no local deer-serve app to start ({e}); or pass --url of a running "
                           "deer-serve service") from e
    return cls(target_path, drafter_path, block_size, startup_timeout_s=startup_timeout_s,
               extra_args=extra_args)


LocalService = local_service  # the name deer_serve.bench.cli imports


class UnavailableMethod:
    """A service method whose service could not be reached or started: every run says why."""

    def __init__(self, name: str, reason: str):
        self.name, self.reason, self.block_size = name, reason, None

    def run(self, prompt_ids: Sequence[int], sampling: SamplingParams) -> Sample:
        raise ServiceError(self.reason)
