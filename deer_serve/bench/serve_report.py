"""Summaries and the report of `deer-serve bench-serve` (deer_serve.bench.servers), from
recorded numbers alone: per-level summaries, token identity against the reference server,
warnings, results.json, report.md and servers.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from deer_serve.bench.serve_client import RequestRecord
from deer_serve.bench.stats import first_diff


# ---- aggregation (pure) -------------------------------------------------------------------------

def percentile(xs: Sequence[float], p: float) -> Optional[float]:
    """Linear interpolation between closest ranks (numpy's default); None for no data."""
    if not xs:
        return None
    s = sorted(xs)
    pos = (len(s) - 1) * p / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize_level(records: Sequence[RequestRecord], wall_s: float) -> dict:
    ok = [r for r in records if r.error is None]
    tokens = sum(r.tokens for r in ok)
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    tpot = [t for t in (r.tpot_s for r in ok) if t is not None]
    lat = [r.latency_s for r in ok if r.latency_s is not None]
    taus = [r.mean_accepted for r in ok if r.mean_accepted is not None]
    ms = lambda x: None if x is None else round(1000 * x, 3)  # noqa: E731
    return {
        "requests": len(records), "ok": len(ok), "errors": len(records) - len(ok),
        "tokens": tokens, "wall_s": round(wall_s, 4),
        "tokens_per_s": round(tokens / wall_s, 2) if wall_s > 0 else None,
        "ttft_ms_p50": ms(percentile(ttft, 50)), "ttft_ms_p90": ms(percentile(ttft, 90)),
        "tpot_ms_p50": ms(percentile(tpot, 50)), "tpot_ms_p90": ms(percentile(tpot, 90)),
        "latency_ms_p50": ms(percentile(lat, 50)), "latency_ms_p90": ms(percentile(lat, 90)),
        "mean_accepted": round(sum(taus) / len(taus), 3) if taus else None,
    }


def identity(records: Sequence[RequestRecord], reference: dict[str, list[int]]) -> dict:
    """{"identical": n, "compared": n, "mismatches": [{prompt_id, first_diff, ...}]}: token ids
    against the reference's, per prompt (prompts the reference lacks or errored are not
    compared)."""
    same, compared, mism = 0, 0, []
    for r in records:
        ref = reference.get(r.prompt_id)
        if ref is None or r.error is not None:
            continue
        compared += 1
        d = first_diff(r.token_ids, ref)
        if d is None:
            same += 1
        else:
            mism.append({"prompt_id": r.prompt_id, "first_diff": d, "tokens": r.tokens,
                         "reference_tokens": len(ref),
                         "got": r.token_ids[d:d + 8], "reference": ref[d:d + 8]})
    return {"identical": same, "compared": compared, "mismatches": mism}


def reference_ids(results: dict, reference: str) -> Optional[dict[str, list[int]]]:
    """The reference server's token ids per prompt, at its lowest concurrency."""
    srv = results["servers"].get(reference)
    if not srv or not srv.get("levels"):
        return None
    lowest = min(srv["levels"], key=int)
    return {r["prompt_id"]: r["token_ids"] for r in srv["levels"][lowest]["records"]
            if r["error"] is None and r.get("round", 1) == 1}


def as_record(r: dict) -> RequestRecord:
    """A results.json record as a RequestRecord (without the derived or pooled fields)."""
    return RequestRecord(**{k: v for k, v in r.items() if k not in ("tpot_s", "round")})


def add_identity(results: dict) -> None:
    """Fill each level's `identity` against results['settings']['reference']."""
    ref_name = results["settings"]["reference"]
    ref = reference_ids(results, ref_name)
    for srv in results["servers"].values():
        for lvl in srv.get("levels", {}).values():
            if ref is None:
                lvl["identity"] = None
                continue
            lvl["identity"] = identity([as_record(r) for r in lvl["records"]], ref)


# ---- report -------------------------------------------------------------------------------------

def _f(x, fmt="{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def report_table(results: dict) -> str:
    ref = results["settings"]["reference"]
    lines = [f"| server | concurrency | output tok/s | TTFT p50 / p90 ms | TPOT p50 / p90 ms | "
             f"requests (errors) | identical to {ref} | tau |",
             "|---|---|---|---|---|---|---|---|"]
    for name, srv in results["servers"].items():
        if srv.get("error") and not srv.get("levels"):
            lines.append(f"| {name} | - | failed: {srv['error'].splitlines()[0][:80]} "
                         "| | | | | |")
        for c, lvl in sorted(srv.get("levels", {}).items(), key=lambda kv: int(kv[0])):
            s, ident = lvl["summary"], lvl.get("identity")
            idt = "-" if not ident else f"{ident['identical']}/{ident['compared']}"
            lines.append(
                f"| {name} | {c} | {_f(s['tokens_per_s'])} | {_f(s['ttft_ms_p50'])} / "
                f"{_f(s['ttft_ms_p90'])} | {_f(s['tpot_ms_p50'], '{:.2f}')} / "
                f"{_f(s['tpot_ms_p90'], '{:.2f}')} | {s['requests']} ({s['errors']}) | {idt} | "
                f"{_f(s['mean_accepted'], '{:.2f}')} |")
    return "\n".join(lines)


def rounds_table(results: dict) -> Optional[str]:
    """With --rounds > 1: each round's tok/s per server and level (the main table's is their
    median), and the round-by-round ratio to the reference server."""
    ref = results["settings"]["reference"]
    rows = [(n, s) for n, s in results["servers"].items() if s.get("rounds", 1) > 1]
    if not rows:
        return None
    ref_levels = results["servers"].get(ref, {}).get("levels", {})
    lines = [f"| server | concurrency | tok/s by round | median | against {ref}, by round |",
             "|---|---|---|---|---|"]
    for name, srv in rows:
        for c, lvl in sorted(srv.get("levels", {}).items(), key=lambda kv: int(kv[0])):
            s = lvl["summary"]
            rates = s.get("tokens_per_s_rounds") or []
            base = (ref_levels.get(c) or {}).get("summary", {}).get("tokens_per_s_rounds") or []
            ratios = [f"{x / b:.2f}x" if x and b else "-" for x, b in zip(rates, base)]
            lines.append(f"| {name} | {c} | {' / '.join(_f(x) for x in rates)} | "
                         f"{_f(s['tokens_per_s'])} | {' / '.join(ratios) or '-'} |")
    return "\n".join(lines)


def vllm_bench_table(results: dict) -> Optional[str]:
    rows = [(name, srv["vllm_bench"]) for name, srv in results["servers"].items()
            if srv.get("vllm_bench")]
    if not rows:
        return None
    lines = ["| server | max concurrency | output tok/s | requests (failed) | output tokens | "
             "TTFT p50 ms | TPOT p50 ms |", "|---|---|---|---|---|---|---|"]
    for name, runs in rows:
        for c, r in sorted(runs.items(), key=lambda kv: int(kv[0])):
            if "error" in r:
                lines.append(f"| {name} | {c} | failed: {r['error'][:80]} | | | | |")
                continue
            lines.append(f"| {name} | {c} | {_f(r['output_throughput'])} | "
                         f"{r['completed']} ({r['failed']}) | {r['total_output_tokens']} | "
                         f"{_f(r['median_ttft_ms'])} | {_f(r['median_tpot_ms'], '{:.2f}')} |")
    return "\n".join(lines)


def mismatch_lines(results: dict) -> list[str]:
    out = []
    for name, srv in results["servers"].items():
        for c, lvl in sorted(srv.get("levels", {}).items(), key=lambda kv: int(kv[0])):
            for m in (lvl.get("identity") or {}).get("mismatches", []):
                out.append(f"- {name} c={c} {m['prompt_id']}: first differing token at "
                           f"{m['first_diff']} ({m['tokens']} vs {m['reference_tokens']} tokens; "
                           f"got {m['got']}, reference {m['reference']})")
    return out


def cpu_table(results: dict, top: int = 6) -> str:
    """Per server, at its highest concurrency: the processes that used the most CPU."""
    rows = []
    for name, srv in results["servers"].items():
        levels = srv.get("levels") or {}
        if not levels:
            continue
        c = max(levels, key=int)
        sm = levels[c]["summary"]
        cpu, tokens, wall = sm.get("cpu_s") or {}, sm.get("tokens") or 0, sm.get("wall_s") or 0
        if not cpu or not tokens or not wall:
            continue
        total = sum(cpu.values())
        parts = ", ".join(f"{p} {1000 * v / tokens:.2f}" for p, v in list(cpu.items())[:top])
        rows.append(f"| {name} | {c} | {1000 * total / tokens:.2f} | {total / wall:.2f} | "
                    f"{parts} |")
    if not rows:
        return ""
    return "\n".join(["| server | concurrency | CPU s / 1000 tokens | cores | by process (CPU s / "
                      "1000 tokens) |", "|---|---|---|---|---|"] + rows)


def write_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    st = results["settings"]
    md = [f"# Servers on one target: {', '.join(results['servers'])}", "",
          f"`{results['command']}`", ""]
    for m in results.get("merged_from", []):
        if m["servers"]:
            md += [f"Kept from an earlier run ({', '.join(m['servers'])}; {m['machine']}): "
                   f"`{m['command']}`", ""]
    md += [
          f"{results['machine']}; {st['n_prompts']} prompts of `{st['suite']}`, temperature 0, "
          f"max_tokens {st['max_tokens']}, {st['threads']} OpenMP thread(s) per server process; "
          f"each server alone, warmed up with {st['warmup']} requests; one client "
          + ("(openai AsyncOpenAI, streaming /v1/completions, token ids from the stream). "
             if st.get("stream", True) else
             "(openai AsyncOpenAI, NON-streamed /v1/completions: whole replies, no TTFT / TPOT). ")
          + "tok/s = all output tokens of a level / its wall time; TTFT = request sent -> first "
          "token; TPOT = (latency - TTFT) / (tokens - 1); identical = same token ids as "
          f"`{st['reference']}` at its lowest concurrency; tau = deer-serve's mean accepted "
          "draft tokens per cycle.", "", report_table(results), ""]
    rt = rounds_table(results)
    if rt:
        md += ["## Rounds", "", f"{st.get('rounds')} rounds, each server started afresh and "
               "alone in each, the list reversed every other round; the table above gives the "
               "median tok/s over the rounds and percentiles over every round's requests.", "",
               rt, ""]
    cpu = cpu_table(results)
    if cpu:
        md += ["## Where the CPU went", "", "CPU seconds per 1000 output tokens at each server's "
               "highest concurrency, by process (the server's own session: its Ray or vLLM "
               "processes) and the bench client; cores = CPU seconds / the level's wall time.",
               "", cpu, ""]
    vb = vllm_bench_table(results)
    if vb:
        md += ["## vLLM's own client (`vllm.benchmarks.serve`)", "",
               f"random dataset, {st.get('vllm_bench_input_len')} input tokens, "
               f"{st.get('vllm_bench_output_len')} output, ignore_eos (vLLM only: deer-serve "
               "has no ignore_eos), temperature 0.", "", vb, ""]
    mism = mismatch_lines(results)
    md += ["## Token identity", ""]
    md += (["Mismatches:", ""] + mism if mism else
           ["Every compared request gave the reference's token ids."]) + [""]
    starts = [f"{n}: ready in {s['ready_s']:.0f} s" for n, s in results["servers"].items()
              if s.get("ready_s") is not None]
    if starts:
        md += ["Start-up (process start -> /v1/models answers): " + "; ".join(starts) + ".", ""]
    if results.get("warnings"):
        md += ["## Warnings", ""] + [f"- {w}" for w in results["warnings"]] + [""]
    plots = write_plot(results, out)
    md += [f"![{p}]({p})" for p in plots]
    (out / "report.md").write_text("\n".join(md) + "\n")


def write_plot(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, srv in results["servers"].items():
        lv = sorted(srv.get("levels", {}).items(), key=lambda kv: int(kv[0]))
        if not lv:
            continue
        cs = [int(c) for c, _ in lv]
        a1.plot(cs, [x["summary"]["tokens_per_s"] or 0 for _, x in lv], marker="o", label=name)
        a2.plot(cs, [x["summary"]["ttft_ms_p50"] or 0 for _, x in lv], marker="o", label=name)
    for ax, yl in ((a1, "output tok/s"), (a2, "TTFT p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
    a1.legend(fontsize=8)
    fig.suptitle(f"one client, {results['settings']['n_prompts']} prompts, "
                 f"{results['settings']['max_tokens']} tokens, T=0")
    fig.tight_layout()
    fig.savefig(out / "servers.png", dpi=110)
    plt.close(fig)
    return ["servers.png"]


def warnings(results: dict) -> list[str]:
    w = []
    for name, srv in results["servers"].items():
        if srv.get("error"):
            w.append(f"{name}: {srv['error'].splitlines()[0]}")
        if srv.get("killed_after_grace"):
            w.append(f"{name}: {len(srv['killed_after_grace'])} processes were still running "
                     "after the grace period and were killed")
        for c, lvl in srv.get("levels", {}).items():
            errs = [r["error"] for r in lvl["records"] if r["error"]]
            if errs:
                w.append(f"{name} c={c}: {len(errs)} failed requests (first: {errs[0]})")
    if results["settings"]["reference"] not in results["servers"]:
        w.append(f"reference {results['settings']['reference']!r} was not run: no identity check")
    return w


