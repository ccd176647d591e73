"""The DFlash checkpoint format: its config (`DFlashConfig`, read from and written to
config.json), the checks against a target, reading a target's embeddings and head, and export.
The model itself is `deer_serve.models.dflash.DFlashDrafter`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

ARCHITECTURE = "DFlashDraftModel"


class DrafterFormatError(ValueError):
    """A drafter checkpoint that cannot be served (bad or unsupported config, or a mismatch
    with its target). The CLI reports it with exit code 2."""


def is_dflash_config(cfg: dict) -> bool:
    archs = cfg.get("architectures") or []
    return "dflash_config" in cfg or any("DFlash" in str(a) for a in archs)


def build_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """The reference's default when a checkpoint names no layers: evenly from 1 to L-3."""
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    start, end = 1, num_target_layers - 3
    return [round(start + i * (end - start) / (num_draft_layers - 1)) for i in range(num_draft_layers)]


@dataclass
class DFlashConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    target_layer_ids: list[int]
    mask_token_id: int
    block_size: int = 16                      # the block it was trained for (k = block_size - 1)
    num_target_layers: Optional[int] = None
    target_hidden_size: Optional[int] = None  # None = hidden_size
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    max_position_embeddings: int = 40960
    attention_bias: bool = False
    input_embedding_scale: float = 1.0        # block embeddings = target embedding * this
    output_multiplier: float = 1.0            # logits = target head * this (then the soft cap)
    final_logit_softcapping: Optional[float] = None
    extra: dict = field(default_factory=dict)  # other config.json keys, written back unchanged

    # ---- what deer_serve's engine and target backends read ---------------------------------
    context_mode = "target-features"

    @property
    def target_feature_layers(self) -> list[int]:
        """Indices into a Hugging Face `hidden_states` tuple (0 = embeddings)."""
        return [i + 1 for i in self.target_layer_ids]

    @property
    def target_feature_dim(self) -> int:
        return len(self.target_layer_ids) * (self.target_hidden_size or self.hidden_size)

    # ---- config.json -----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "DFlashConfig":
        archs = [str(a) for a in d.get("architectures") or []]
        dc = dict(d.get("dflash_config") or {})
        if any(a.startswith("DFlash2") for a in archs) or "conv_kernel_size" in dc \
                or "selector_rank" in dc:
            raise DrafterFormatError("DFlash2 drafters (candidate selector, convolutions) are "
                                     "not supported")
        if dc.get("use_swa") or any(t == "sliding_attention" for t in d.get("layer_types") or []):
            raise DrafterFormatError("DFlash drafters with sliding-window layers are not supported")
        if d.get("is_causal") or dc.get("causal"):
            raise DrafterFormatError("causal DFlash drafters are not supported")

        def pick(name, default=None):
            return dc.get(name, d.get(name, default))

        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rtype = rope.get("rope_type", rope.get("type", "default"))
        if rtype not in ("default", None):
            raise DrafterFormatError(f"rope type {rtype!r} is not supported (only default RoPE)")
        theta = rope.get("rope_theta", d.get("rope_theta", 1e6))
        try:
            L = int(d["num_hidden_layers"])
            layer_ids = pick("target_layer_ids")
            n_target = pick("num_target_layers")
            if layer_ids is None:
                if n_target is None:
                    raise DrafterFormatError("dflash_config names no target_layer_ids (and no "
                                             "num_target_layers to derive them from)")
                layer_ids = build_target_layer_ids(int(n_target), L)
            if not isinstance(layer_ids, (list, tuple)) or not layer_ids \
                    or any(not isinstance(i, int) or i < 0 for i in layer_ids):
                raise DrafterFormatError(f"dflash_config.target_layer_ids must be a non-empty "
                                         f"list of layer indices >= 0, got {layer_ids!r}")
            mask = pick("mask_token_id")
            if mask is None:
                raise DrafterFormatError("dflash_config has no mask_token_id")
            H = int(d["hidden_size"])
            nh = int(d["num_attention_heads"])
            known = {"architectures", "dflash_config", "vocab_size", "hidden_size",
                     "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
                     "rope_parameters", "max_position_embeddings", "attention_bias",
                     "num_target_layers", "target_hidden_size", "block_size"}
            return cls(
                vocab_size=int(d["vocab_size"]), hidden_size=H,
                intermediate_size=int(d["intermediate_size"]), num_hidden_layers=L,
                num_attention_heads=nh, num_key_value_heads=int(d.get("num_key_value_heads", nh)),
                head_dim=int(d.get("head_dim") or H // nh),
                target_layer_ids=[int(i) for i in layer_ids], mask_token_id=int(mask),
                block_size=int(pick("block_size", 16)),
                num_target_layers=None if n_target is None else int(n_target),
                target_hidden_size=d.get("target_hidden_size"),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
                max_position_embeddings=int(d.get("max_position_embeddings", 40960)),
                attention_bias=bool(d.get("attention_bias", False)),
                input_embedding_scale=float(pick("input_embedding_scale", 1.0)),
                output_multiplier=float(pick("output_multiplier", 1.0)),
                final_logit_softcapping=pick("final_logit_softcapping"),
                extra={k: v for k, v in d.items() if k not in known},
            )
        except KeyError as e:
            raise DrafterFormatError(f"DFlash config.json lacks {e.args[0]!r}") from None

    def to_dict(self) -> dict:
        """A config.json that z-lab's `DFlashDraftModel` and vLLM's `method: dflash` load."""
        d = dict(self.extra)
        d.update({
            "architectures": [ARCHITECTURE], "model_type": "qwen3",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": self.attention_bias, "tie_word_embeddings": False,
            "layer_types": ["full_attention"] * self.num_hidden_layers,
            "use_sliding_window": False, "sliding_window": None,
            "dflash_config": {"mask_token_id": self.mask_token_id,
                              "target_layer_ids": list(self.target_layer_ids),
                              "block_size": self.block_size},
        })
        if self.num_target_layers is not None:
            d["num_target_layers"] = self.num_target_layers
        if self.target_hidden_size is not None:
            d["target_hidden_size"] = self.target_hidden_size
        for name, default in (("input_embedding_scale", 1.0), ("output_multiplier", 1.0)):
            if getattr(self, name) != default:
                d["dflash_config"][name] = getattr(self, name)
        if self.final_logit_softcapping is not None:
            d["dflash_config"]["final_logit_softcapping"] = self.final_logit_softcapping
        return d

    def check_target(self, target_cfg: dict) -> None:
        """Raise DrafterFormatError when this drafter cannot read `target_cfg`'s model (its
        config.json as a dict; a `text_config` inside is used when present)."""
        t = target_cfg.get("text_config") or target_cfg
        L, H, V = t.get("num_hidden_layers"), t.get("hidden_size"), t.get("vocab_size")
        bad = [i for i in self.target_layer_ids if L is not None and i >= L]
        if L is not None and bad:
            raise DrafterFormatError(f"dflash_config.target_layer_ids {bad} are past the target's "
                                     f"depth ({L} layers: ids 0..{L - 1})")
        th = self.target_hidden_size or self.hidden_size
        if H is not None and th != H:
            raise DrafterFormatError(f"the drafter reads target hidden states of size {th}, the "
                                     f"target's hidden size is {H}")
        if H is not None and self.hidden_size != H:
            raise DrafterFormatError(f"the drafter's hidden size {self.hidden_size} differs from "
                                     f"the target's {H} (it uses the target's embeddings and head)")
        if V is not None and self.vocab_size > V:
            raise DrafterFormatError(f"the drafter's vocabulary ({self.vocab_size}) is larger "
                                     f"than the target's ({V})")
        if V is not None and not 0 <= self.mask_token_id < V:
            raise DrafterFormatError(f"mask_token_id {self.mask_token_id} is outside the "
                                     f"target's vocabulary ({V})")


def read_config(path) -> dict:
    p = Path(path) / "config.json"
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise DrafterFormatError(f"{path}: no config.json") from None
    except json.JSONDecodeError as e:
        raise DrafterFormatError(f"{p}: not valid JSON ({e})") from None


def load_target_head(target_dir) -> tuple[torch.Tensor, torch.Tensor]:
    """(embed (V, H), head (V, H)) of a Hugging Face causal LM directory, read from its
    safetensors without loading its layers (tied embeddings: head = embed). Falls back to
    loading the model when the weights are not in safetensors or use unknown names."""
    from safetensors import safe_open

    target_dir = Path(target_dir)
    index = target_dir / "model.safetensors.index.json"
    if index.is_file():
        where = json.loads(index.read_text())["weight_map"]                # name -> file
    elif (target_dir / "model.safetensors").is_file():
        with safe_open(str(target_dir / "model.safetensors"), "pt") as f:
            where = {k: "model.safetensors" for k in f.keys()}
    else:
        where = {}

    def find(suffixes):
        for s in suffixes:
            hits = sorted(k for k in where if k == s or k.endswith("." + s))
            if hits:
                return hits[0]
        return None

    e = find(["embed_tokens.weight", "embed_in.weight", "wte.weight", "word_embeddings.weight"])
    h = find(["lm_head.weight", "embed_out.weight"])
    if e is not None:
        def load(name):
            with safe_open(str(target_dir / where[name]), "pt") as f:
                return f.get_tensor(name).float()
        embed = load(e)
        return embed, (load(h) if h is not None else embed)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32)
    return (model.get_input_embeddings().weight.detach().clone(),
            model.get_output_embeddings().weight.detach().clone())


def export_dflash(src, dst, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Copy a DFlash checkpoint to `dst` with its weights cast to `dtype` (config.json's
    `dtype` follows): what vLLM's `method: dflash` and z-lab's loader read. No target needed."""
    from safetensors.torch import load_file, save_file

    cfg = DFlashConfig.from_dict(read_config(src))          # validates the format
    files = sorted(Path(src).glob("*.safetensors"))
    if not files:
        raise DrafterFormatError(f"{src}: no *.safetensors weights")
    sd = {}
    for f in files:
        sd.update({k.removeprefix("model."): v.to(dtype).contiguous() for k, v in load_file(str(f)).items()})
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    d = cfg.to_dict()
    d["dtype"] = str(dtype).replace("torch.", "")
    (dst / "config.json").write_text(json.dumps(d, indent=2) + "\n")
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst
