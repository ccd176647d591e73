"""`deer-serve export --format dflash SRC OUT`: write a drafter in the DFlash checkpoint format,
which vLLM (`speculative_config={"method": "dflash", "model": OUT, ...}`), SGLang and z-lab's
`dflash` package load natively.

SRC must be a DFlash-architecture drafter (trained with `deer-serve train ... --arch dflash`, or
any DFlash checkpoint); a DeerDrafter runs its context through its layers, which the DFlash
layout cannot express, so it is refused. --target checks that the drafter fits that target.
Bad input: a message on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="deer-serve export", description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="the drafter directory")
    ap.add_argument("out", type=Path, help="output directory")
    ap.add_argument("--format", choices=["dflash"], default="dflash")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    ap.add_argument("--target", type=Path, default=None,
                    help="check that the drafter fits this target directory")
    a = ap.parse_args(argv)
    import torch

    from deer_serve.drafters import DrafterFormatError, drafter_format
    from deer_serve.models.dflash import DFlashConfig, export_dflash, read_config

    try:
        if drafter_format(a.src) != "dflash":
            raise DrafterFormatError(
                f"{a.src} is a DeerDrafter: its context runs through its layers, which the DFlash "
                f"layout cannot hold; train one with `deer-serve train ... --arch dflash`")
        if a.target is not None:
            DFlashConfig.from_dict(read_config(a.src)).check_target(read_config(a.target))
        out = export_dflash(a.src, a.out, getattr(torch, DTYPES[a.dtype]))
    except DrafterFormatError as e:
        print(f"deer-serve export: error: {e}", file=sys.stderr)
        return 2
    print(f"exported {a.src} -> {out} (DFlash format, {a.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
