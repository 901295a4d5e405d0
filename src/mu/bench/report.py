"""Write a benchmark result: bench.json (everything), bench.md (tables) and PNG plots, each atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from mu.atomic import atomic_file

PLOTS = ("time_vs_input_length.png", "throughput_vs_batch.png", "memory_vs_input_length.png")
GiB, MiB = 2**30, 2**20


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    with atomic_file(path) as tmp:
        write(str(tmp))


def _write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        Path(tmp).write_text(text)

    _atomic(path, write)


def write_outputs(result: dict, out: Path, plots: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "bench.json", out / "bench.md"]
    _write_text(out / "bench.json", json.dumps(result, indent=1, default=str) + "\n")
    _write_text(out / "bench.md", markdown(result))
    if plots:
        written += write_plots(result, out)
    return written


# ---------------------------------------------------------------------------------------------
# Markdown


def _f(x: Optional[float], fmt: str = "{:.3g}") -> str:
    return "—" if x is None else fmt.format(x)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _ratio_lookup(result: dict) -> dict:
    return {(r["dtype"], r["numerator"], r["denominator"], r["input_length"], r["batch"]): r
            for r in result["ratios"]}


def markdown(result: dict) -> str:
    meta, summary, rows = result["meta"], result["summary"], result["rows"]
    cfg = meta["config"]
    ratios = _ratio_lookup(result)
    archs = list(meta["specs"])
    dtypes = cfg["dtypes"]
    N, S = cfg["new_tokens"], summary["input_length"]
    bw = meta["bandwidth"]
    out = ["# mu bench: encoder-decoder vs decoder-only\n"]
    load = meta.get("load_average")
    out.append(
        f"{meta['date']} · device `{meta['device']}` ({meta['processor']}, {meta.get('isa', 'ISA not recorded')}, "
        f"{meta['threads']} threads) · "
        + (f"int8 kernels: {meta['int8_kernels']} · " if "int8_kernels" in meta else "")
        + f"torch {meta['torch']} · preset `{cfg['preset']}` · {N} new tokens · greedy · {cfg['repeats']} repeats "
        f"after {cfg['warmup']} warm-up · batch>1 prefill: {meta['prefill_batch']} · "
        + ("mu decode steps compiled (generate(compile=True)) · " if cfg.get("compile") else "")
        + "measured read bandwidth "
        f"{bw['read_bytes_per_s'] / 1e9:.1f} GB/s (copy {bw['copy_bytes_per_s'] / 1e9:.1f} GB/s)"
        + (f" · load average at the end {load[0]:.1f}" if load else "") + f" · {meta['wall_s'] / 60:.1f} min\n")
    out.append("Ratios are encoder-decoder / decoder-only of medians over repeats, the two measured in turn "
               "in the same process. For times and bytes below 1 favours the encoder-decoder; for tokens/s "
               "above 1 does.\n")
    out.append("## Models\n")
    model_rows = []
    for a in archs:
        for d, info in result["models"].get(a, {}).items():
            model_rows.append([a, d, info.get("class", "mu"), f"{info['params'] / 1e6:.1f}M",
                               f"{info['weight_bytes'] / MiB:.0f}", f"{info['decode_weight_bytes'] / MiB:.0f}"])
    out.append(_table(["arch", "dtype", "class", "parameters", "weights MiB", "weights read per decode step MiB"],
                      model_rows))

    out.append(f"\n## Summary at input length {S}\n")
    srows = []
    for d, s in summary.get("by_dtype", {}).items():
        by_b = ", ".join(f"B={B}: {_f(v, '{:.2f}x')}" for B, v in s["decode_speedup_by_batch"].items())
        cpu = s["cpu_time"]
        cpu_b = ", ".join(f"B={B}: {_f(v, '{:.2f}x')}" for B, v in cpu["decode_speedup_by_batch"].items())
        srows.append([d, _f(s["ttft_ratio"], "{:.3f}"), by_b, _f(s["e2e_ratio"], "{:.3f}"),
                      _f(s["memory_ratio"], "{:.3f}"), _f(s["memory_increment_ratio"], "{:.3f}"),
                      _f(s["kv_cache_ratio"], "{:.3f}"), _f(s["flops_ratio"], "{:.3f}"),
                      _f(cpu["ttft_ratio"], "{:.3f}"), cpu_b])
    out.append(_table(["dtype", "TTFT ratio", "decode tokens/s speedup", "total time ratio (B=1)",
                       "peak RSS ratio", "RSS increment ratio", "KV-cache ratio", "FLOPs ratio",
                       "TTFT ratio (CPU time)", "decode speedup (CPU time)"], srows))
    out.append("\nCPU-time columns use process CPU seconds instead of wall time: on a shared machine they "
               "leave out the time spent waiting for a core.\n")
    if summary.get("targets"):
        out.append("\nTargets (the issue's, for 330m at input 1024 and 64 new tokens):\n\n")
        out.append(_table(["dtype", "target", "bound", "measured", "met"],
                          [[t["dtype"], t["target"], t["bound"], _f(t["measured"], "{:.3f}"),
                            {True: "yes", False: "**no**", None: "not measured"}[t["met"]]]
                           for t in summary["targets"]]))

    pairs = sorted({(r["numerator"], r["denominator"]) for r in result["ratios"]},
                   key=lambda p: (p != ("encdec", "deconly"), p))
    for d in dtypes:
        drows = [r for r in rows if r["dtype"] == d]
        if not drows:
            continue
        out.append(f"\n## {d}: latency vs input length (batch 1)\n")
        t = []
        for L in cfg["input_lengths"]:
            for a in archs:
                r = _row(drows, a, L, 1)
                if r:
                    t.append([str(L), a, _f(r["ttft_s"], "{:.3f}"), _f(r["decode_ms_median"], "{:.1f}"),
                              _f(r["decode_ms_p90"], "{:.1f}"), _f(r["e2e_s"], "{:.2f}"), _f(r["e2e_tok_s"], "{:.1f}"),
                              _f(r["decode_tok_s"], "{:.1f}"), _f(r["ttft_cpu_s"], "{:.3f}"),
                              _f(r["decode_cpu_ms_median"], "{:.1f}")])
            for p in pairs:
                q = ratios.get((d, *p, L, 1))
                if q:
                    t.append([str(L), f"*{p[0]}/{p[1]}*", _f(q["ttft_s"], "{:.3f}"),
                              _f(q["decode_ms_median"], "{:.3f}"), _f(q["decode_ms_p90"], "{:.3f}"),
                              _f(q["e2e_s"], "{:.3f}"), _f(q["e2e_tok_s"], "{:.3f}"), _f(q["decode_tok_s"], "{:.3f}"),
                              _f(q["ttft_cpu_s"], "{:.3f}"), _f(q["decode_cpu_ms_median"], "{:.3f}")])
        out.append(_table(["input", "arch", "TTFT s", "decode ms/token (median)", "p90", "total s",
                           "tokens/s end-to-end", "decode tokens/s", "TTFT CPU s", "decode CPU ms/token"], t))

        out.append(f"\n## {d}: decode throughput vs batch size (input {S}) and roofline\n")
        out.append("Roofline = (weights read per step + KV cache read per step) / measured read bandwidth; "
                   "fraction = roofline / measured step time (1.0 = memory-bound at full bandwidth).\n\n")
        t = []
        for B in cfg["batch_sizes"]:
            for a in archs:
                r = _row(drows, a, S, B)
                if r:
                    t.append([str(B), a, _f(r["decode_ms_median"], "{:.1f}"), _f(r["decode_ms_p90"], "{:.1f}"),
                              _f(r["decode_tok_s"], "{:.1f}"), f"{r['kv_cache_bytes'] / MiB:.1f}",
                              f"{r['decode_bytes_per_step'] / MiB:.0f}", _f(r["roofline_ms"], "{:.1f}"),
                              _f(r["roofline_fraction"], "{:.2f}")])
            for p in pairs:
                q = ratios.get((d, *p, S, B))
                if q:
                    t.append([str(B), f"*{p[0]}/{p[1]}*", _f(q["decode_ms_median"], "{:.3f}"),
                              _f(q["decode_ms_p90"], "{:.3f}"), _f(q["decode_tok_s"], "{:.3f}"),
                              _f(q["kv_cache_bytes"], "{:.3f}"), "", _f(q["roofline_ms"], "{:.3f}"), ""])
        out.append(_table(["batch", "arch", "ms/step (median)", "p90", "decode tokens/s", "KV cache MiB",
                           "bytes read/step MiB", "roofline ms", "roofline fraction"], t))

        if any(r["peak_rss_bytes"] is not None for r in drows):
            dev = any(r.get("device_peak_bytes") is not None for r in drows)
            out.append(f"\n## {d}: peak memory (one fresh process per configuration)\n")
            out.append("Peak = the worker process's RSS high-water mark (VmHWM); loaded = its RSS with the weights "
                       "loaded and a tiny warm-up generation done (so weights built lazily on first use, like "
                       "fused projections, count as the model's); increment = peak - loaded (activations, KV "
                       "cache, workspace of this configuration).\n\n")
            t = []
            keys = sorted({(r["input_length"], r["batch"]) for r in drows})
            for L, B in keys:
                for a in archs:
                    r = _row(drows, a, L, B)
                    if r and r["peak_rss_bytes"] is not None:
                        ana = r["kv_cache_bytes_analytic"]
                        t.append([str(L), str(B), a, f"{r['peak_rss_bytes'] / GiB:.3f}",
                                  f"{r['rss_loaded_bytes'] / GiB:.3f}", f"{r['increment_bytes'] / MiB:.0f}",
                                  f"{r['kv_cache_bytes'] / MiB:.1f}" + ("" if ana is None else f" / {ana / MiB:.1f}")]
                                 + ([_f(r["device_peak_bytes"] and r["device_peak_bytes"] / GiB, "{:.3f}")]
                                    if dev else []))
                q = ratios.get((d, "encdec", "deconly", L, B))
                if q:
                    t.append([str(L), str(B), "*encdec/deconly*", _f(q["peak_rss_bytes"], "{:.3f}"), "",
                              _f(q["increment_bytes"], "{:.3f}"), _f(q["kv_cache_bytes"], "{:.3f}")]
                             + ([_f(q["device_peak_bytes"], "{:.3f}")] if dev else []))
            out.append(_table(["input", "batch", "arch", "peak RSS GiB", "loaded GiB", "increment MiB",
                               "KV cache MiB (measured / analytic)"] + (["device peak GiB"] if dev else []), t))

        out.append(f"\n## {d}: FLOPs per generation (analytic, per sequence, {N} new tokens)\n")
        t = []
        for L in cfg["input_lengths"]:
            for a in archs:
                r = _row(drows, a, L, 1)
                if r and r["flops_total"] is not None:
                    t.append([str(L), a, f"{r['flops_prefill'] / 1e9:.4g}", f"{r['flops_decode'] / 1e9:.4g}",
                              f"{r['flops_total'] / 1e9:.4g}"])
            q = ratios.get((d, "encdec", "deconly", L, 1))
            if q:
                t.append([str(L), "*encdec/deconly*", _f(q["flops_prefill"], "{:.3f}"),
                          _f(q["flops_decode"], "{:.3f}"), _f(q["flops_total"], "{:.3f}")])
        out.append(_table(["input", "arch", "prefill GFLOP", "decode GFLOP", "total GFLOP"], t))

    if result["flop_check"]:
        out.append("\n## FLOP formula vs torch.utils.flop_counter.FlopCounterMode\n")
        out.append("One counted generation per model at the shortest input length (new tokens as listed), "
                   "compared with the formula for the same lengths. torch 2.13's counter has no "
                   "formula for CPU SDPA (`aten._scaled_dot_product_flash_attention_for_cpu`, counted as 0); "
                   "mu registers one (causal pairs only), so attention is counted.\n\n")
        t = []
        for c in result["flop_check"]:
            a = c.get("analytic")
            t.append([c["dtype"], c["arch"], str(c["input_length"]), str(c["new_tokens"]),
                      f"{c['counted']['total'] / 1e9:.3f}",
                      "—" if a is None else f"{a['total'] / 1e9:.3f}",
                      "—" if a is None else f"{c['relative_error']['total'] * 100:+.2f}%"])
        out.append(_table(["dtype", "arch", "input", "new tokens", "counted GFLOP", "analytic GFLOP",
                           "analytic vs counted"], t))
    return "".join(x if x.endswith("\n") else x + "\n" for x in out)


def _row(rows: list[dict], arch: str, L: int, B: int) -> Optional[dict]:
    return next((r for r in rows if r["arch"] == arch and r["input_length"] == L and r["batch"] == B), None)


# ---------------------------------------------------------------------------------------------
# Plots


STYLE = {"encdec": dict(color="tab:blue", marker="o"), "deconly": dict(color="tab:red", marker="s"),
         "hf-t5": dict(color="tab:cyan", marker="^"), "hf-llama": dict(color="tab:orange", marker="v")}
DTYPE_LINE = ["-", "--", ":"]


def write_plots(result: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta, rows = result["meta"], result["rows"]
    cfg = meta["config"]
    archs, dtypes = list(meta["specs"]), cfg["dtypes"]
    N, S = cfg["new_tokens"], result["summary"]["input_length"]
    written = []

    def series(arch, dtype, key, x_key, fixed):
        pts = sorted((r[x_key], r[key]) for r in rows if r["arch"] == arch and r["dtype"] == dtype
                     and all(r[k] == v for k, v in fixed.items()) and r[key] is not None)
        return [p[0] for p in pts], [p[1] for p in pts]

    def save(fig, name):
        path = out / name
        _atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
        plt.close(fig)
        written.append(path)

    # 1. The paper's figure: total generation time vs input length.
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, d in enumerate(dtypes):
        for a in archs:
            x, y = series(a, d, "e2e_s", "input_length", {"batch": 1})
            if x:
                ax.plot(x, y, DTYPE_LINE[i % 3], label=f"{a} {d} total", **STYLE.get(a, {}))
            x, y = series(a, d, "ttft_s", "input_length", {"batch": 1})
            if x:
                ax.plot(x, y, DTYPE_LINE[i % 3], alpha=0.35, label=f"{a} {d} first token", **STYLE.get(a, {}))
    ax.set(xlabel="input length (tokens)", ylabel="seconds",
           title=f"Generation time vs input length ({N} new tokens, batch 1)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save(fig, PLOTS[0])

    # 2. Decode throughput vs batch size.
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, d in enumerate(dtypes):
        for a in archs:
            x, y = series(a, d, "decode_tok_s", "batch", {"input_length": S})
            if x:
                ax.plot(x, y, DTYPE_LINE[i % 3], label=f"{a} {d}", **STYLE.get(a, {}))
    ax.set_xscale("log", base=2)
    ax.set_xticks(cfg["batch_sizes"], [str(b) for b in cfg["batch_sizes"]])
    ax.set(xlabel="batch size", ylabel="decode tokens/s", title=f"Decode throughput vs batch size (input {S})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save(fig, PLOTS[1])

    # 3. Peak memory vs input length.
    if any(r["peak_rss_bytes"] is not None for r in rows):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
        for i, d in enumerate(dtypes):
            for a in archs:
                x, y = series(a, d, "peak_rss_bytes", "input_length", {"batch": 1})
                if x:
                    ax1.plot(x, [v / GiB for v in y], DTYPE_LINE[i % 3], label=f"{a} {d}", **STYLE.get(a, {}))
                x, y = series(a, d, "increment_bytes", "input_length", {"batch": 1})
                if x:
                    ax2.plot(x, [v / MiB for v in y], DTYPE_LINE[i % 3], label=f"{a} {d}", **STYLE.get(a, {}))
        ax1.set(xlabel="input length (tokens)", ylabel="GiB", title="Peak RSS (batch 1)")
        ax2.set(xlabel="input length (tokens)", ylabel="MiB", title="Peak RSS over the loaded weights")
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        save(fig, PLOTS[2])
    return written
