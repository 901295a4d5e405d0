"""The demo's PNGs from the report's plain data: learning curves, quality bars, latency (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mu.atomic import atomic_file

COLORS = {"teacher": "#7f7f7f", "encdec": "#1f77b4", "deconly": "#d62728", "encdec_kd": "#2ca02c",
          "encdec_kd_on": "#9467bd"}
SHORT = {"teacher": "teacher (dec-only)", "encdec": "enc-dec (CE)", "deconly": "dec-only (CE)",
         "encdec_kd": "enc-dec (KD off-policy)", "encdec_kd_on": "enc-dec (KD on-policy)"}


def _save(fig, path: Path) -> None:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def _smooth(values: list[float], k: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > k:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def training_curves(rep: dict[str, Any], path: Path) -> None:
    """Validation F1 and answer cross-entropy against training FLOPs: every model, every seed, every task family."""
    import matplotlib.pyplot as plt

    tasks = rep["tasks"]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 4.2 * len(tasks)), squeeze=False)
    for row, (family, t) in enumerate(tasks.items()):
        ax1, ax2 = axes[row]
        for name, m in t["models"].items():
            for k, c in enumerate(m["curves"]):
                pts = [p for p in c["points"] if p.get("flops")]
                label = SHORT.get(name, name) if k == 0 else None
                ax1.plot([p["flops"] for p in pts], [p.get("f1") for p in pts], "o-", ms=3, lw=1, alpha=0.8,
                         color=COLORS.get(name), label=label)
                ax2.plot([p["flops"] for p in pts], [p.get("val_loss") for p in pts], "o-", ms=3, lw=1, alpha=0.8,
                         color=COLORS.get(name), label=label)
        budget = t.get("flops_budget")
        for ax in (ax1, ax2):
            if budget:
                ax.axvline(budget, color="k", lw=0.8, ls=":")
            ax.set_xscale("log")
            ax.set_xlabel("training FLOPs (6 x params x tokens per stack)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        ax1.set_ylabel("validation F1")
        ax1.set_title(f"{family}: validation F1 (one line per seed)")
        ax2.set_ylabel("validation cross-entropy on answer tokens")
        ax2.set_title(f"{family}: validation loss (CE students: answer CE; KD students: their KD loss)")
    _save(fig, path)
    plt.close(fig)


def quality(rep: dict[str, Any], path: Path) -> None:
    """Test F1 (mean over seeds, 95% bootstrap interval) and HasAns F1 of every model, per task family."""
    import matplotlib.pyplot as plt

    tasks = rep["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4), squeeze=False)
    for ax, (family, t) in zip(axes[0], tasks.items()):
        names = list(t["models"])
        for j, (key, label) in enumerate((("f1", "F1"), ("HasAns_f1", "HasAns F1"))):
            for i, name in enumerate(names):
                m = t["models"][name]
                x = j + (i - (len(names) - 1) / 2) * 0.8 / len(names)
                y = m["metrics"].get(key) or 0.0
                err = None
                if key == "f1":
                    lo, hi = m["f1_ci95"]
                    err = [[max(0.0, y - lo)], [max(0.0, hi - y)]]
                ax.bar(x, y, 0.8 / len(names), color=COLORS.get(name), yerr=err, capsize=2,
                       label=SHORT.get(name, name) if j == 0 else None)
                ax.text(x, y + 1, f"{y:.0f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks([0, 1], ["test F1 (95% CI)", "HasAns F1"])
        ax.set_ylim(0, 110)
        ax.set_title(f"{family}: mean over seeds")
        ax.legend(fontsize=7, loc="upper right")
        ax.grid(axis="y", alpha=0.3)
    _save(fig, path)
    plt.close(fig)


def latency(rep: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    eff = rep["efficiency"]
    rows = eff.get("by_length", [])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    Ls = [r["input_length"] for r in rows]
    for arch, label in (("encdec", "encoder-decoder"), ("deconly", "decoder-only")):
        ttft = [r.get(f"{arch}_ttft_s") for r in rows]
        if any(t is not None for t in ttft):
            ax1.plot(Ls, [1e3 * t if t is not None else float("nan") for t in ttft], "o-", color=COLORS[arch],
                     label=label)
        dec = [r.get(f"{arch}_decode_ms_median") for r in rows]
        if any(t is not None for t in dec):
            ax2.plot(Ls, [t if t is not None else float("nan") for t in dec], "o-", color=COLORS[arch], label=label)
    ax1.set_title(f"time to first token (preset {eff.get('preset')}, batch 1)")
    ax1.set_ylabel("ms")
    ax2.set_title("decode time per token")
    ax2.set_ylabel("ms / token")
    for ax in (ax1, ax2):
        ax.set_xlabel("input length (tokens)")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)
    plt.close(fig)


def write_plots(rep: dict[str, Any], paths: dict[str, Path]) -> list[Path]:
    """Write the plots named in `paths` ({"training_curves" | "quality" | "latency": file})."""
    import matplotlib

    matplotlib.use("Agg")
    done = []
    for name, fn in (("training_curves", training_curves), ("quality", quality), ("latency", latency)):
        if name in paths:
            fn(rep, Path(paths[name]))
            done.append(Path(paths[name]))
    return done
