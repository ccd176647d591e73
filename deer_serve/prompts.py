"""Prompt files: one {"prompt": "..."} a line (JSONL; blank lines skipped), as `deer-serve
generate --prompts` and `deer-serve train drafter --prompts` read them."""

from __future__ import annotations

import json
from pathlib import Path


class PromptsError(ValueError):
    """A prompts file that cannot be used (the CLIs report it with exit code 2)."""


def read_prompt_lines(path) -> list[tuple[int, str]]:
    """[(line number, prompt)] of a JSONL prompts file; empty prompts are kept (callers decide)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise PromptsError(f"cannot read --prompts {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise PromptsError(f"--prompts {path}: not UTF-8 text") from None
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptsError(f"{path}:{i}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise PromptsError(f'{path}:{i}: expected {{"prompt": "..."}}')
        out.append((i, obj["prompt"]))
    return out
