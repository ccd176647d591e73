"""The servers of `deer-serve bench-serve` (deer_serve.bench.servers): server specs
(KIND[:key=value...]), their command lines and Serve configs, and one server process in its own
session (start, wait until ready, stop with everything it started)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

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
    service = args.get("service") or {}
    if spec.kind == "deer-ar" and service.get("loop") == "vllm" \
            and service.get("vllm_plain_from") is None:
        # mode ar on the vllm loop is plain decoding only on the replica's plain engine
        args.setdefault("service", service).setdefault("vllm_plain_engine", True)
    return cfg


def vllm_command(spec: ServerSpec, target: str, port: int, *, cpu: bool) -> list[str]:
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", target,
           "--host", "127.0.0.1", "--port", str(port), "--seed", "0",
           "--served-model-name", Path(target).name, "--no-enable-prefix-caching"]
    if cpu:  # float32 as deer-serve's engines; torch.compile as vLLM's default (and the shipped
        # config's `vllm_compile`): `vllm:enforce_eager=true` runs it eager
        cmd += ["--dtype", "float32"]
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

# what a server's log says when its port was taken: Ray Serve's proxy, uvicorn (vLLM)
BIND_FAILED = ("Failed to bind to address", "address already in use")


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


def cpu_seconds(pids: Sequence[int]) -> dict[int, tuple[str, float]]:
    """pid -> (process name, CPU seconds used so far: user + system) from /proc; a process's
    name is its title (Ray sets `ray::ServeReplica:APP:Deployment`, vLLM `VLLM::EngineCore`) or
    its program, without arguments."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        argv = [a.decode(errors="replace") for a in cmd if a]
        if not argv:  # a kernel thread or a zombie: its comm
            name = stat[stat.index("(") + 1:stat.rindex(")")]
        elif Path(argv[0]).name.startswith("python") and len(argv) > 1:
            name = " ".join([Path(argv[1]).name] + argv[2:3])  # python -m MODULE / SCRIPT ARG
        else:  # a program, or a title set in place of argv (Ray's, vLLM's)
            name = Path(argv[0].split(" ")[0]).name
        out[pid] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


def cpu_by_name(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
                ) -> dict[str, float]:
    """CPU seconds used between two `cpu_seconds` snapshots, summed by process name (a process
    that ended in between is missed; one that started counts from 0)."""
    used: dict[str, float] = {}
    for pid, (name, t) in after.items():
        dt = t - before.get(pid, (name, 0.0))[1]
        if dt > 0:
            used[name] = round(used.get(name, 0.0) + dt, 2)
    return dict(sorted(used.items(), key=lambda kv: -kv[1]))


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
        self.cmd: list[str] = []  # the command of the last start
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
        cmd = self.cmd = self.command()
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

    def start_ready(self, timeout_s: float, tries: int = 3) -> float:
        """`start` then `wait_ready`; a server that could not bind its port (taken between
        `free_port` and the bind, e.g. by one of Ray's own processes starting) is stopped and
        started again on another port, up to `tries` times."""
        for _ in range(tries - 1):
            self.start()
            try:
                return self.wait_ready(timeout_s)
            except RuntimeError:
                if not any(m in self.log_tail(200) for m in BIND_FAILED):
                    raise
                self.stop()
                self.port = free_port()
                self.url = f"http://127.0.0.1:{self.port}"
        self.start()
        return self.wait_ready(timeout_s)

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
