"""Fitting a drafter to any Hugging Face causal LM: is a directory one, how big is it, which
token masks, which of its weights a Qwen3-style drafter can start from.

A target's config names its sizes in its own words (GPT-2: n_embd, n_head, n_inner;
GPT-NeoX: no num_key_value_heads; Llama/Qwen3: the words the drafter uses); `target_dims`
reads them all into one `TargetDims`. Layers are copied only where a parameter's name and
shape match the drafter's (Qwen3/Llama: q/k/v/o, MLP, layer norms; GPT-2/NeoX: nothing, random
init): a mismatch is never an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

MASK = "<|mask|>"  # the token added to a tokenizer that has no mask token of its own


class TargetError(ValueError):
    """The target directory or its tokenizer cannot be aligned to (the CLI exits 2)."""


@dataclass(frozen=True)
class TargetDims:
    """What a drafter copies from its target's config."""
    vocab_size: int          # rows of the target's LM head (= its logits' width)
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float               # the target's norm epsilon (RMSNorm or LayerNorm)
    rope_theta: float
    max_positions: int


def _first(cfg, names: Sequence[str], default=None):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def target_dims(config, vocab_rows: Optional[int] = None) -> TargetDims:
    """TargetDims of a transformers config (its text config for a multimodal one).
    vocab_rows: the LM head's rows when known (they may exceed config.vocab_size)."""
    tc = config.get_text_config()
    H = int(tc.hidden_size)
    nh = int(tc.num_attention_heads)
    rope = getattr(tc, "rope_parameters", None) or {}
    if not isinstance(rope, dict):
        rope = {}
    return TargetDims(
        vocab_size=int(vocab_rows if vocab_rows is not None else tc.vocab_size),
        hidden_size=H,
        intermediate_size=int(_first(tc, ["intermediate_size", "n_inner", "ffn_dim"], 4 * H)),
        num_layers=int(tc.num_hidden_layers),
        num_heads=nh,
        num_kv_heads=int(_first(tc, ["num_key_value_heads", "num_kv_heads"], nh)),
        head_dim=int(_first(tc, ["head_dim"], H // nh)),
        eps=float(_first(tc, ["rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps"], 1e-6)),
        rope_theta=float(rope.get("rope_theta", _first(tc, ["rope_theta", "rotary_emb_base"], 1e4))),
        max_positions=int(_first(tc, ["max_position_embeddings", "n_positions"], 4096)),
    )


def check_target_dir(path) -> dict:
    """Raise TargetError unless `path` holds a Hugging Face causal LM with a tokenizer; returns
    its config.json as a dict. Reads configs only (no weights)."""
    p = Path(path)
    cfg_file = p / "config.json"
    if not p.is_dir():
        raise TargetError(f"--target {path}: no such directory")
    if not cfg_file.is_file():
        raise TargetError(f"--target {path}: no config.json there (not a Hugging Face model "
                          f"directory)")
    try:
        raw = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TargetError(f"--target {path}: config.json is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise TargetError(f"--target {path}: config.json is not a JSON object")
    from deer_serve.models.dflash import is_dflash_config

    if raw.get("model_type") == "deer_drafter" or is_dflash_config(raw):
        raise TargetError(f"--target {path} is a drafter, not a causal LM: --target takes the "
                          f"model the drafter is for")
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(str(p))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TargetError(f"--target {path}: transformers cannot read its config.json: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise TargetError(f"--target {path}: model_type {config.model_type!r} is not a causal "
                          f"LM (AutoModelForCausalLM does not take it)")
    if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        raise TargetError(f"--target {path}: no weights (*.safetensors or *.bin) there")
    return raw


def load_tokenizer(path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError, KeyError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TargetError(f"--target {path}: no usable tokenizer there ({msg})") from None


def resolve_mask_token(tok, rows: int) -> int:
    """The drafter's mask token id for tokenizer `tok` over a target with `rows` embedding
    rows: the tokenizer's own mask token; else a `<|mask|>` entry it already has; else a row
    the tokenizer does not use (a target often has more rows than tokenizer entries), added to
    `tok` as `<|mask|>` (so a saved copy names it). Raises TargetError when none fits."""
    mid = tok.mask_token_id if getattr(tok, "mask_token", None) is not None else None
    if mid is not None:
        if not 0 <= mid < rows:
            raise TargetError(f"this tokenizer cannot take a mask token: its mask token "
                              f"{tok.mask_token!r} has id {mid}, outside the target's {rows} "
                              f"embedding rows")
        return int(mid)
    vocab = tok.get_vocab()
    if MASK in vocab and 0 <= vocab[MASK] < rows:
        return int(vocab[MASK])
    spare = len(tok)
    if spare < rows:
        tok.add_special_tokens({"mask_token": MASK})
        if tok.mask_token_id != spare:  # pragma: no cover - a tokenizer with id gaps
            raise TargetError(f"this tokenizer cannot take a mask token: adding {MASK} gave id "
                              f"{tok.mask_token_id}, not the unused row {spare}")
        return spare
    raise TargetError(f"this tokenizer cannot take a mask token: it has none, and its {len(tok)} "
                      f"entries use all {rows} embedding rows of the target (resize the "
                      f"target's embeddings by one row, or give the tokenizer a mask token)")


def decoder_layers(target) -> tuple[str, list[torch.nn.Module]]:
    """(attribute name, the ModuleList) of the target's decoder layers under its base model."""
    base = target.base_model
    for name in ("layers", "h", "blocks", "layer"):
        mods = getattr(base, name, None)
        if isinstance(mods, torch.nn.ModuleList):
            return name, list(mods)
    return "", []


def source_layers(init_layers: str, num_target: int, num_draft: int) -> list[int]:
    """Which target layer initialises each drafter layer ("last", "first", "none")."""
    return {"last": [max(0, s) for s in range(num_target - num_draft, num_target)],
            "first": list(range(min(num_draft, num_target))), "none": []}[init_layers]


@torch.no_grad()
def copy_matching(dst: torch.nn.Module, src_state: dict) -> tuple[int, int]:
    """Copy every tensor of `src_state` into `dst`'s parameter/buffer of the same name and
    shape; returns (copied, total) counts of `dst`'s state entries."""
    own = dst.state_dict()
    n = 0
    for name, t in own.items():
        s = src_state.get(name)
        if s is not None and s.shape == t.shape:
            t.copy_(s)
            n += 1
    return n, len(own)


def init_from_target(drafter, target, init_layers: str) -> dict:
    """Copy the target's decoder layers (`init_layers`) and final norm into the drafter's
    `layers` and `norm` where names and shapes match. Returns what was copied, for the card."""
    attr, layers = decoder_layers(target)
    src = source_layers(init_layers, len(layers), len(drafter.layers)) if len(layers) else []
    copied = total = 0
    for dst, s in zip(drafter.layers, src):
        c, t = copy_matching(dst, layers[s].state_dict())
        copied, total = copied + c, total + t
    total += sum(len(d.state_dict()) for d in list(drafter.layers)[len(src):])
    norm = getattr(target.base_model, "norm", None)
    norm_copied = 0
    if isinstance(norm, torch.nn.Module):
        norm_copied, _ = copy_matching(drafter.norm, norm.state_dict())
    return {"layers_attr": attr, "source_layers": src[:len(drafter.layers)],
            "layer_tensors_copied": copied, "layer_tensors": total,
            "final_norm_copied": bool(norm_copied)}


def head_and_embeddings(target) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(input embeddings (V_in, H), LM head (V, H), tied?) of a causal LM."""
    emb = target.get_input_embeddings().weight
    head = target.get_output_embeddings().weight
    tied = emb.data_ptr() == head.data_ptr() or (emb.shape == head.shape and torch.equal(emb, head))
    return emb, head, tied
