"""The model pair an app serves, checked when the app is built (deployments.app): the embedded
default paths, and `check_models` (both checkpoints exist and fit each other)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from deployments.app import AppConfig


def embedded_paths(dflash: bool = False) -> tuple[str, str]:
    """(target, drafter) of the embedded default; `dflash`: its drafter in the DFlash format
    (the one vLLM runs natively: `loop: vllm`)."""
    try:
        from deer_serve.assets import default_paths
    except ImportError as e:
        raise RuntimeError("no target_path/drafter_path given and the embedded default "
                           "(deer_serve.assets.default_paths) is not available") from e
    target, drafter = default_paths()
    if dflash:
        drafter = drafter.parent / "drafter-dflash"
    return str(target), str(drafter)


def check_models(cfg: AppConfig) -> Optional[list[int]]:
    """Fail at build time, not on the first request: both checkpoints exist and share a
    vocabulary. Returns the target layers a `target-features` drafter reads (the verifier
    must return those), else None."""
    import json

    configs = {}
    for what, path in (("target", cfg.target_path), ("drafter", cfg.drafter_path)):
        f = Path(str(path)) / "config.json"  # None (not resolved): reported as missing below
        if not f.is_file():
            raise ValueError(f"no {what} checkpoint at {path} (no config.json); the embedded "
                             "default is built by `make train-default`")
        configs[what] = json.loads(f.read_text())
    t, d = configs["target"], configs["drafter"]
    t_vocab = t.get("vocab_size", (t.get("text_config") or {}).get("vocab_size"))
    if t_vocab is not None and d.get("vocab_size") not in (None, t_vocab):
        raise ValueError(f"drafter vocabulary ({d['vocab_size']}) differs from the target's "
                         f"({t_vocab})")
    from deer_serve.drafters import DrafterFormatError, config_feature_layers, config_format

    try:
        if config_format(d, cfg.drafter_path) == "dflash":
            from deer_serve.models.dflash import DFlashConfig

            DFlashConfig.from_dict(d).check_target(t)
        layers = config_feature_layers(d)
    except DrafterFormatError as e:
        raise ValueError(f"drafter {cfg.drafter_path}: {e}") from None
    return layers or None
