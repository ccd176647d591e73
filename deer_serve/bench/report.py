"""report.md and the PNG plots of `deer-serve bench`, from results.json's dict alone.

Plots (matplotlib, Agg backend, written next to report.md):
  speedup.png             tokens/s over ar per method, one bar group per temperature
  accept_hist.png         histogram of accepted lengths of every deer block size (fraction of cycles)
  tau_vs_block_size.png   tau (and speedup) against block size, one line per temperature
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

PLOTS = ("speedup.png", "accept_hist.png", "tau_vs_block_size.png")


def _f(x, fmt="{:.2f}", none="-") -> str:
    return none if x is None else fmt.format(x)


def _ident(row: dict) -> str:
    v = row.get("identical_to_ar")
    return {True: "yes", False: "**NO**", None: "n/a"}[v]


def _ms(row: dict) -> str:
    m = row.get("ms_per_cycle") or {}
    if not m:
        return "-"
    parts = [f"{m.get(k, 0.0):.1f}" for k in ("draft", "verify", "other")]
    extra = [f"{k} {v:.1f}" for k, v in m.items() if k not in ("draft", "verify", "other")]
    return " / ".join(parts) + (f" ({', '.join(extra)})" if extra else "")


def method_table(methods: dict) -> str:
    head = ("| method | k | tok/s (median) | speedup vs ar | speedup, best of repeats | tau "
            "| max accepted | tokens / target fwd | identical to ar "
            "| ms per cycle: draft / verify / other | prefill ms |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for name, r in methods.items():
        if "error" in r:
            rows.append(f"| {name} | {_f(r.get('block_size'), '{}')} | error: {r['error'][:120]} "
                        "| | | | | | | | |")
            continue
        k = _f(r.get('block_size'), '{}')
        if r.get("adaptive_k"):
            k = f"0-{k}"  # adaptive: up to the block size, 0 = plain AR steps
        rows.append(
            f"| {name} | {k} | {_f(r.get('tokens_per_s_median'), '{:.1f}')} "
            f"| {_f(r.get('speedup_vs_ar'), '{:.2f}x')} | {_f(r.get('speedup_vs_ar_best'), '{:.2f}x')} "
            f"| {_f(r.get('mean_accepted'))} "
            f"| {_f(r.get('max_accepted'), '{}')} | {_f(r.get('tokens_per_target_forward'))} "
            f"| {_ident(r)} | {_ms(r)} | {_f(r.get('prefill_ms'), '{:.1f}')} |")
    gated = [f"{n}: {r['gate']['gated']} requests started with drafting off, "
             f"{r['gate']['probes']} probes" for n, r in methods.items() if r.get("gate")]
    note = ("\nDraftGate (cumulative over the run): " + "; ".join(gated) + "\n") if gated else ""
    return head + "\n".join(rows) + "\n" + note


def service_table(methods: dict) -> Optional[str]:
    svc = {n: r for n, r in methods.items() if "throughput_by_concurrency" in r}
    if not svc:
        return None
    cs = sorted({c for r in svc.values() for c in r["throughput_by_concurrency"]}, key=int)
    head = ("| method | single-stream tok/s | " + " | ".join(f"c={c} tok/s" for c in cs)
            + " | pipeline hit rate | identical under concurrency |\n|---|---|"
            + "---|" * len(cs) + "---|---|\n")
    rows = []
    for n, r in svc.items():
        t = r["throughput_by_concurrency"]
        rows.append(f"| {n} | {_f(r.get('tokens_per_s_median'), '{:.1f}')} | "
                    + " | ".join(_f(t.get(c), "{:.1f}") for c in cs)
                    + f" | {_f(r.get('pipeline_hit_rate'), '{:.1%}', 'not reported')} | "
                    + {True: "yes", False: "**NO**", None: "n/a"}[r.get("concurrent_identical_to_ar")]
                    + " |")
    return head + "\n".join(rows) + "\n"


def cost_lines(methods: dict) -> list[str]:
    """Why a method is as fast as it is: tokens per cycle against what a cycle costs in plain
    AR steps (the break-even tokens per cycle). Prefill is left out of both; the timings are
    totals over all samples, so compare with speedup_vs_ar_total, not the median one."""
    ar = methods.get("ar") or {}
    step = sum((ar.get("ms_per_cycle") or {}).values())
    if not step:
        return []
    out = [f"- ar: one plain step costs {step:.1f} ms "
           f"({_ms(ar)} ms draft / verify / other)."]
    for name, r in methods.items():
        cyc, ms = r.get("cycles"), r.get("ms_per_cycle") or {}
        if name == "ar" or "error" in r or not cyc or not ms or r.get("mean_accepted") is None:
            continue
        cost = sum(ms.values())
        tpc = (r["new_tokens"] - r["n_samples"]) / cyc  # the prefill emits one token per request
        out.append(f"- {name}: {tpc:.2f} tokens per cycle (tau {r['mean_accepted']:.2f}); a cycle "
                   f"costs {cost:.1f} ms = {cost / step:.2f} plain steps (draft / verify / other "
                   f"{_ms(r)} ms), so break-even is {cost / step:.2f} tokens per cycle and the "
                   f"expected speedup {tpc * step / cost:.2f}x (measured over the same samples: "
                   f"{_f(r.get('speedup_vs_ar_total'), '{:.2f}x')}).")
    return out


def summary_table(results: dict) -> str:
    """A plain-text table for the terminal."""
    lines = []
    for run in results["runs"]:
        lines.append(f"temperature {run['temperature']:g}:")
        lines.append(f"  {'method':<16}{'k':>4}{'tok/s':>9}{'speedup':>9}{'tau':>7}{'max':>5}"
                     f"{'ident':>7}")
        for name, r in run["methods"].items():
            if "error" in r:
                lines.append(f"  {name:<16}  ERROR {r['error'][:90]}")
                continue
            lines.append(f"  {name:<16}{_f(r.get('block_size'), '{}'):>4}"
                         f"{_f(r.get('tokens_per_s_median'), '{:.1f}'):>9}"
                         f"{_f(r.get('speedup_vs_ar'), '{:.2f}x'):>9}"
                         f"{_f(r.get('mean_accepted')):>7}{_f(r.get('max_accepted'), '{}'):>5}"
                         f"{_ident(r).strip('*'):>7}")
    return "\n".join(lines)


def write_report(results: dict, out_dir: str | Path) -> None:
    out = Path(out_dir)
    made = write_plots(results, out)
    m, s = results["machine"], results["settings"]
    lines = [
        "# deer-serve bench",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), "
        f"GPU: {m['gpu'] or 'none'}; Python {m['python']}, torch {m['torch']}, "
        f"transformers {m['transformers']}, ray {m['ray'] or '-'}; "
        f"load average at start {m['loadavg_at_start']}, at end {m.get('loadavg_at_end')}.",
        "",
        f"Suite: {results['suite']}, {results['n_prompts']} prompts (mean "
        f"{s['prompt_tokens_mean']} tokens); max_new_tokens {s['max_new_tokens']}; "
        f"repeats {s['repeats']} (medians reported); block sizes {s['block_sizes']} "
        f"(`deer` = k {s['main_block_size']}); EOS id {s['eos_token_id']}. "
        f"All methods ran interleaved in one run; total {results['total_s']} s.",
        "",
        f"Target `{s['target']}`, drafter `{s['drafter']}`, AR draft `{s['ar_draft']}`.",
        "",
        *([] if results.get("complete", True) else [
            "**Partial: later temperatures were still running when this was written.**", ""]),
        "tau = mean accepted draft tokens per cycle (bonus/correction not counted); a cycle is "
        "one target forward after the prefill. For hf-assisted and pld tau and tokens per "
        "forward are read from the target's cache length before each forward.",
        "",
    ]
    for run in results["runs"]:
        lines += [f"## Temperature {run['temperature']:g}", "", method_table(run["methods"])]
        cost = cost_lines(run["methods"])
        if cost:
            lines += ["Cost per cycle (from the timings above):", ""] + cost + [""]
        st = service_table(run["methods"])
        if st:
            lines += ["Service methods (throughput = all new tokens / wall time with c requests "
                      "in flight):", "", st]
    if results.get("warnings"):
        lines += ["## Warnings", ""] + [f"- {w}" for w in results["warnings"]] + [""]
    if made:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in made] + [""]
    (out / "report.md").write_text("\n".join(lines))


def write_plots(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    runs = results["runs"]
    ok = lambda r: "error" not in r  # noqa: E731

    # 1. speedup per method, grouped by temperature
    names = [n for n in runs[0]["methods"]]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names) + 2), 4))
    w = 0.8 / len(runs)
    for j, run in enumerate(runs):
        vals = [(run["methods"].get(n) or {}).get("speedup_vs_ar") or 0.0 for n in names]
        bars = ax.bar([i + j * w for i in range(len(names))], vals, w, label=f"T={run['temperature']:g}")
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom",
                        fontsize=7)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks([i + w * (len(runs) - 1) / 2 for i in range(len(names))], names, rotation=30,
                  ha="right")
    ax.set_ylabel("speedup vs ar (tokens/s, median over repeats)")
    ax.set_title(f"{results['suite']}, {results['n_prompts']} prompts")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / PLOTS[0], dpi=110)
    plt.close(fig)
    made.append(PLOTS[0])

    # 2. histogram of accepted lengths, one panel per deer block size
    deer = [n for n in names if n == "deer" or n.startswith("deer@")]
    deer = [n for n in deer if any(ok(r["methods"].get(n, {"error": 1})) and
                                   r["methods"][n].get("accept_hist") for r in runs)]
    if deer:
        deer.sort(key=lambda n: runs[0]["methods"][n].get("block_size") or 0)
        fig, axes = plt.subplots(1, len(deer), figsize=(3.6 * len(deer) + 1, 3.4), squeeze=False)
        for ax, n in zip(axes[0], deer):
            for j, run in enumerate(runs):
                r = run["methods"].get(n) or {}
                h = r.get("accept_hist") if ok(r) else None
                if not h:
                    continue
                tot = sum(h) or 1
                ax.bar([i + j * w for i in range(len(h))], [c / tot for c in h], w,
                       label=f"T={run['temperature']:g} (tau {r['mean_accepted']:.2f})")
            ax.set_title(f"{n} (k={runs[0]['methods'][n]['block_size']})")
            ax.set_xlabel("accepted draft tokens per cycle")
            ax.set_ylabel("fraction of cycles")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / PLOTS[1], dpi=110)
        plt.close(fig)
        made.append(PLOTS[1])

    # 3. tau (and speedup) against block size
    if deer:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
        ks = sorted({r["block_size"] for run in runs for n, r in run["methods"].items()
                     if n in deer and ok(r)})
        for run in runs:
            pts = sorted((r["block_size"], r.get("mean_accepted"), r.get("speedup_vs_ar"))
                         for n, r in run["methods"].items() if n in deer and ok(r))
            if not pts:
                continue
            lab = f"T={run['temperature']:g}"
            a1.plot([p[0] for p in pts], [p[1] or 0 for p in pts], "o-", label=lab)
            a2.plot([p[0] for p in pts], [p[2] or 0 for p in pts], "o-", label=lab)
        for ax, yl in ((a1, "tau (mean accepted per cycle)"), (a2, "speedup vs ar")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(ks, [str(k) for k in ks])
            ax.minorticks_off()
            ax.set_xlabel("block size k")
            ax.set_ylabel(yl)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        a2.axhline(1.0, color="grey", lw=0.8, ls="--")
        fig.tight_layout()
        fig.savefig(out / PLOTS[2], dpi=110)
        plt.close(fig)
        made.append(PLOTS[2])
    return made
