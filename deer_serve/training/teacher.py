"""Teacher data for D2A: the target's own continuations of prompts cut from the corpus.

Saved as one .pt file: {"ids": (n, P+G) int32, "prompt_len": P, "sampled": (n,) bool}. Training
prompts come from the corpus's train files; a small validation set from its validation files.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm


@dataclass
class TeacherConfig:
    n_greedy: int = 3072        # greedy continuations: what T=0 serving must match
    n_sampled: int = 1024       # sampled ones: the target's distribution, for T>0
    temperature: float = 0.7    # of the sampled continuations
    n_val: int = 128            # greedy continuations of validation-file prompts (metrics only)
    n_docstring: int = 4608     # greedy continuations of prompts ending after a function's docstring
    n_val_docstring: int = 128  #   (the shape of HumanEval's prompts), train and validation files
    prompt_len: int = 64        # tokens of corpus before the continuation
    gen_len: int = 128          # tokens the target continues
    batch_size: int = 64        # rows per batched `generate`
    num_threads: int = 2
    seed: int = 0

    @classmethod
    def smoke(cls) -> "TeacherConfig":
        return cls(n_greedy=24, n_sampled=8, n_val=8, prompt_len=24, gen_len=40, batch_size=16,
                   n_docstring=8, n_val_docstring=4)


def docstring_prefixes(text: str) -> list[str]:
    """Every prefix of a module's source that ends right after a function's docstring line
    (a closing triple quote and newline): the prompt shape of HumanEval (signature + docstring, the body to write)."""
    import ast

    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    lines = text.splitlines(keepends=True)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and len(node.body) > 1 \
                and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant) \
                and isinstance(node.body[0].value.value, str):
            end = node.body[0].end_lineno
            if end < len(lines) and lines[end - 1].rstrip().endswith(('"""', "'''")):
                out.append("".join(lines[:end]))
    return out


def cut_docstring_prompts(files, tokenizer_file, n: int, prompt_len: int, seed: int) -> torch.Tensor:
    """n prompts of prompt_len tokens ending after a docstring, each tokenized on its own (the
    boundary a served prompt has), left-truncated; prefixes shorter than prompt_len are skipped."""
    from tokenizers import Tokenizer

    from deer_serve.training.corpus import read_text

    tok = Tokenizer.from_file(str(tokenizer_file))
    prefixes = [p for f in files for p in docstring_prefixes(read_text(f))]
    rng = np.random.default_rng(seed)
    rng.shuffle(prefixes)
    out = []
    for p in prefixes:
        ids = tok.encode(p[-4 * prompt_len * 8:], add_special_tokens=False).ids
        if len(ids) > prompt_len:          # the slice may cut a token: drop the first one
            out.append(ids[-prompt_len:])
        if len(out) == n:
            break
    if not out:
        raise ValueError("no docstring prompts found")
    return torch.tensor(out, dtype=torch.int64)


def cut_prompts(data: np.ndarray, n: int, prompt_len: int, seed: int) -> torch.Tensor:
    """n windows of prompt_len tokens at random offsets: (n, prompt_len) int64."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(data) - prompt_len - 1, size=n)
    return torch.from_numpy(np.stack([data[s:s + prompt_len] for s in starts]).astype(np.int64))


@torch.inference_mode()
def continue_prompts(model, prompts: torch.Tensor, gen_len: int, batch_size: int,
                     temperature: float = 0.0, seed: int = 0, desc: str = "teacher") -> torch.Tensor:
    """(n, P) prompts -> (n, P+gen_len) with the target's continuations (EOS suppressed so every
    row has gen_len real tokens)."""
    out = []
    torch.manual_seed(seed)
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
        x = prompts[i:i + batch_size]
        kw = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 \
            else dict(do_sample=False)
        y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=gen_len,
                           min_new_tokens=gen_len, pad_token_id=model.config.pad_token_id, **kw)
        out.append(y[:, :x.shape[1] + gen_len])
    return torch.cat(out)


def generate_teacher(target_dir: str | Path, out_path: str | Path, cfg: TeacherConfig,
                     cache_dir: str | Path, limit_files: int | None = None) -> dict:
    from transformers import AutoModelForCausalLM

    from deer_serve.training.corpus import tokenize_split

    torch.set_num_threads(cfg.num_threads)
    out_path = Path(out_path)
    if out_path.exists():
        data = torch.load(out_path)
        have = len(data["doc_ids"]) if "doc_ids" in data else 0
        if cfg.n_docstring > have:   # a run made before the docstring set, or with fewer rows:
            # the prompts are a prefix of one shuffled list and are continued in batches, so
            # the rows it had come out the same (the D2A phases that used them name their count)
            model = AutoModelForCausalLM.from_pretrained(target_dir).eval()
            data.update(_docstring_sets(model, target_dir, cfg, limit_files))
            _save(data, out_path)
        return data
    model = AutoModelForCausalLM.from_pretrained(target_dir).eval()
    t0 = time.time()
    parts, sampled, val = [], [], None
    for split, n, temp, seed in [("train", cfg.n_greedy, 0.0, cfg.seed),
                                 ("train", cfg.n_sampled, cfg.temperature, cfg.seed + 1),
                                 ("validation", cfg.n_val, 0.0, cfg.seed + 2)]:
        if n == 0:
            continue
        data = tokenize_split(split, target_dir, cache_dir, limit_files=limit_files)
        ids = continue_prompts(model, cut_prompts(data, n, cfg.prompt_len, seed), cfg.gen_len,
                               cfg.batch_size, temp, seed, desc=f"teacher {split} T={temp}")
        if split == "validation":
            val = ids.to(torch.int32)
        else:
            parts.append(ids.to(torch.int32))
            sampled.append(torch.full((len(ids),), temp > 0))
    data = {"ids": torch.cat(parts), "sampled": torch.cat(sampled), "val_ids": val,
            "prompt_len": cfg.prompt_len, "config": asdict(cfg), "seconds": time.time() - t0}
    if cfg.n_docstring:
        data.update(_docstring_sets(model, target_dir, cfg, limit_files))
    _save(data, out_path)
    return data


def _docstring_sets(model, target_dir, cfg: TeacherConfig, limit_files) -> dict:
    """doc_ids (train files) and val_doc_ids (validation files): greedy continuations of
    prompts that end after a docstring."""
    from deer_serve.training.corpus import list_files

    t0 = time.time()
    out = {}
    for split, key, n, seed in [("train", "doc_ids", cfg.n_docstring, cfg.seed + 3),
                                ("validation", "val_doc_ids", cfg.n_val_docstring, cfg.seed + 4)]:
        if not n:
            continue
        files = list_files(split)
        files = files[:limit_files] if limit_files else files
        prompts = cut_docstring_prompts(files, Path(target_dir) / "tokenizer.json", n, cfg.prompt_len, seed)
        out[key] = continue_prompts(model, prompts, cfg.gen_len, cfg.batch_size, 0.0, seed,
                                    desc=f"teacher {split} docstring").to(torch.int32)
    out["doc_config"] = {"n_docstring": cfg.n_docstring, "n_val_docstring": cfg.n_val_docstring,
                         "seconds": time.time() - t0}
    return out


def _save(data: dict, out_path: Path) -> None:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp")
    torch.save(data, tmp)
    tmp.replace(out_path)
