"""The demo's report: report.json (every number), report.md (tables + a reading generated from the numbers)
and the PNG plots, written atomically into the demo directory.

The reading is built from the measured values with fixed rules (thresholds of the paper's claims, the
paired standard error of F1 differences on the test questions): it says which claims hold on this run,
which do not, and what in the numbers explains it. Nothing in it is written before the numbers exist.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from mu.atomic import atomic_write_text

if TYPE_CHECKING:
    from mu.demo.pipeline import Demo

REPORT_VERSION = 3
PLOT_FILES = {"training_curves": "training_curves.png", "quality": "quality.png", "latency": "latency.png"}
ARCH_TARGET_F1 = 3.0  # the encoder-decoder student beats the decoder-only student by >= 3 F1
KD_TARGET_F1 = 3.0  # the KD student beats the CE-only encoder-decoder student by >= 3 F1
# The paper's efficiency figures (encoder-decoder vs decoder-only), for the reading.
PAPER = {"ttft_ratio": 0.53, "decode_speedup": 4.7, "memory_ratio": (0.84, 0.89), "flops_ratio": 0.78}
LABELS = {"teacher": "teacher (decoder-only)", "encdec": "encoder-decoder student (CE)",
          "deconly": "decoder-only student (CE)", "encdec_kd": "encoder-decoder student (KD)"}
METRIC_KEYS = ("exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1", "total", "HasAns_total",
               "NoAns_total")


def output_files(out: Path) -> dict[str, Path]:
    out = Path(out)
    return {"report.md": out / "report.md", "report.json": out / "report.json",
            **{name: out / f for name, f in PLOT_FILES.items()}}


# ---------------------------------------------------------------------------------------------
# Collecting the numbers


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curves(run_dir: Path) -> dict[str, list]:
    """Training CE loss and validation points (loss, F1) against training FLOPs, from metrics.jsonl."""
    train, val = [], []
    for r in _read_jsonl(run_dir / "metrics.jsonl"):
        if r.get("event") == "train":
            ce = r.get("ce_loss", r.get("loss"))  # a KD run logs its CE part as ce_loss
            train.append({"step": r["step"], "flops": r["flops"], "examples": r.get("examples"), "ce_loss": ce,
                          "loss": r.get("loss")})
        elif r.get("event") == "eval":
            val.append({"step": r["step"], "flops": r["flops"], "val_loss": r.get("val_loss"), "f1": r.get("f1"),
                        "exact": r.get("exact")})
    return {"train": train, "val": val}


def paired_difference(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Mean of a - b over the shared ids (F1 points) with its standard error and a 95% interval."""
    ids = sorted(set(a) & set(b))
    n = len(ids)
    diffs = [100.0 * (a[i] - b[i]) for i in ids]
    mean = sum(diffs) / n if n else 0.0
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    se = math.sqrt(var / n) if n else 0.0
    return {"diff": mean, "se": se, "ci95": [mean - 1.96 * se, mean + 1.96 * se], "n": n}


def build_report(demo: "Demo") -> dict[str, Any]:
    from mu.checkpoint import load_model

    out, cfg = demo.out, demo.cfg
    stages = demo.manifest.stages
    evals = json.loads((out / "evaluate" / "metrics.json").read_text())
    models: dict[str, Any] = {}
    for name in ("teacher", "encdec", "deconly", "encdec_kd"):
        s = stages[name]["summary"]
        model = load_model(out / name / "final", device="cpu")
        c = model.config
        models[name] = {
            "label": LABELS[name], "arch": c.arch, "params": model.num_parameters(),
            "layers": f"{c.n_encoder_layer}+{c.n_decoder_layer}" if c.arch == "encdec" else str(c.n_decoder_layer),
            "n_embd": c.n_embd, "n_head": c.n_head, "n_kv_head": c.n_kv_head, "hidden_dim": c.hidden_dim,
            "vocab_size": c.vocab_size, "train_flops": s["flops"], "flops_budget": s.get("flops_budget"),
            "train_examples": s["examples"], "train_steps": s["steps"], "epochs": s["epochs"],
            "train_tokens": {"encoder": s["enc_tokens"], "decoder": s["dec_tokens"], "scored": s["loss_tokens"]},
            "train_seconds": stages[name].get("seconds"), "final_train_loss": s["train_loss"],
            "val_loss": s["val_loss"],
            "metrics": {k: evals[name]["test"][k] for k in METRIC_KEYS if k in evals[name]["test"]},
            "val_metrics": {k: evals[name]["val"][k] for k in METRIC_KEYS if k in evals[name]["val"]},
            "model_dir": str(out / name / "final"),
        }
        if name == "encdec_kd":
            models[name]["teacher_forward_flops"] = s.get("teacher_forward_flops")
        del model
    per_ex = {name: evals[name]["per_example_f1"] for name in models}
    arch = paired_difference(per_ex["encdec"], per_ex["deconly"])
    kd = paired_difference(per_ex["encdec_kd"], per_ex["encdec"])
    e, d = models["encdec"], models["deconly"]
    comparisons = {
        "encdec_vs_deconly": {**arch, "target": ARCH_TARGET_F1, "met": arch["diff"] >= ARCH_TARGET_F1,
                              "params_ratio": e["params"] / d["params"],
                              "flops_ratio": e["train_flops"] / d["train_flops"],
                              "examples_ratio": e["train_examples"] / max(1, d["train_examples"])},
        "kd_vs_ce": {**kd, "target": KD_TARGET_F1, "met": kd["diff"] >= KD_TARGET_F1,
                     "flops_ratio": models["encdec_kd"]["train_flops"] / e["train_flops"],
                     "teacher_minus_student_f1": models["teacher"]["metrics"]["f1"] - e["metrics"]["f1"]},
    }
    bench = json.loads((out / "bench" / "bench.json").read_text())
    efficiency = _efficiency(bench)
    data = stages["data"]["summary"]
    timing = {s: {"seconds": stages[s].get("seconds"), **(stages[s].get("summary", {}).get("timing") or {})}
              for s in stages if s != "report"}
    rep: dict[str, Any] = {
        "version": REPORT_VERSION, "preset": cfg.preset, "device": str(demo.device), "out": str(out),
        "data": data, "models": models, "comparisons": comparisons, "efficiency": efficiency,
        "curves": {name: curves(out / name) for name in ("encdec", "deconly", "encdec_kd", "teacher")},
        "timing": timing, "machine": {"cpu_count": os.cpu_count(), "threads": demo.torch.get_num_threads(),
                                      "load_average": _loadavg()},
        "config": cfg.to_dict(),
    }
    rep["reading"] = reading(rep)
    return rep


def _efficiency(bench: dict) -> dict[str, Any]:
    s = bench["summary"]
    eff = {k: s.get(k) for k in ("input_length", "new_tokens", "dtype", "preset", "ttft_ratio", "decode_speedup",
                                 "memory_ratio", "memory_increment_ratio", "flops_ratio", "kv_cache_ratio", "e2e_ratio")}
    rows = {}
    for r in bench["rows"]:
        if r["batch"] != 1 or r["dtype"] != s.get("dtype"):
            continue
        rows.setdefault(r["input_length"], {})[r["arch"]] = r
    eff["by_length"] = [
        {"input_length": L,
         **{f"{a}_{k}": rows[L].get(a, {}).get(k) for a in ("encdec", "deconly")
            for k in ("ttft_s", "decode_ms_median", "decode_tok_s", "peak_rss_bytes", "flops_total")}}
        for L in sorted(rows)]
    eff["params"] = {a: m.get("fp32", next(iter(m.values()), {})).get("params") for a, m in bench["models"].items()}
    eff["load_average"] = bench.get("meta", {}).get("load_average")
    return eff


def _loadavg() -> Optional[list[float]]:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------
# The reading: sentences chosen by the numbers


def _f(x: Optional[float], nd: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def _claim_verdict(diff: float, se: float, target: float) -> str:
    noise = abs(diff) < 1.96 * se
    if diff >= target:
        verdict = f"the claim holds on this run (target: at least +{target:.0f} F1)"
        if diff - 1.96 * se < 0:
            verdict += ", although the test set is too small to rule out chance"
        return verdict
    if diff > 0:
        return (f"the difference points the paper's way but falls short of the +{target:.0f} F1 target"
                + (" and is within the noise of the test set" if noise else ""))
    if diff == 0 and se == 0:
        return "the claim does not hold on this run: the two models gave the same answer to every question"
    if noise:
        return f"the claim does not hold on this run: no difference beyond the noise of the test set"
    return "the claim does not hold on this run: the difference goes the other way"


def always_abstains(metrics: dict[str, float]) -> bool:
    """True when a model said "unanswerable" to every test question (HasAns F1 0, NoAns F1 100)."""
    return metrics.get("HasAns_f1") == 0.0 and metrics.get("NoAns_f1") == 100.0


def reading(rep: dict[str, Any]) -> list[str]:
    m, cmp_, eff, data = rep["models"], rep["comparisons"], rep["efficiency"], rep["data"]
    e, d, kd, t = m["encdec"], m["deconly"], m["encdec_kd"], m["teacher"]
    paras: list[str] = []
    a = cmp_["encdec_vs_deconly"]
    src = data.get("train", {}).get("mean_source_tokens")
    tgt = data.get("train", {}).get("mean_target_tokens")
    text = (f"**Architecture at equal size and compute.** The encoder-decoder student ({e['params']:,} parameters) "
            f"scored {_f(e['metrics']['f1'])} F1 on the {e['metrics'].get('total', 0):.0f} test questions and the "
            f"decoder-only student ({d['params']:,} parameters, {100 * (a['params_ratio'] - 1):+.1f}% vs the "
            f"encoder-decoder) {_f(d['metrics']['f1'])} F1, after {e['train_flops']:.3g} and {d['train_flops']:.3g} "
            f"training FLOPs: a difference of {a['diff']:+.1f} F1 (95% interval {a['ci95'][0]:+.1f} to "
            f"{a['ci95'][1]:+.1f}, paired over questions); {_claim_verdict(a['diff'], a['se'], a['target'])}.")
    if src and tgt:
        text += (f" For the same FLOPs the encoder-decoder saw {a['examples_ratio']:.2f}x as many training examples "
                 f"({e['train_examples']:,} vs {d['train_examples']:,}): its decoder only processes the "
                 f"~{tgt:.0f} answer tokens, while the decoder-only model runs the whole ~{src:.0f}-token prompt "
                 f"through every layer, and each prompt token is read once by a bidirectional encoder.")
    parts = []
    for key, what in (("HasAns_f1", "answerable"), ("NoAns_f1", "unanswerable")):
        if key in e["metrics"] and key in d["metrics"]:
            parts.append((e["metrics"][key] - d["metrics"][key], what, e["metrics"][key], d["metrics"][key]))
    if parts:
        text += " By question type: " + "; ".join(
            f"{what} {x:.1f} vs {y:.1f} F1 ({diff:+.1f})" for diff, what, x, y in parts) + "."
    if e.get("val_loss") is not None and d.get("val_loss") is not None:
        text += (f" Validation loss on the answer tokens: {e['val_loss']:.3f} (encoder-decoder) vs "
                 f"{d['val_loss']:.3f} (decoder-only).")
    paras.append(text)

    k = cmp_["kd_vs_ce"]
    text = (f"**Distillation.** The decoder-only teacher ({t['params']:,} parameters, "
            f"{t['params'] / e['params']:.1f}x a student, {t['train_flops'] / e['train_flops']:.1f}x the students' "
            f"training FLOPs) scored {_f(t['metrics']['f1'])} F1. Distilled into the encoder-decoder student with "
            f"the same budget, initialisation and batches, it gave {_f(kd['metrics']['f1'])} F1 against "
            f"{_f(e['metrics']['f1'])} for cross-entropy alone: {k['diff']:+.1f} F1 (95% interval "
            f"{k['ci95'][0]:+.1f} to {k['ci95'][1]:+.1f}); {_claim_verdict(k['diff'], k['se'], k['target'])}.")
    gap = k["teacher_minus_student_f1"]
    if gap <= 0:
        text += (f" The teacher is not better than the CE student ({gap:+.1f} F1), so it has little to teach: "
                 f"on this budget the teacher, not the recipe, limits distillation.")
    elif k["diff"] < k["target"]:
        text += (f" The teacher leads the CE student by {gap:+.1f} F1; the KD student recovered "
                 f"{100 * max(k['diff'], 0) / gap:.0f}% of that gap.")
    else:
        text += f" The teacher leads the CE student by {gap:+.1f} F1, and distillation passed much of that on."
    if kd.get("teacher_forward_flops"):
        text += (f" The teacher's forward passes during distillation ({kd['teacher_forward_flops']:.3g} FLOPs) are "
                 f"not in the student's budget, as in the paper.")
    paras.append(text)

    if eff.get("ttft_ratio") is not None:
        L, n = eff.get("input_length"), eff.get("new_tokens")
        params = eff.get("params") or {}
        size = f"{(params.get('encdec') or 0) / 1e6:.0f}M-parameter" if params.get("encdec") else ""
        text = (f"**Inference.** At preset `{eff.get('preset')}` ({size} random weights), input length {L}, "
                f"{n} new tokens, batch 1: the encoder-decoder's first token took {eff['ttft_ratio']:.2f}x the "
                f"decoder-only's time ({_pct_lower(eff['ttft_ratio'])}; the paper: {PAPER['ttft_ratio']:.2f}x)")
        if eff.get("decode_speedup") is not None:
            text += (f", it decoded {eff['decode_speedup']:.2f}x as many tokens per second (the paper: up to "
                     f"{PAPER['decode_speedup']}x on an edge device)")
        if eff.get("flops_ratio") is not None:
            text += f", and used {eff['flops_ratio']:.2f}x the FLOPs per generation (the paper: {PAPER['flops_ratio']}x)"
        text += "."
        if eff.get("memory_ratio") is not None:
            text += (f" Peak memory (whole process) was {eff['memory_ratio']:.2f}x"
                     + (f", and the memory added on top of the loaded weights {eff['memory_increment_ratio']:.2f}x"
                        if eff.get("memory_increment_ratio") is not None else "")
                     + f" (the paper: {PAPER['memory_ratio'][0]:.2f}-{PAPER['memory_ratio'][1]:.2f}x).")
        checks = [eff["ttft_ratio"] < 1.0, (eff.get("decode_speedup") or 0) > 1.0]
        if not all(checks):
            text += (" Not every speed figure favours the encoder-decoder here: at short inputs and on a busy CPU "
                     "fixed per-layer costs can dominate, and the encoder-decoder's advantage grows with input "
                     "length (see latency.png).")
        paras.append(text)

    abstainers = [LABELS[name] for name, x in m.items() if always_abstains(x["metrics"])]
    if abstainers:
        everyone = len(abstainers) == len(m)
        text = ("**No extraction learned.** " + ("None of the four models" if everyone else ", ".join(abstainers))
                + (" learned" if everyone else " did not learn")
                + " to extract answers on this budget: "
                + ("each answers" if everyone else "it answers") + " every question with the no-answer phrase, the "
                "best a model can do without reading the context (its F1 is the share of unanswerable questions). "
                "Small transformers trained from scratch learn to find and copy a span only after a phase of "
                "slow progress; this run ends before it, so the F1 comparisons above carry no signal.")
        losses = [(LABELS[name], x.get("val_loss")) for name, x in m.items()
                  if x.get("val_loss") is not None and name != "encdec_kd"]  # KD's is its own objective
        if losses:
            text += (" Cross-entropy on the validation answers still ranks the models trained with it: "
                     + ", ".join(f"{label} {loss:.3f}" for label, loss in losses)
                     + ". Larger budgets (`--preset large`, a GPU, or more `--student-examples`) are needed for the "
                     "F1 claims to be tested.")
        paras.append(text)

    load = rep["machine"].get("load_average")
    cpus = rep["machine"].get("cpu_count")
    se = max(a["se"], k["se"])
    text = (f"**How much to trust this.** One seed, {e['metrics'].get('total', 0):.0f} test questions"
            + (f": a difference smaller than about {1.96 * se:.1f} F1 could be chance." if se > 0 else
               ": the compared models made identical predictions, so there is no variance to estimate."))
    if load and cpus and load[0] > 1.2 * cpus:
        text += (f" The machine was busy (load average {load[0]:.1f} on {cpus} cores) while this report was written, "
                 f"so wall-clock times and latencies are inflated and noisy; the ratios are more robust than the "
                 f"absolute times.")
    paras.append(text)
    return paras


def _pct_lower(ratio: float) -> str:
    return f"{100 * (1 - ratio):.0f}% lower" if ratio < 1 else f"{100 * (ratio - 1):.0f}% higher"


# ---------------------------------------------------------------------------------------------
# Markdown


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def markdown(rep: dict[str, Any]) -> str:
    from mu.demo.progress import fmt_time

    m, cmp_, eff, data, cfg = rep["models"], rep["comparisons"], rep["efficiency"], rep["data"], rep["config"]
    lines = [f"# Mu demo: encoder-decoder vs decoder-only at small scale (preset `{rep['preset']}`)\n",
             "Reproduces the comparisons of *Return of the Encoder* (Microsoft, 2025) with models trained here, on "
             + ("the built-in synthetic reading comprehension" if cfg["train_data"] is None
                else f"`{cfg['train_data']}`") + f", on `{rep['device']}`.\n"]
    lines.append("## Results on the test split\n")
    rows = []
    for name, r in m.items():
        mt = r["metrics"]
        rows.append([r["label"], f"{r['params']:,}", r["layers"], f"{r['train_flops']:.3g}", f"{r['train_examples']:,}",
                     _f(mt.get("exact")), _f(mt.get("f1")), _f(mt.get("HasAns_f1")), _f(mt.get("NoAns_f1")),
                     _f(r["val_metrics"].get("f1"))])
    lines.append(_table(["model", "params", "layers", "train FLOPs", "examples seen", "exact", "F1", "HasAns F1",
                         "NoAns F1", "val F1"], rows))
    lines.append("## The paper's claims on this run\n")
    a, k = cmp_["encdec_vs_deconly"], cmp_["kd_vs_ce"]
    rows = [["encoder-decoder beats decoder-only (same params, same FLOPs)", f"{a['diff']:+.1f} F1",
             f"[{a['ci95'][0]:+.1f}, {a['ci95'][1]:+.1f}]", f">= +{a['target']:.0f}", "yes" if a["met"] else "**no**"],
            ["KD student beats CE-only student (same budget)", f"{k['diff']:+.1f} F1",
             f"[{k['ci95'][0]:+.1f}, {k['ci95'][1]:+.1f}]", f">= +{k['target']:.0f}", "yes" if k["met"] else "**no**"]]
    lines.append(_table(["claim", "measured", "95% interval", "target", "met"], rows))
    lines.append("## Reading\n")
    lines += [p + "\n" for p in rep["reading"]]
    if eff.get("ttft_ratio") is not None:
        lines.append(f"## Inference efficiency (preset `{eff['preset']}`, random weights, batch 1, "
                     f"{eff['new_tokens']} new tokens, {eff['dtype']})\n")
        rows = []
        for r in eff["by_length"]:
            ratio = (r["encdec_ttft_s"] / r["deconly_ttft_s"]) if r.get("encdec_ttft_s") and r.get("deconly_ttft_s") else None
            speed = (r["encdec_decode_tok_s"] / r["deconly_decode_tok_s"]
                     if r.get("encdec_decode_tok_s") and r.get("deconly_decode_tok_s") else None)
            rows.append([str(r["input_length"]), _ms(r.get("encdec_ttft_s")), _ms(r.get("deconly_ttft_s")),
                         _f(ratio, 2), _f(r.get("encdec_decode_tok_s"), 0), _f(r.get("deconly_decode_tok_s"), 0),
                         _f(speed, 2)])
        lines.append(_table(["input length", "TTFT encdec (ms)", "TTFT deconly (ms)", "TTFT ratio",
                             "decode tok/s encdec", "decode tok/s deconly", "decode speed-up"], rows))
        rows = [[k2, _f(eff.get(k2), 3)] for k2 in ("ttft_ratio", "decode_speedup", "memory_ratio",
                                                    "memory_increment_ratio", "flops_ratio", "kv_cache_ratio")]
        lines.append(f"At input length {eff['input_length']} (ratios encoder-decoder / decoder-only; decode_speedup "
                     f"> 1 means the encoder-decoder is faster):\n")
        lines.append(_table(["figure", "value"], rows))
    lines.append("## Plots\n")
    lines.append("![training curves](training_curves.png)\n\n![quality](quality.png)\n\n![latency](latency.png)\n")
    lines.append("## Setup\n")
    tr = data.get("train", {})
    lines.append(f"* Data: {data.get('source', {}).get('train')} — {tr.get('examples')} training, "
                 f"{data.get('val', {}).get('examples')} validation, {data.get('test', {}).get('examples')} test "
                 f"questions ({data.get('test', {}).get('unanswerable')} unanswerable in test); prompts "
                 f"~{_f(tr.get('mean_source_tokens'), 0)} tokens, answers ~{_f(tr.get('mean_target_tokens'), 0)} "
                 f"(with EOS); {data.get('tokenizer')}.")
    lines.append(f"* Training: AdamW, batch {cfg['batch_size']}, cosine schedule, warmup {cfg['warmup']}, weight "
                 f"decay {cfg['weight_decay']}; lr {cfg['teacher_lr']} (teacher), {cfg['student_lr']} (encoder-decoder "
                 f"students), {cfg['deconly_lr']} (decoder-only student). Students: FLOP budget "
                 f"{m['encdec'].get('flops_budget') or 0:.3g} (6 x parameters x tokens per stack; "
                 f"`mu.train.training_flops`).")
    lines.append(f"* Distillation: alpha {cfg['kd_alpha']} x {cfg['kd_divergence']} at temperature "
                 f"{cfg['kd_temperature']} + (1 - alpha) x CE; on-policy fraction {cfg['kd_on_policy']}.")
    times = ", ".join(f"{s} {fmt_time(v['seconds'] or 0)}" for s, v in rep["timing"].items())
    total = sum((v["seconds"] or 0) for v in rep["timing"].values())
    load = rep["machine"].get("load_average")
    lines.append(f"* Time per stage (wall clock, summed over resumed attempts): {times}; total {fmt_time(total)} on "
                 f"{rep['machine']['cpu_count']} cores ({rep['machine']['threads']} threads)"
                 + (f", load average {load[0]:.1f} when the report was written" if load else "") + ".")
    lines.append("* Files: `report.json` (every number), `evaluate/` (metrics and test predictions), `bench/` "
                 "(the full benchmark), one directory per model with `final/` (load with `mu.load_model`) and "
                 "`metrics.jsonl`.\n")
    return "\n".join(lines)


def _ms(seconds: Optional[float]) -> str:
    return "n/a" if seconds is None else f"{1e3 * seconds:.1f}"


def write_report(rep: dict[str, Any], out: Path) -> dict[str, Path]:
    from mu.demo.plots import write_plots

    files = output_files(out)
    write_plots(rep, out)
    atomic_write_text(files["report.json"], json.dumps(rep, indent=1, default=str) + "\n")
    atomic_write_text(files["report.md"], markdown(rep))
    return files
