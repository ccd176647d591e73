"""Drafters. `load_drafter` opens a drafter directory in any of its formats, detected from its
config.json: a DeerDrafter (`model_type: deer_drafter`), a DFlash checkpoint
(`architectures: ["DFlashDraftModel"]` / `dflash_config`; it needs its target's directory for the
embeddings and LM head it shares), or an AR draft: a plain Hugging Face causal LM on the
target's tokenizer (`architectures: ["...ForCausalLM"]`), drafting k tokens one by one
(`deer_serve.drafters.ar`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from deer_serve.models.dflash import DrafterFormatError, is_dflash_config, read_config

FORMATS = ("deer", "dflash", "ar")


def drafter_format(path) -> str:
    """"deer", "dflash" or "ar" from the directory's config.json (DrafterFormatError
    otherwise)."""
    return config_format(read_config(path), path)


def config_format(cfg: dict, path="the drafter") -> str:
    """`drafter_format` of a config.json already read."""
    if is_dflash_config(cfg):
        return "dflash"
    if cfg.get("model_type") == "deer_drafter":
        return "deer"
    if is_causal_lm_config(cfg):
        return "ar"
    raise DrafterFormatError(f"{path}: not a drafter (model_type {cfg.get('model_type')!r}; "
                             f"expected a DeerDrafter, a DFlash checkpoint or a causal LM)")


def is_causal_lm_config(cfg: dict) -> bool:
    """A Hugging Face causal LM's config.json: its architectures end in "ForCausalLM", or (none
    named) its model_type is one `AutoModelForCausalLM` knows."""
    archs = cfg.get("architectures") or []
    if archs:
        return any(str(a).endswith("ForCausalLM") for a in archs)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return cfg.get("model_type") in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def drafter_feature_layers(path) -> list[int]:
    """The target `hidden_states` indices the drafter in `path` reads ([] for a tokens drafter),
    from config.json alone."""
    return config_feature_layers(read_config(path))


def config_feature_layers(cfg: dict) -> list[int]:
    """`drafter_feature_layers` of a config.json already read."""
    if is_dflash_config(cfg):
        from deer_serve.models.dflash import DFlashConfig

        return DFlashConfig.from_dict(cfg).target_feature_layers
    if cfg.get("context_mode") == "target-features":
        return list(cfg.get("target_feature_layers") or [])
    return []


def load_drafter(path, target_path=None, device: Optional[str] = None, **kw):
    """A `DeerDrafterBackend` over the drafter in `path`, or an `ARDrafterBackend` when it is
    an AR draft (a causal LM). target_path: the target's directory, required for a DFlash
    drafter (its embeddings and head are the target's; the target's layers are not loaded).
    kw: backend options (max_sequences, use_cache)."""
    import torch

    from deer_serve.drafters.deer import DeerDrafterBackend

    fmt = drafter_format(path)
    if fmt == "ar":
        from deer_serve.drafters.ar import ARDrafterBackend

        return ARDrafterBackend.from_pretrained(str(path), device=device, **kw)
    if fmt == "deer":
        return DeerDrafterBackend.from_pretrained(str(path), device=device, **kw)
    from deer_serve.models.dflash import load_dflash

    if target_path is None:
        raise DrafterFormatError(f"{path} is a DFlash drafter: it needs its target's directory "
                                 f"(embeddings and LM head)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return DeerDrafterBackend(load_dflash(Path(path), Path(target_path), device=device), **kw)


__all__ = ["FORMATS", "DrafterFormatError", "config_feature_layers", "config_format",
           "drafter_format", "drafter_feature_layers",
           "is_causal_lm_config", "load_drafter"]
