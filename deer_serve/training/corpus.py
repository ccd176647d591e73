"""The embedded default corpus: the Python standard library source of the running interpreter.

Every `*.py` file under `sysconfig.get_paths()["stdlib"]`, sorted by relative path, minus the
directories in `EXCLUDED_DIRS` (about 560 files, 10.6 MB on CPython 3.11). The split is by file
and deterministic: a file goes to validation when `int(sha1(relpath).hexdigest(), 16) % 50 == 0`
(about 2-3% of the files), else to training.

`tokenize_split` turns a split into one long int32 array (files joined by `<|endoftext|>`),
cached as .npy under a cache dir, keyed by the tokenizer file's hash.

No Ray / pydantic imports here.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path
from typing import Iterable, Literal

import numpy as np

Split = Literal["train", "validation"]

EXCLUDED_DIRS = frozenset(
    {
        "test",
        "tests",
        "idlelib",
        "lib2to3",
        "site-packages",
        "__pycache__",
        "ensurepip",
        "turtledemo",
        "tkinter",
    }
)
VAL_MODULUS = 50
EOT = "<|endoftext|>"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _relpath(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def split_of(relpath: str) -> Split:
    """The split a file belongs to, from its POSIX path relative to the stdlib root."""
    h = int(hashlib.sha1(relpath.encode("utf-8")).hexdigest(), 16)
    return "validation" if h % VAL_MODULUS == 0 else "train"


def all_files(root: Path | None = None) -> list[Path]:
    """All corpus files (both splits), sorted by relative path."""
    root = root or stdlib_root()
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if EXCLUDED_DIRS.intersection(rel.parts[:-1]):
            continue
        if not p.is_file():
            continue
        out.append(p)
    return sorted(out, key=lambda p: _relpath(p, root))


def list_files(split: Split, root: Path | None = None) -> list[Path]:
    """The files of one split ("train" or "validation"), sorted by relative path."""
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    root = root or stdlib_root()
    return [p for p in all_files(root) if split_of(_relpath(p, root)) == split]


def read_text(path: Path) -> str:
    # newline="" keeps the bytes' line endings as they are; stdlib sources are UTF-8.
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        return f.read()


def read_texts(split: Split, root: Path | None = None) -> list[str]:
    return [read_text(p) for p in list_files(split, root)]


def _file_sha(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()[:12]


def tokenize_files(files: Iterable[Path], tokenizer_file: Path) -> np.ndarray:
    """Tokenize files into one int32 array, `<|endoftext|>` after each file."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    eot = tok.token_to_id(EOT)
    if eot is None:
        raise ValueError(f"tokenizer has no {EOT} token")
    texts = [read_text(p) for p in files]
    encs = tok.encode_batch(texts, add_special_tokens=False)
    parts = []
    for e in encs:
        parts.append(np.asarray(e.ids, dtype=np.int32))
        parts.append(np.asarray([eot], dtype=np.int32))
    if not parts:
        return np.zeros(0, dtype=np.int32)
    return np.concatenate(parts)


def tokenize_split(
    split: Split,
    tokenizer_dir: str | Path,
    cache_dir: str | Path,
    limit_files: int | None = None,
    root: Path | None = None,
) -> np.ndarray:
    """One split as one long int32 token array (files joined by `<|endoftext|>`), cached.

    `limit_files` keeps only the first N files of the split (for smoke runs and tests).
    The cache file name carries the split, the limit and the tokenizer's hash.
    """
    tokenizer_file = Path(tokenizer_dir) / "tokenizer.json"
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tag = "all" if limit_files is None else f"first{limit_files}"
    cache = cache_dir / f"{split}-{tag}-{_file_sha(tokenizer_file)}.npy"
    if cache.exists():
        return np.load(cache)
    files = list_files(split, root)
    if limit_files is not None:
        files = files[:limit_files]
    arr = tokenize_files(files, tokenizer_file)
    tmp = cache.with_suffix(".tmp.npy")
    np.save(tmp, arr)
    tmp.replace(cache)
    return arr
