"""Regenerate `deer_pb2.py` and `deer_pb2_grpc.py` from `deer.proto` (needs grpcio-tools).

    python -m deer_serve.protos.gen            # write them next to the .proto (`make protos`)
    python -m deer_serve.protos.gen --check    # exit 1 when the committed files are stale

protoc runs from the repository root on `deer_serve/protos/deer.proto`, so the messages' module
is `deer_serve.protos.deer_pb2` (Ray pickles request messages by that name). The gRPC module's
absolute import of it is rewritten to a package-relative one.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PROTO = "deer_serve/protos/deer.proto"
OUTPUTS = ("deer_pb2.py", "deer_pb2_grpc.py")


def generate(out_dir: Path) -> dict[str, str]:
    """Run protoc on deer.proto into out_dir; return {file name: fixed source}."""
    from grpc_tools import protoc

    include = Path(protoc.__file__).resolve().parent / "_proto"  # google/protobuf/*.proto
    rc = protoc.main(["grpc_tools.protoc", f"-I{ROOT}", f"-I{include}",
                      f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", str(ROOT / PROTO)])
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    gen = out_dir / Path(PROTO).parent
    files = {name: (gen / name).read_text() for name in OUTPUTS}
    grpc_src, n = re.subn(r"^from deer_serve\.protos import deer_pb2 as (\w+)$",
                          r"from . import deer_pb2 as \1", files["deer_pb2_grpc.py"], flags=re.M)
    if n != 1:
        raise RuntimeError("protoc output changed: cannot find the deer_pb2 import to rewrite")
    files["deer_pb2_grpc.py"] = grpc_src
    return files


def fresh() -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        return generate(Path(tmp))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when stale")
    args = ap.parse_args(argv)
    files = fresh()
    stale = [n for n, src in files.items()
             if not (HERE / n).exists() or (HERE / n).read_text() != src]
    if args.check:
        for n in stale:
            print(f"stale: deer_serve/protos/{n} (run `make protos`)", file=sys.stderr)
        return 1 if stale else 0
    for n, src in files.items():
        (HERE / n).write_text(src)
        print(f"wrote deer_serve/protos/{n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
