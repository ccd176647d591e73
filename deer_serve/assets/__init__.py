"""The embedded default checkpoints (a tokenizer, a small Qwen3 target, its DEER drafter).

Layout, written by `deer-serve train ... --export deer_serve/assets`:
  target/    the target (`AutoModelForCausalLM`) and the tokenizer
  drafter/   the DeerDrafter
  drafter-dflash/  a DFlash-format drafter of the same target (what vLLM runs natively; the
             default config's `loop: vllm` serves it)
  ar-draft/  a small AR draft model (the assisted-generation peer in benchmarks)
"""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent


def default_paths() -> tuple[Path, Path]:
    """(target_dir, drafter_dir) of the embedded default; they may not exist yet (see
    `is_checkpoint`)."""
    return ASSETS_DIR / "target", ASSETS_DIR / "drafter"


def is_checkpoint(path) -> bool:
    """A directory saved with `save_pretrained` (it has a config.json)."""
    return (Path(path) / "config.json").is_file()
