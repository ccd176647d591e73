"""`deer-serve serve` as a user runs it, for the tests that need the whole command (its own Ray,
its log, Ctrl-C to stop): started in its own session, ready when /healthz answers 200 (an
event, with a deadline), stopped with SIGINT (serve.shutdown, ray.shutdown), killed only if that
does not end it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # .venv/bin: deer-serve, serve, ray


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 10) -> int:
    """The HTTP status of GET url."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@contextlib.contextmanager
def serve_process(args: list[str], url: str, env: dict, log: Path, start_deadline_s: float,
                  stop_timeout_s: float) -> Iterator[subprocess.Popen]:
    """`deer-serve serve ARGS` (HTTP at url), yielded once url/healthz answers 200; the test
    fails with the log when the process exits first or the deadline passes."""
    with open(log, "w") as out:
        proc = subprocess.Popen([str(BIN / "deer-serve"), "serve", *args], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + start_deadline_s
        while True:  # the event: /healthz answers 200 (serve.run has returned by then)
            if proc.poll() is not None:
                pytest.fail(f"deer-serve serve exited {proc.returncode}:\n{log.read_text()}")
            try:
                if get(url + "/healthz", timeout=5) == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no /healthz 200 in {start_deadline_s} s:\n{log.read_text()}")
            time.sleep(1)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # Ctrl-C: serve.shutdown, ray.shutdown
            try:
                proc.wait(timeout=stop_timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
