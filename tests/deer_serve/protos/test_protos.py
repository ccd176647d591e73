"""The committed gRPC code is what `make protos` generates from deer.proto, and the core
library stays free of Ray and pydantic (only the service edge imports them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


def test_generated_code_is_fresh():
    pytest.importorskip("grpc_tools")
    from deer_serve.protos import gen

    for name, src in gen.fresh().items():
        assert (gen.HERE / name).read_text() == src, f"{name} is stale: run `make protos`"


def test_contract_names():
    from deer_serve.protos import deer_pb2, deer_pb2_grpc

    fields = lambda m: {f.name for f in m.DESCRIPTOR.fields}  # noqa: E731
    assert deer_pb2.DESCRIPTOR.package == "deer.v1"
    assert {"prompt", "max_tokens", "temperature", "top_p", "block_size", "seed",
            "stop"} <= fields(deer_pb2.GenerateRequest)
    assert {"text", "token_ids", "deer"} <= fields(deer_pb2.GenerateResponse)
    assert {"text", "token_ids"} <= fields(deer_pb2.GenerateChunk)
    svc = deer_pb2.DESCRIPTOR.services_by_name["DeerService"]
    assert {m.name for m in svc.methods} == {"Generate", "GenerateStream"}
    assert svc.methods_by_name["GenerateStream"].server_streaming
    assert hasattr(deer_pb2_grpc, "add_DeerServiceServicer_to_server")
    # messages pickle by an importable module name (Serve pickles gRPC requests)
    assert deer_pb2.GenerateRequest.__module__ == "deer_serve.protos.deer_pb2"


def test_core_imports_neither_ray_nor_pydantic():
    code = ("import sys\n"
            "import deer_serve, deer_serve.engine, deer_serve.cli, deer_serve.types\n"
            "import deer_serve.targets.hf, deer_serve.drafters.deer, deer_serve.protos.deer_pb2\n"
            "import deer_serve.serve_cli\n"  # its Ray imports are inside main()
            "bad = [m for m in ('ray', 'pydantic') if m in sys.modules]\n"
            "sys.exit(f'imported {bad}' if bad else 0)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:] + r.stdout[-500:]
