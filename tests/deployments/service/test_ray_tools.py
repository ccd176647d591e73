"""Ray's own tools against `deer-serve serve` as `make serve` runs it: `serve status`, `ray
status`, `ray list actors` from a plain shell (no RAY_ADDRESS, no RAY_AUTH_MODE, no flags) and
the dashboard on 127.0.0.1:8265 (docs/ray-tools.md).

One server start (the default config: the embedded model pair on vLLM's engine, one Verifier
deployment that is its own ingress: no Router, no Drafter), HTTP on a free port, gRPC off;
the dashboard must be on Ray's default port because that is where the tools look, so the test
is skipped when something else holds 8265.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from budget import pytest_timeout_s
from serve_process import BIN, REPO, free_port, get, serve_process

pytestmark = [pytest.mark.service, pytest.mark.slow]

DASHBOARD = "http://127.0.0.1:8265"
# pytest's per-test timeout (900 s) covers the server fixture, the tools and the stop, so they
# share it: the start gets what the tools and the stop may need left over
TOOL_TIMEOUT_S = 60                         # each of the 3 tool runs
STOP_TIMEOUT_S = 120                        # Ctrl-C to exit (serve.shutdown, ray.shutdown)
START_DEADLINE_S = pytest_timeout_s() - 3 * TOOL_TIMEOUT_S - 2 * STOP_TIMEOUT_S - 60


def port_taken(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def plain_env() -> dict:
    """The environment of a fresh shell on this machine: nothing that points Ray's tools at a
    cluster or sets its auth mode."""
    env = dict(os.environ)
    for k in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
              "RAY_DASHBOARD_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(k, None)
    return env


def tool(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / argv[0]), *argv[1:]], env=plain_env(), cwd="/",
                          capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not (BIN / "serve").exists() or not (BIN / "ray").exists():
        pytest.skip("Ray's CLI (ray[serve]) is not installed next to this Python")
    if port_taken(8265):
        pytest.skip("127.0.0.1:8265 is taken: Ray's tools would look there, not at this server")
    port = free_port()
    log = tmp_path_factory.mktemp("ray-tools") / "serve.log"
    env = plain_env()
    # a loaded 2-core machine starts Ray's agents and dashboard slowly (Ray's 15 s / 60 s waits)
    env.setdefault("RAY_agent_register_timeout_ms", "180000")
    env.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", "300")
    env.setdefault("OMP_NUM_THREADS", "1")
    with serve_process(["--config", str(REPO / "cluster/serve_config.yaml"), "--port", str(port),
                        "--grpc-port", "0", "--num-cpus", "4"], f"http://127.0.0.1:{port}",
                       env, log, START_DEADLINE_S, STOP_TIMEOUT_S) as proc:
        yield proc, log


def test_ray_tools_see_the_service(server):
    proc, log = server
    address_file = Path("/tmp/ray/ray_current_cluster")
    assert address_file.is_file(), log.read_text()
    address = address_file.read_text().strip()

    r = tool("serve", "status")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "deer:" in r.stdout and "RUNNING" in r.stdout, r.stdout
    assert "Verifier" in r.stdout, r.stdout
    assert "Drafter" not in r.stdout, r.stdout  # loop vllm: the drafter runs inside vLLM
    assert "Router" not in r.stdout, r.stdout   # ingress verifier: the replica is the ingress

    r = tool("ray", "status")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Active:" in r.stdout and "node_" in r.stdout, r.stdout
    assert "CPU" in r.stdout, r.stdout

    r = tool("ray", "list", "actors")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ServeController" in r.stdout, r.stdout
    assert "ServeReplica:deer:Verifier" in r.stdout and "ALIVE" in r.stdout, r.stdout

    assert get(DASHBOARD) == 200

    # Ctrl-C stops it cleanly, and the address file no longer names the stopped cluster
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=STOP_TIMEOUT_S) == 0, log.read_text()
    assert not address_file.is_file() or address_file.read_text().strip() != address
