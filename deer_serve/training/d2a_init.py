"""A D2A drafter built from its target (deer_serve.training.d2a): the DeerDrafter or DFlash
layout shaped like the target, initialised from its embeddings, head and layers; or a trained
drafter to continue from."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from deer_serve.models import DeerDrafter, DeerDrafterConfig
from deer_serve.targets.features import default_feature_layers
from deer_serve.training.target_fit import head_and_embeddings, init_from_target, target_dims

if TYPE_CHECKING:
    from deer_serve.training.d2a import D2AConfig


def dflash_layer_ids(num_target_layers: int) -> list[int]:
    """Default target layers of a trained DFlash drafter: the two before the last. The last
    layer is avoided: Hugging Face returns it after the final norm, vLLM's runner before it."""
    L = num_target_layers
    return sorted({max(0, L - 3), max(0, L - 2)})


def dflash_from_target(target, cfg: "D2AConfig", mask_token_id: int):
    """A DFlash drafter with the target's embeddings and head, its layers initialised from the
    target's (`init_layers`, where names and shapes match), `fc` starting as "the last named
    layer's features". Sizes come from the target's config in its own words (`target_dims`)."""
    from deer_serve.models.dflash import DFlashConfig, DFlashDrafter

    emb, head, _ = head_and_embeddings(target)
    dims = target_dims(target.config, vocab_rows=head.shape[0])
    ids = list(cfg.feature_layers) if cfg.feature_layers else dflash_layer_ids(dims.num_layers)
    dcfg = DFlashConfig(
        vocab_size=dims.vocab_size, hidden_size=dims.hidden_size,
        intermediate_size=dims.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=dims.num_heads, num_key_value_heads=dims.num_kv_heads,
        head_dim=dims.head_dim, target_layer_ids=ids, mask_token_id=mask_token_id,
        block_size=max(cfg.block_sizes) + 1, num_target_layers=dims.num_layers,
        rms_norm_eps=dims.eps, rope_theta=dims.rope_theta,
        max_position_embeddings=dims.max_positions)
    torch.manual_seed(cfg.seed)
    d = DFlashDrafter(dcfg, emb.detach().float(), head.detach().float())
    with torch.no_grad():
        # (nn.Module.__setattr__ is typed for Tensor | Module values; a plain dict is stored as is)
        d.init_report = init_from_target(d, target, cfg.init_layers)  # type: ignore[assignment]
        w = torch.zeros_like(d.fc.weight)
        w[:, -dims.hidden_size:] = torch.eye(dims.hidden_size)
        d.fc.weight.copy_(w)
    return d


def load_for_training(cfg: "D2AConfig", path, target_dir):
    """A trained drafter to continue from (`init_from`), in cfg.arch's format."""
    if cfg.arch == "dflash":
        from deer_serve.models.dflash import load_dflash

        return load_dflash(path, target_dir, device="cpu", dtype=torch.float32).train()
    model = DeerDrafter.from_pretrained(path, dtype=torch.float32).train()
    if model.config.context_mode != cfg.context_mode:
        raise ValueError(f"{path} is a {model.config.context_mode} drafter")
    model.embed_tokens.weight.requires_grad_(not cfg.freeze_embeddings)
    return model


def drafter_from_target(target, cfg: D2AConfig, mask_token_id: int) -> DeerDrafter:
    """A drafter shaped like the target (hidden size, heads, vocabulary; `num_layers` Qwen3-style
    layers), initialised from it: embeddings = tied head (the target's LM head; the same table
    when the target ties them), and, where parameter names and shapes match, its final norm and
    `init_layers` decoder layers (Qwen3/Llama: all but Qwen3's q/k norms; GPT-2/NeoX: none).
    `.init_report` on the result says what was copied."""
    if cfg.arch == "dflash":
        return dflash_from_target(target, cfg, mask_token_id)
    emb, head, _ = head_and_embeddings(target)
    dims = target_dims(target.config, vocab_rows=head.shape[0])
    layers = cfg.feature_layers or default_feature_layers(dims.num_layers)
    dcfg = DeerDrafterConfig(
        vocab_size=dims.vocab_size, hidden_size=dims.hidden_size,
        intermediate_size=dims.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=dims.num_heads, num_key_value_heads=dims.num_kv_heads,
        head_dim=dims.head_dim, rms_norm_eps=dims.eps, rope_theta=dims.rope_theta,
        mask_token_id=mask_token_id, context_mode=cfg.context_mode,
        target_feature_layers=layers if cfg.context_mode == "target-features" else None,
        target_feature_dim=len(layers) * dims.hidden_size if cfg.context_mode == "target-features" else 0,
    )
    d = DeerDrafter(dcfg)
    with torch.no_grad():
        # an untied target's head, not its input table: with frozen embeddings the head is
        # what the drafter predicts through
        d.embed_tokens.weight.copy_(head)
        d.init_report = init_from_target(d, target, cfg.init_layers)
        if cfg.context_mode == "target-features":
            # start as "the last layer's (normed) features", the slice nearest the next token
            w = torch.zeros_like(d.feature_proj.weight)
            w[:, -dims.hidden_size:] = torch.eye(dims.hidden_size)
            d.feature_proj.weight.copy_(w)
    d.embed_tokens.weight.requires_grad_(not cfg.freeze_embeddings)
    return d
