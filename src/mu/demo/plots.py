"""The demo's PNGs: students' training curves, quality bars, latency vs input length (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mu.atomic import atomic_file

COLORS = {"teacher": "#7f7f7f", "encdec": "#1f77b4", "deconly": "#d62728", "encdec_kd": "#2ca02c"}
SHORT = {"teacher": "teacher (dec-only)", "encdec": "enc-dec (CE)", "deconly": "dec-only (CE)",
         "encdec_kd": "enc-dec (KD)"}


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
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name in ("encdec", "deconly", "encdec_kd"):
        c = rep["curves"].get(name, {})
        train = [r for r in c.get("train", []) if r.get("ce_loss") is not None]
        if train:
            k = max(1, len(train) // 20)
            ax1.plot([r["flops"] for r in train], _smooth([r["ce_loss"] for r in train], k), color=COLORS[name],
                     label=SHORT[name])
        val = [r for r in c.get("val", []) if r.get("f1") is not None]
        if val:
            ax2.plot([r["flops"] for r in val], [r["f1"] for r in val], "o-", color=COLORS[name], label=SHORT[name])
    budget = rep["models"]["encdec"].get("flops_budget")
    for ax in (ax1, ax2):
        if budget:
            ax.axvline(budget, color="k", lw=0.8, ls=":")
        ax.set_xlabel("training FLOPs (6 x params x tokens per stack)")
        ax.grid(alpha=0.3)
        ax.legend()
    ax1.set_ylabel("training cross-entropy on answer tokens")
    ax1.set_yscale("log")
    ax1.set_title("students: training loss at equal FLOPs")
    ax2.set_ylabel("validation F1")
    ax2.set_title("students: validation F1 during training")
    _save(fig, path)
    plt.close(fig)


def quality(rep: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    keys = [("exact", "exact"), ("f1", "F1"), ("HasAns_f1", "HasAns F1"), ("NoAns_f1", "NoAns F1")]
    names = list(rep["models"])
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        m = rep["models"][name]["metrics"]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(keys))]
        ys = [m.get(k, 0.0) for k, _ in keys]
        bars = ax.bar(xs, ys, width, color=COLORS[name], label=f"{SHORT[name]}, {rep['models'][name]['params'] / 1e6:.1f}M")
        for b, y in zip(bars, ys):
            ax.text(b.get_x() + b.get_width() / 2, y + 1, f"{y:.0f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(keys)), [label for _, label in keys])
    ax.set_ylim(0, 110)
    ax.set_ylabel("test score (0-100)")
    ax.set_title("quality on the test split (SQuAD 2.0 metrics)")
    ax.legend(fontsize=8, loc="upper left", ncol=2)
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


def write_plots(rep: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    from mu.demo.report import PLOT_FILES

    out = Path(out)
    paths = []
    for name, fn in (("training_curves", training_curves), ("quality", quality), ("latency", latency)):
        path = out / PLOT_FILES[name]
        fn(rep, path)
        paths.append(path)
    return paths
