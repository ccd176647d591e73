"""Teacher data for D2A: the target's own continuations of prompts cut from the corpus.

Saved as one .pt file: {"ids": (n, P+G) int32, "prompt_len": P, "sampled": (n,) bool}. Training
prompts come from the corpus's train files; a small validation set from its validation files.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from deer_serve.prompts import PromptsError, read_prompt_lines  # noqa: F401  (PromptsError: re-exported)

if TYPE_CHECKING:
    from deer_serve.training.corpus import Split


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
            assert end is not None  # ast.parse sets end_lineno on every node
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


# Generation settings a checkpoint's generation_config.json may carry that would move the
# teacher away from the target's own distribution: switched off for every continuation.
NEUTRAL_GENERATION = dict(num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0,
                          bad_words_ids=None, suppress_tokens=None, begin_suppress_tokens=None,
                          forced_bos_token_id=None, forced_eos_token_id=None, sequence_bias=None,
                          min_p=None, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0)


@torch.inference_mode()
def continue_batch(model, x: torch.Tensor, gen_len: int, temperature: float = 0.0) -> torch.Tensor:
    """(B, P) prompts of one length -> (B, P+gen_len): the target's greedy (temperature 0) or
    sampled continuation, EOS suppressed so every row has gen_len real tokens, no padding.
    Randomness: torch's global generator (seed it before)."""
    kw = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 \
        else dict(do_sample=False)
    pad = model.config.pad_token_id
    if pad is None:   # GPT-2 and others name none; no row is padded anyway
        eos = getattr(model.generation_config, "eos_token_id", None)
        pad = (eos[0] if isinstance(eos, (list, tuple)) and eos else eos) or 0
    x = x.to(model.device)
    y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=gen_len,
                       min_new_tokens=gen_len, pad_token_id=pad, **NEUTRAL_GENERATION, **kw)
    return y[:, :x.shape[1] + gen_len].cpu()


@torch.inference_mode()
def continue_prompts(model, prompts: torch.Tensor, gen_len: int, batch_size: int,
                     temperature: float = 0.0, seed: int = 0, desc: str = "teacher") -> torch.Tensor:
    """(n, P) prompts -> (n, P+gen_len) with the target's continuations (EOS suppressed so every
    row has gen_len real tokens)."""
    out = []
    torch.manual_seed(seed)
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
        out.append(continue_batch(model, prompts[i:i + batch_size], gen_len, temperature))
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
    sets: list[tuple[Split, int, float, int]] = [("train", cfg.n_greedy, 0.0, cfg.seed),
                                                 ("train", cfg.n_sampled, cfg.temperature, cfg.seed + 1),
                                                 ("validation", cfg.n_val, 0.0, cfg.seed + 2)]
    for split, n, temp, seed in sets:
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
    out: dict[str, Any] = {}   # the continuations (tensors) and "doc_config"
    sets: list[tuple[Split, str, int, int]] = [
        ("train", "doc_ids", cfg.n_docstring, cfg.seed + 3),
        ("validation", "val_doc_ids", cfg.n_val_docstring, cfg.seed + 4)]
    for split, key, n, seed in sets:
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


# ---- teacher data from a user's prompts (`deer-serve train drafter`) ----------------------


@dataclass
class PromptTeacherConfig:
    prompt_len: int = 64           # prompts are left-truncated to this many tokens
    gen_len: int = 128             # tokens the target continues (a shorter prompt is continued
                                   #   further: every row has prompt_len + gen_len tokens)
    sampled_fraction: float = 1 / 3  # sampled continuations per greedy one (the preset: 1024/3072)
    temperature: float = 0.7       # of the sampled continuations
    val_fraction: float = 0.1      # prompts held out for the metrics (greedy; at least 1)
    max_val: int = 256
    batch_size: int = 32           # rows per batched `generate` (rows of one prompt length)
    num_threads: int = 2
    seed: int = 0
    device: str = "cpu"


def read_prompts_file(path) -> list[str]:
    """The prompts of a JSONL file, one {"prompt": "..."} a line (blank lines skipped); an
    empty prompt or none at all is an error."""
    out = []
    for i, prompt in read_prompt_lines(path):
        if not prompt.strip():
            raise PromptsError(f"{path}:{i}: empty prompt")
        out.append(prompt)
    if not out:
        raise PromptsError(f'--prompts {path}: no prompts (one {{"prompt": "..."}} a line)')
    return out


def tokenize_prompts(tok, prompts: list[str], prompt_len: int) -> list[list[int]]:
    """Token ids of each prompt as `deer-serve generate` encodes it (no special tokens),
    left-truncated to prompt_len. Needs at least 2 prompts (one is held out)."""
    out = []
    for i, p in enumerate(prompts, 1):
        ids = tok.encode(p, add_special_tokens=False)
        if not ids:
            raise PromptsError(f"prompt {i} is empty after tokenization")
        out.append([int(t) for t in ids[-prompt_len:]])
    if len(out) < 2:
        raise PromptsError(f"{len(out)} prompt: give at least 2 (a slice is held out for "
                           f"validation)")
    return out


def split_prompts(n: int, cfg: PromptTeacherConfig) -> tuple[list[int], list[int], list[int]]:
    """(train, sampled, val) prompt indices: val a seeded slice, sampled a seeded subset of
    train (continued at cfg.temperature)."""
    rng = np.random.default_rng(cfg.seed)
    perm = [int(i) for i in rng.permutation(n)]
    n_val = min(cfg.max_val, n - 1, max(1, round(n * cfg.val_fraction)))
    val, train = sorted(perm[:n_val]), sorted(perm[n_val:])
    n_s = min(len(train), round(len(train) * cfg.sampled_fraction))
    sampled = sorted(int(train[i]) for i in rng.permutation(len(train))[:n_s])
    return train, sampled, val


def _target_identity(target_dir) -> dict:
    """What the teacher depends on in the target directory: its config and weight files."""
    p = Path(target_dir).resolve()
    files = sorted((f.name, f.stat().st_size) for f in p.iterdir()
                   if f.suffix in (".safetensors", ".bin") or f.name.endswith(".index.json"))
    return {"dir": str(p), "config": (p / "config.json").read_text(), "weights": files}


def _digest(obj) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def teacher_from_prompts(target_dir, prompt_ids: list[list[int]], out_path,
                         cfg: PromptTeacherConfig, parts_dir=None) -> dict:
    """Teacher data from a user's prompts (token ids, left-truncated: `tokenize_prompts`):
    greedy continuations of every training prompt, sampled ones of a subset, greedy ones of
    the held-out slice. Saved as `generate_teacher`'s format (+ counts) at out_path.

    Rows are batched by prompt length (no padding: a shorter prompt is continued for
    gen_len + prompt_len - its length tokens). Each finished batch is saved under parts_dir
    (default: out_path's name + "-parts"), so an interrupted run picks up where it stopped; a
    rerun with the same target, prompts and settings reuses out_path as it is."""
    out_path = Path(out_path)
    parts = Path(parts_dir) if parts_dir else out_path.with_name(out_path.stem + "-parts")
    P, G = cfg.prompt_len, cfg.gen_len
    settings = {k: v for k, v in asdict(cfg).items() if k != "num_threads"}
    ident = _target_identity(target_dir)
    fingerprint = _digest([ident, settings, prompt_ids])
    if out_path.exists():
        data = torch.load(out_path)
        if data.get("fingerprint") == fingerprint:
            return data
    train, sampled, val = split_prompts(len(prompt_ids), cfg)
    jobs = [("train", train, 0.0), ("sampled", sampled, cfg.temperature), ("val", val, 0.0)]
    # batches: (job, batch number, prompt indices of one length, temperature)
    batches = []
    for job, idx, temp in jobs:
        by_len: dict[int, list[int]] = {}
        for i in idx:
            by_len.setdefault(len(prompt_ids[i]), []).append(i)
        b = 0
        for L in sorted(by_len, reverse=True):
            rows = by_len[L]
            for s in range(0, len(rows), cfg.batch_size):
                batches.append((job, b, rows[s:s + cfg.batch_size], temp))
                b += 1
    parts.mkdir(parents=True, exist_ok=True)
    part_key = _digest([ident, settings])

    def part_file(job, b):
        return parts / f"{job}-{b:05d}.pt"

    def have(job, b, rows):
        f = part_file(job, b)
        if not f.exists():
            return None
        d = torch.load(f)
        return d if d.get("key") == part_key and d.get("rows") == rows else None

    torch.set_num_threads(cfg.num_threads)
    t0 = time.time()
    results: dict[tuple[str, int], torch.Tensor] = {}
    seconds = 0.0                 # generation time of all batches, this run's and reused ones
    todo = []
    for job, b, rows, temp in batches:
        got = have(job, b, rows)
        if got is None:
            todo.append((job, b, rows, temp))
        else:
            results[(job, b)] = got["ids"]
            seconds += got.get("seconds", 0.0)
    if todo:
        from deer_serve.training.d2a import load_target

        model = load_target(target_dir, cfg.device)
        bar = tqdm(total=len(batches), initial=len(batches) - len(todo), desc="teacher", unit="batch")
        for job, b, rows, temp in todo:
            L = len(prompt_ids[rows[0]])
            x = torch.tensor([prompt_ids[i] for i in rows], dtype=torch.long)      # (B, L)
            torch.manual_seed(int(_digest([cfg.seed, job, b]), 16) % 2**63)  # f(seed, batch): resumable
            tb = time.time()
            y = continue_batch(model, x, G + P - L, temp).to(torch.int32)           # (B, P+G)
            seconds += time.time() - tb
            tmp = part_file(job, b).with_suffix(".tmp")
            torch.save({"key": part_key, "rows": rows, "ids": y, "seconds": time.time() - tb}, tmp)
            tmp.replace(part_file(job, b))
            results[(job, b)] = y
            bar.update(1)
        bar.close()
    rows_of: dict[str, dict[int, torch.Tensor]] = {j: {} for j, _, _ in jobs}
    for job, b, rows, _ in batches:
        for i, r in zip(rows, results[(job, b)]):
            rows_of[job][i] = r
    train_rows = [rows_of["train"][i] for i in train] + [rows_of["sampled"][i] for i in sampled]
    data = {"ids": torch.stack(train_rows), "val_ids": torch.stack([rows_of["val"][i] for i in val]),
            "sampled": torch.tensor([False] * len(train) + [True] * len(sampled)),
            "prompt_len": P, "config": asdict(cfg), "seconds": round(seconds, 2),
            "wall_seconds": round(time.time() - t0, 2),
            "prompt_index": torch.tensor(train + sampled), "val_prompt_index": torch.tensor(val),
            "n_prompts": len(prompt_ids), "short_prompts": sum(len(p) < P for p in prompt_ids),
            "fingerprint": fingerprint}
    _save(data, out_path)
    return data
