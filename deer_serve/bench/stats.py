"""From `Sample`s to the numbers in results.json (pure functions: no models, no I/O).

Definitions (DESIGN.md section 5):
  tokens_per_s          all new tokens of the method / all its wall time (every prompt, repeat)
  tokens_per_s_median   medians over repeats, taken per prompt: sum over prompts of the median
                        new tokens / sum over prompts of the median wall time (a load spike on a
                        shared machine then spoils one sample, not a whole repeat); with one
                        repeat it equals tokens_per_s. tokens_per_s_by_repeat gives each repeat's
                        tokens / wall time for comparison
  tokens_per_s_best     the same with each prompt's fastest repeat (load on a shared machine
                        only ever adds time; with 3+ repeats this is the least noisy number)
  speedup_vs_ar         tokens_per_s_median / ar's tokens_per_s_median (same run: medians over
                        repeats, as the design asks); speedup_vs_ar_total uses tokens_per_s,
                        speedup_vs_ar_best tokens_per_s_best
  mean_accepted (tau)   mean accepted draft tokens per cycle (bonus/correction not counted)
  accept_hist           counts of accepted length 0..max(k, max_accepted)
  ms_per_cycle          draft / verify / other milliseconds per cycle (cycle = target forward
                        after the prefill); prefill_ms is per request
  tokens_per_target_forward  new tokens / target forwards (prefill included), for every method
  identical_to_ar       temperature 0 only: every prompt and repeat gave ar's token ids
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:  # (no torch import for the servers bench, which only reads numbers)
    from deer_serve.bench.methods import Sample

Grid = Sequence[Sequence[Optional["Sample"]]]  # [prompt][repeat]; None: not run (yet)


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or f"{os.cpu_count()}-core CPU"


def ids_sha1(ids: Sequence[int]) -> str:
    """A token id list's short digest (samples.jsonl `ids_sha1`): equal ids, equal digests."""
    return hashlib.sha1(json.dumps(list(ids)).encode()).hexdigest()[:16]


def first_diff(a: Sequence[int], b: Sequence[int]) -> Optional[int]:
    """Index of the first differing token (or the shorter length), None when equal."""
    if list(a) == list(b):
        return None
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def identity(grid: Grid, ar: Optional[Grid], prompt_ids: Sequence[str]) -> dict:
    """Compare every sample with ar's sample of the same prompt and repeat."""
    if ar is None:
        return {"identical_to_ar": None}
    bad = []
    for i, row in enumerate(grid):
        for r, s in enumerate(row):
            ref = ar[i][r] if r < len(ar[i]) else None
            if s is None or ref is None:
                continue
            d = first_diff(s.token_ids, ref.token_ids)
            if d is not None:
                bad.append({"prompt": prompt_ids[i], "repeat": r, "first_diff_at": d,
                            "len": len(s.token_ids), "ar_len": len(ref.token_ids)})
    return {"identical_to_ar": not bad, "n_mismatched": len(bad), "mismatches": bad[:10]}


def complete(grid: Grid) -> list[list[Sample]]:
    """The grid itself, checked to hold every sample (ValueError when one is missing)."""
    rows = [[s for s in row if s is not None] for row in grid]
    if any(len(r) != len(row) for r, row in zip(rows, grid)):
        raise ValueError("a [prompt][repeat] sample is missing")
    return rows


def summarize(grid: Grid, *, block_size: Optional[int] = None) -> dict:
    """Per-method numbers from its [prompt][repeat] samples (all must be present)."""
    grid = complete(grid)
    samples = [s for row in grid for s in row]
    tokens = sum(len(s.token_ids) for s in samples)
    wall = sum(s.wall_s for s in samples)
    repeats = len(grid[0]) if grid else 0
    per_repeat = []
    for r in range(repeats):
        t = sum(len(row[r].token_ids) for row in grid)
        w = sum(row[r].wall_s for row in grid)
        per_repeat.append(t / w if w > 0 else 0.0)
    best = [min(row, key=lambda x: x.wall_s / max(1, len(x.token_ids))) for row in grid]
    best_wall = sum(x.wall_s for x in best)
    med_tokens = sum(statistics.median(len(x.token_ids) for x in row) for row in grid)
    med_wall = sum(statistics.median(x.wall_s for x in row) for row in grid)
    out = {
        "block_size": block_size,
        "n_samples": len(samples),
        "new_tokens": tokens,
        "wall_s": round(wall, 4),
        "tokens_per_s": round(tokens / wall, 3) if wall > 0 else None,
        "tokens_per_s_median": round(med_tokens / med_wall, 3) if med_wall > 0 else None,
        "tokens_per_s_best": round(sum(len(x.token_ids) for x in best) / best_wall, 3)
        if best_wall > 0 else None,
        "tokens_per_s_by_repeat": [round(x, 3) for x in per_repeat],
    }
    out.update(acceptance(samples, block_size))
    cycles = sum(s.cycles for s in samples)
    fwd = [s.target_forwards for s in samples]
    n_fwd = sum(f for f in fwd if f is not None) if None not in fwd else 0  # 0: not known
    out["cycles"] = cycles
    out["tokens_per_target_forward"] = round(tokens / n_fwd, 3) if n_fwd else None
    out.update(breakdown(samples, cycles))
    extra = _sum_extra(samples)
    if extra:
        out.update(extra)
    return out


def acceptance(samples: Sequence[Sample], block_size: Optional[int]) -> dict:
    if any(s.accept_lengths is None for s in samples):
        return {"mean_accepted": None, "max_accepted": None, "accept_hist": None}
    acc = [a for s in samples for a in s.accept_lengths or ()]
    if not acc:
        return {"mean_accepted": 0.0, "max_accepted": 0, "accept_hist": [0] * ((block_size or 0) + 1)}
    hist = [0] * (max(block_size or 0, max(acc)) + 1)
    for a in acc:
        hist[a] += 1
    return {"mean_accepted": round(sum(acc) / len(acc), 4), "max_accepted": max(acc),
            "accept_hist": hist,
            "all_accepted_frac": round(hist[block_size] / len(acc), 4) if block_size else None}


def breakdown(samples: Sequence[Sample], cycles: int) -> dict:
    keys = sorted({k for s in samples for k in s.timings} - {"prefill"})
    tot = {k: sum(s.timings.get(k, 0.0) for s in samples) for k in keys}
    pre = sum(s.timings.get("prefill", 0.0) for s in samples)
    return {"ms_per_cycle": {k: round(1e3 * v / cycles, 3) for k, v in tot.items()} if cycles else {},
            "prefill_ms": round(1e3 * pre / len(samples), 3) if samples else None}


def _sum_extra(samples: Sequence[Sample]) -> dict:
    hits = sum(int(s.extra.get("pipeline_hits", 0)) for s in samples)
    misses = sum(int(s.extra.get("pipeline_misses", 0)) for s in samples)
    out: dict = {}
    if any("pipeline_hits" in s.extra for s in samples):
        out["pipeline_hits"], out["pipeline_misses"] = hits, misses
        out["pipeline_hit_rate"] = round(hits / (hits + misses), 4) if hits + misses else None
    if any("lookup_calls" in s.extra for s in samples):
        calls = sum(int(s.extra.get("lookup_calls", 0)) for s in samples)
        out["lookup_hit_rate"] = round(sum(int(s.extra.get("lookup_hits", 0))
                                           for s in samples) / calls, 4) if calls else None
    if any("vllm_drafts" in s.extra for s in samples):  # vLLM's native DFlash counters
        drafts = sum(int(s.extra.get("vllm_drafts", 0)) for s in samples)
        out["mean_accepted"] = round(sum(int(s.extra.get("vllm_accepted", 0))
                                         for s in samples) / drafts, 4) if drafts else None
    if any(s.extra.get("fallback") for s in samples):
        out["fallbacks"] = sum(bool(s.extra.get("fallback")) for s in samples)
    return out


def add_speedups(methods: dict) -> None:
    """speedup_vs_ar (medians over repeats), speedup_vs_ar_total and _best, in place."""
    ar = methods.get("ar") or {}
    for key, src in (("speedup_vs_ar", "tokens_per_s_median"),
                     ("speedup_vs_ar_total", "tokens_per_s"),
                     ("speedup_vs_ar_best", "tokens_per_s_best")):
        base = ar.get(src)
        for m in methods.values():
            v = m.get(src)
            m[key] = round(v / base, 4) if v and base else None
