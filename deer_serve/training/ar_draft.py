"""The AR draft baseline for Hugging Face assisted generation (the peer DEER must beat).

A small Qwen3 of about the drafter's size, initialised from the target (embeddings and its first
layers) and trained on the same teacher data as the drafter, with the plain next-token loss.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm


@dataclass
class ARDraftConfig:
    num_layers: int = 2        # about the drafter's depth
    batch_size: int = 16
    steps: int = 300
    lr: float = 1e-3
    num_threads: int = 2
    seed: int = 0
    use_docstring_data: bool = True  # the DEER drafter's data: teacher continuations + docstring set

    @classmethod
    def smoke(cls) -> "ARDraftConfig":
        return cls(batch_size=4, steps=6)


def train_ar_draft(cfg: ARDraftConfig, target_dir: str | Path, teacher_path: str | Path,
                   out_dir: str | Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3ForCausalLM

    torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    out = Path(out_dir)
    target = AutoModelForCausalLM.from_pretrained(target_dir)
    dcfg = target.config.__class__.from_dict(target.config.to_dict())
    dcfg.num_hidden_layers = cfg.num_layers
    dcfg.max_window_layers = cfg.num_layers
    if getattr(dcfg, "layer_types", None):
        dcfg.layer_types = dcfg.layer_types[:cfg.num_layers]
    model = Qwen3ForCausalLM(dcfg)
    sd = {k: v for k, v in target.state_dict().items()
          if not k.startswith("model.layers.") or int(k.split(".")[2]) < cfg.num_layers}
    model.load_state_dict(sd, strict=False)
    del target
    teacher = torch.load(teacher_path)
    ids, val, P = teacher["ids"].long(), teacher["val_ids"].long(), teacher["prompt_len"]
    if cfg.use_docstring_data and "doc_ids" in teacher:
        ids = torch.cat([ids, teacher["doc_ids"].long()])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.01)

    def loss_of(x):  # next-token loss on the teacher's continuation only
        logits = model(x[:, :-1], logits_to_keep=x.shape[1] - P).logits  # positions P-1..N-2
        return F.cross_entropy(logits.flatten(0, 1), x[:, P:].flatten())

    t0 = time.time()
    model.train()
    for step in tqdm(range(cfg.steps), desc="ar-draft", unit="step"):
        rng = np.random.default_rng([cfg.seed, step])
        x = ids[torch.from_numpy(rng.integers(0, len(ids), cfg.batch_size))]
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / 30) * (0.1 + 0.9 * (1 - step / cfg.steps))
        loss = loss_of(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    with torch.no_grad():
        logits = model(val[:, :-1]).logits[:, P - 1:]
        acc = (logits.argmax(-1) == val[:, P:]).float().mean().item()
        vloss = F.cross_entropy(logits.flatten(0, 1), val[:, P:].flatten()).item()
    result = {"val_next_token_acc": round(acc, 4), "val_loss": round(vloss, 4),
              "params": sum(p.numel() for p in model.parameters()),
              "train_seconds": round(time.time() - t0, 1), "config": asdict(cfg)}
    model.save_pretrained(out / "final", safe_serialization=True)
    AutoTokenizer.from_pretrained(target_dir).save_pretrained(out / "final")
    (out / "final" / "metrics.json").write_text(json.dumps(result, indent=1))
    return result
