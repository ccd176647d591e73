"""A test's time as a deadline: pytest kills a test after `timeout` seconds (pyproject.toml,
[tool.pytest.ini_options]; the time of its fixtures counts too). A test that runs subprocesses
gives each one the time that is left (less a reserve for what comes after it), so a subprocess
that hangs is stopped by its own timeout, with its output in the failure, before pytest kills
the whole test without it."""

from __future__ import annotations

import time
import tomllib
from pathlib import Path
from typing import Optional

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def pytest_timeout_s() -> float:
    with open(PYPROJECT, "rb") as f:
        return float(tomllib.load(f)["tool"]["pytest"]["ini_options"]["timeout"])


class Budget:
    """Started when made; `left(reserve)`: seconds to give the next step."""

    def __init__(self, total: Optional[float] = None, margin: float = 30.0):
        self.t_end = time.monotonic() + (pytest_timeout_s() if total is None else total) - margin

    def left(self, reserve: float = 0.0, cap: Optional[float] = None) -> float:
        s = self.t_end - time.monotonic() - reserve
        assert s > 0, "this test has spent its time (pytest's per-test timeout)"
        return s if cap is None else min(cap, s)
