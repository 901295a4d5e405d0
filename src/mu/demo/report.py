"""The demo's report from plain data: report.json (every number), report.md (tables and a reading built
from the numbers) and the PNG plots, written atomically.

`build_report(inputs)` takes the run records (mu.demo.runs: one per model, task family and seed), the
chosen learning rates, the benchmark and the data summary, and computes per task family:
  models.<name>.metrics   test metrics, mean over seeds; models.<name>.per_seed: one metric dict per seed
  claims.architecture     encoder-decoder CE - decoder-only CE (same parameters within 2%, same FLOPs)
  claims.distillation     on-policy KD student - CE student (the paper's recipe), same seeds
  claims.distillation_off_policy
each as {"f1_diff", "ci95", "seeds", ...}: the mean paired difference of test F1 and a 95% bootstrap
interval over seeds and test questions. The first family's blocks are also at the top level.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from mu.atomic import atomic_write_text

REPORT_VERSION = 4
PLOT_FILES = {"training_curves": "training_curves.png", "quality": "quality.png", "latency": "latency.png"}
ARCH_TARGET_F1 = 3.0  # the encoder-decoder student beats the decoder-only student by >= 3 F1
KD_TARGET_F1 = 3.0  # the KD student beats the CE-only encoder-decoder student by >= 3 F1
TEACHER_TARGET_F1 = 85.0
TEACHER_LEAD_F1 = 15.0  # the teacher beats the CE students by >= 15 F1
STUDENT_HASANS_TARGET = 50.0
PAPER = {"ttft_ratio": 0.53, "decode_speedup": 4.7, "memory_ratio": (0.84, 0.89), "flops_ratio": 0.78}
METRIC_KEYS = ("exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1", "total", "HasAns_total",
               "NoAns_total")
CLAIMS = {"architecture": ("encdec", "deconly", ARCH_TARGET_F1,
                           "encoder-decoder beats decoder-only (same params, same training FLOPs)"),
          "distillation": ("encdec_kd_on", "encdec", KD_TARGET_F1,
                           "on-policy KD student beats the CE student (same architecture, budget, seeds)"),
          "distillation_off_policy": ("encdec_kd", "encdec", KD_TARGET_F1,
                                      "off-policy KD student beats the CE student (same architecture, budget, seeds)")}
FAMILY_TEXT = {"context_first": "question after the context", "question_first": "question before the context",
               "squad_v2": "SQuAD 2.0 files"}


def output_files(out: Path) -> dict[str, Path]:
    out = Path(out)
    return {"report.md": out / "report.md", "report.json": out / "report.json",
            **{name: out / f for name, f in PLOT_FILES.items()}}


# ---------------------------------------------------------------------------------------------
# Statistics


def bootstrap_diff(a: list[dict[str, float]], b: list[dict[str, float]], resamples: int = 2000,
                   seed: int = 0) -> dict[str, Any]:
    """Paired difference of per-question F1 (in [0, 1]) between runs a[i] and b[i] (the same seed), in F1 points:
    the mean over seeds and questions, and a 95% percentile interval from resampling seeds and questions."""
    import numpy as np

    ids = sorted(set.intersection(*(set(x) for x in a + b))) if a and b else []
    n = min(len(a), len(b))
    if not ids or n == 0:
        return {"f1_diff": 0.0, "ci95": [0.0, 0.0], "seeds": n, "questions": 0, "per_seed": []}
    d = 100.0 * np.array([[a[i][q] - b[i][q] for q in ids] for i in range(n)])  # seeds x questions
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples)
    for r in range(resamples):
        s = rng.integers(0, n, n)
        q = rng.integers(0, len(ids), len(ids))
        stats[r] = d[np.ix_(s, q)].mean()
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return {"f1_diff": float(d.mean()), "ci95": [float(lo), float(hi)], "seeds": n, "questions": len(ids),
            "per_seed": [float(x) for x in d.mean(axis=1)]}


def bootstrap_mean(a: list[dict[str, float]], resamples: int = 2000, seed: int = 0) -> list[float]:
    """95% interval of a model's test F1 (mean over seeds and questions), resampling seeds and questions."""
    import numpy as np

    if not a:
        return [0.0, 0.0]
    ids = sorted(a[0])
    x = 100.0 * np.array([[r[q] for q in ids] for r in a])
    rng = np.random.default_rng(seed)
    stats = [x[np.ix_(rng.integers(0, len(a), len(a)), rng.integers(0, len(ids), len(ids)))].mean()
             for _ in range(resamples)]
    return [float(v) for v in np.percentile(stats, [2.5, 97.5])]


def _interp(points: list[tuple[float, float]], x: float) -> Optional[float]:
    """Linear interpolation of (x, y) points at x (None outside their range)."""
    pts = sorted((p for p in points if p[0] is not None and p[1] is not None))
    if not pts or x < pts[0][0] or x > pts[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[-1][1]


def _mean(xs: list[Optional[float]]) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


# ---------------------------------------------------------------------------------------------
# Collecting the numbers


def _final_runs(runs: list[dict], family: str, model: str, lr: Optional[float], seeds: list[int]) -> list[dict]:
    out = []
    for s in seeds:
        for r in runs:
            sp = r["spec"]
            if sp["family"] == family and sp["model"] == model and sp["seed"] == s and (lr is None or sp["lr"] == lr):
                out.append(r)
                break
    return out


def by_kind(runs: list[dict], kinds: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Test F1 per kind of question (mu.data.synthetic_words.question_kind), mean over seeds: {kind: {n, f1}}."""
    out: dict[str, dict[str, Any]] = {}
    for kind in sorted(set(kinds.values())):
        ids = [i for i, k in kinds.items() if k == kind]
        f1 = _mean([100.0 * sum(r["test_f1_by_id"][i] for i in ids) / len(ids) for r in runs
                    if all(i in r["test_f1_by_id"] for i in ids)])
        out[kind] = {"n": len(ids), "f1": f1}
    return out


def _model_block(name: str, runs: list[dict], config: dict[str, Any], labels: dict[str, str],
                 resamples: int, kinds: Optional[dict[str, str]] = None) -> dict[str, Any]:
    arch = "encdec" if name.startswith("encdec") else "deconly"
    shape = config["teacher"] if name == "teacher" else config["student"]
    per_seed = []
    for r in runs:
        t = r["train"]
        per_seed.append({"seed": r["spec"]["seed"], "lr": r["spec"]["lr"],
                         **{k: r["test"][k] for k in METRIC_KEYS if k in r["test"]},
                         "val_f1": r["val"]["f1"], "val_loss": t.get("val_loss"), "train_steps": t["steps"],
                         "train_examples": t["examples"], "train_flops": t["flops"],
                         "train_seconds": r.get("train_seconds"), "stop_reason": t.get("stop_reason")})
    metrics = {k: _mean([p.get(k) for p in per_seed]) for k in METRIC_KEYS}
    first = runs[0]["train"] if runs else {}
    block = {"label": labels.get(name, name), "arch": arch, "params": first.get("params"),
             "layers": runs[0].get("layers") if runs else None,
             "n_embd": shape.get("n_embd"), "lr": runs[0]["spec"]["lr"] if runs else None,
             "metrics": metrics, "per_seed": per_seed,
             "f1_ci95": bootstrap_mean([r["test_f1_by_id"] for r in runs], resamples),
             "val_metrics": {"f1": _mean([p["val_f1"] for p in per_seed]),
                             "val_loss": _mean([p["val_loss"] for p in per_seed])},
             "train_flops": _mean([p["train_flops"] for p in per_seed]),
             "train_examples": _mean([p["train_examples"] for p in per_seed]),
             "train_steps": _mean([p["train_steps"] for p in per_seed]),
             "train_seconds": _mean([p["train_seconds"] for p in per_seed]),
             "curves": [{"seed": r["spec"]["seed"], "points": r.get("curve", [])} for r in runs],
             "model_dirs": [r.get("model_dir") for r in runs]}
    if kinds:
        block["by_kind"] = by_kind(runs, kinds)
    if name.startswith("encdec_kd"):
        block["teacher_forward_flops"] = _mean([r["train"].get("teacher_forward_flops") for r in runs])
    return block


def family_block(inputs: dict[str, Any], family: str) -> dict[str, Any]:
    cfg, runs = inputs["config"], inputs["runs"]
    seeds = list(range(cfg["seed"], cfg["seed"] + cfg["seeds"]))
    chosen = inputs["chosen_lr"][family]
    resamples = cfg.get("bootstrap", 2000)
    lrs = {"teacher": cfg["teacher_lr"], "encdec": chosen["encdec"], "deconly": chosen["deconly"],
           "encdec_kd": chosen["encdec"], "encdec_kd_on": chosen["encdec"]}
    final = {m: _final_runs(runs, family, m, lrs[m], seeds if m != "teacher" else [inputs["teacher_seed"][family]])
             for m in inputs["models"]}
    models = {m: _model_block(m, final[m], cfg, inputs["labels"], resamples, inputs.get("question_kinds"))
              for m in inputs["models"] if final[m]}
    claims = {}
    for name, (a, b, target, text) in CLAIMS.items():
        if a not in models or b not in models:
            continue
        d = bootstrap_diff([r["test_f1_by_id"] for r in final[a]], [r["test_f1_by_id"] for r in final[b]],
                           resamples)
        ma, mb = models[a]["metrics"], models[b]["metrics"]
        claims[name] = {**d, "target": target, "met": d["f1_diff"] >= target, "claim": text, "a": a, "b": b,
                        "hasans_f1_diff": (ma["HasAns_f1"] or 0) - (mb["HasAns_f1"] or 0),
                        "noans_f1_diff": (ma["NoAns_f1"] or 0) - (mb["NoAns_f1"] or 0)}
    e, dd = models.get("encdec"), models.get("deconly")
    if e and dd:
        claims["architecture"].update(params_ratio=e["params"] / dd["params"],
                                      flops_ratio=e["train_flops"] / dd["train_flops"],
                                      examples_ratio=e["train_examples"] / dd["train_examples"])
    grid = {}
    for m in ("encdec", "deconly"):
        rows = {}
        for lr in cfg["lr_grid"]:
            rec = _final_runs(runs, family, m, lr, [cfg["seed"]])
            if rec:
                rows[f"{lr:g}"] = {"val_f1": rec[0]["val"]["f1"], "val_loss": rec[0]["train"].get("val_loss")}
        grid[m] = {"chosen_lr": chosen[m], "by_lr": rows}
    return {"family": family, "description": FAMILY_TEXT.get(family, family), "data": inputs["data"].get(family, {}),
            "flops_budget": inputs["budgets"].get(family), "models": models, "claims": claims, "grid": grid,
            "views": views(final), "targets": targets(models)}


def views(final: dict[str, list[dict]]) -> dict[str, Any]:
    """The architecture comparison at equal FLOPs (the budget), equal examples and equal wall clock, on the
    validation curves: the encoder-decoder's validation F1 where the decoder-only run ended, per seed."""
    out: dict[str, Any] = {}
    enc, dec = final.get("encdec", []), final.get("deconly", [])
    for view, axis in (("equal_examples", "examples"), ("equal_wall_clock", "seconds")):
        rows = []
        for re, rd in zip(enc, dec):
            end = rd.get("curve", [])[-1:] if rd.get("curve") else []
            if not end:
                continue
            x = end[0].get(axis)
            e_f1 = _interp([(p.get(axis), p.get("f1")) for p in [{axis: 0, "f1": None}] + re.get("curve", [])], x) \
                if x is not None else None
            rows.append({"seed": re["spec"]["seed"], axis: x, "encdec_val_f1": e_f1, "deconly_val_f1": end[0].get("f1")})
        out[view] = {"per_seed": rows, "encdec_val_f1": _mean([r["encdec_val_f1"] for r in rows]),
                     "deconly_val_f1": _mean([r["deconly_val_f1"] for r in rows])}
    rows = [{"seed": re["spec"]["seed"], "encdec_val_f1": (re.get("curve") or [{}])[-1].get("f1"),
             "deconly_val_f1": (rd.get("curve") or [{}])[-1].get("f1"),
             "encdec_examples": re["train"]["examples"], "deconly_examples": rd["train"]["examples"],
             "encdec_seconds": re.get("train_seconds"), "deconly_seconds": rd.get("train_seconds")}
            for re, rd in zip(enc, dec)]
    out["equal_flops"] = {"per_seed": rows, "encdec_val_f1": _mean([r["encdec_val_f1"] for r in rows]),
                          "deconly_val_f1": _mean([r["deconly_val_f1"] for r in rows])}
    return out


def targets(models: dict[str, Any]) -> dict[str, Any]:
    t = models.get("teacher", {}).get("metrics", {}).get("f1")
    ce = [models[m]["metrics"]["f1"] for m in ("encdec", "deconly") if m in models]
    students = {m: models[m]["metrics"].get("HasAns_f1") for m in models if m != "teacher"}
    return {"teacher_f1": {"value": t, "target": TEACHER_TARGET_F1, "met": t is not None and t >= TEACHER_TARGET_F1},
            "teacher_lead_over_ce": {"value": (t - max(ce)) if t is not None and ce else None,
                                     "target": TEACHER_LEAD_F1,
                                     "met": t is not None and bool(ce) and t - max(ce) >= TEACHER_LEAD_F1},
            "students_hasans_f1": {"value": students, "target": STUDENT_HASANS_TARGET,
                                   "met": all(v is not None and v >= STUDENT_HASANS_TARGET for v in students.values())}}


def build_report(inputs: dict[str, Any]) -> dict[str, Any]:
    cfg = inputs["config"]
    families = list(cfg["families"])
    tasks = {f: family_block(inputs, f) for f in families}
    first = tasks[families[0]]
    rep: dict[str, Any] = {
        "version": REPORT_VERSION, "preset": cfg["preset"], "device": inputs["device"], "task": families[0],
        "models": first["models"], "claims": first["claims"], "tasks": tasks,
        "efficiency": _efficiency(inputs["bench"]), "data": inputs["data"], "timing": inputs["timing"],
        "machine": inputs["machine"], "config": cfg,
    }
    rep["reading"] = reading(rep)
    return rep


def _efficiency(bench: dict) -> dict[str, Any]:
    s = bench["summary"]
    eff = {k: s.get(k) for k in ("input_length", "new_tokens", "dtype", "preset", "ttft_ratio", "decode_speedup",
                                 "memory_ratio", "memory_increment_ratio", "flops_ratio", "kv_cache_ratio", "e2e_ratio")}
    rows: dict[int, dict[str, Any]] = {}
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


# ---------------------------------------------------------------------------------------------
# The reading: sentences chosen by the numbers


def _f(x: Optional[float], nd: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def _claim_verdict(diff: float, ci: list[float], target: float) -> str:
    lo, hi = ci
    if diff >= target:
        verdict = f"the claim holds on this run (target: at least +{target:.0f} F1)"
        if lo < 0:
            verdict += ", although the interval does not rule out no difference"
        return verdict
    if diff == 0 and lo == hi == 0:
        return "the claim does not hold on this run: the two models gave the same answer to every question"
    if diff > 0:
        return (f"the difference points the paper's way but falls short of the +{target:.0f} F1 target"
                + (" and its interval includes zero" if lo <= 0 else ""))
    if hi >= 0:
        return "the claim does not hold on this run: no difference beyond the noise of seeds and questions"
    return "the claim does not hold on this run: the difference goes the other way, beyond the noise"


def always_abstains(metrics: dict[str, float]) -> bool:
    """True when a model said "unanswerable" to every test question (HasAns F1 0, NoAns F1 100)."""
    return metrics.get("HasAns_f1") == 0.0 and metrics.get("NoAns_f1") == 100.0


def _per_seed(m: dict[str, Any], key: str = "f1") -> str:
    return " / ".join(_f(p.get(key)) for p in m["per_seed"])


def family_reading(t: dict[str, Any]) -> list[str]:
    m, c, v = t["models"], t["claims"], t["views"]
    paras: list[str] = []
    fam = f"*{t['family']}* ({t['description']})"
    e, d = m.get("encdec"), m.get("deconly")
    a = c.get("architecture")
    if e and d and a:
        src = t["data"].get("train", {}).get("mean_source_tokens")
        text = (f"**Architecture, {fam}.** At the same parameters ({e['params']:,} vs {d['params']:,}) and the same "
                f"training FLOPs ({e['train_flops']:.3g} vs {d['train_flops']:.3g}), over {a['seeds']} seeds, the "
                f"encoder-decoder student scored {_f(e['metrics']['f1'])} F1 (seeds {_per_seed(e)}; HasAns "
                f"{_f(e['metrics']['HasAns_f1'])}) and the decoder-only student {_f(d['metrics']['f1'])} F1 (seeds "
                f"{_per_seed(d)}; HasAns {_f(d['metrics']['HasAns_f1'])}): encoder-decoder - decoder-only = "
                f"{a['f1_diff']:+.1f} F1, 95% interval [{a['ci95'][0]:+.1f}, {a['ci95'][1]:+.1f}] (bootstrap over seeds "
                f"and test questions); {_claim_verdict(a['f1_diff'], a['ci95'], a['target'])}. Each used the learning "
                f"rate it chose on the validation split from the same grid ({e['lr']:g} and {d['lr']:g}). For the same "
                f"FLOPs the encoder-decoder took {e['train_steps']:.0f} steps and saw {a['examples_ratio']:.2f}x the "
                f"examples ({e['train_examples']:,.0f} vs {d['train_examples']:,.0f})"
                + (f", because the decoder-only model runs the whole ~{src:.0f}-token prompt through every layer" if src
                   else "") + ".")
        ex, wc = v.get("equal_examples", {}), v.get("equal_wall_clock", {})
        if ex.get("encdec_val_f1") is not None:
            text += (f" At equal examples (where the decoder-only run stopped) the encoder-decoder's validation F1 was "
                     f"{_f(ex['encdec_val_f1'])} vs {_f(ex['deconly_val_f1'])}.")
        if wc.get("encdec_val_f1") is not None:
            text += (f" At equal wall-clock training time: {_f(wc['encdec_val_f1'])} vs {_f(wc['deconly_val_f1'])} "
                     f"(validation F1).")
        paras.append(text)
    teacher = m.get("teacher")
    for name in ("distillation", "distillation_off_policy"):
        k = c.get(name)
        if not (k and teacher and e):
            continue
        kd = m[k["a"]]
        text = (f"**{'On-policy' if name == 'distillation' else 'Off-policy'} distillation, {fam}.** The teacher "
                f"scored {_f(teacher['metrics']['f1'])} F1 ({teacher['params']:,} parameters, "
                f"{teacher['train_flops']:.3g} training FLOPs). With the CE student's budget, learning rate and seeds, "
                f"the KD student scored {_f(kd['metrics']['f1'])} F1 (seeds {_per_seed(kd)}) against "
                f"{_f(e['metrics']['f1'])}: {k['f1_diff']:+.1f} F1, 95% interval [{k['ci95'][0]:+.1f}, "
                f"{k['ci95'][1]:+.1f}]; {_claim_verdict(k['f1_diff'], k['ci95'], k['target'])}.")
        gap = teacher["metrics"]["f1"] - e["metrics"]["f1"]
        if gap < TEACHER_LEAD_F1:
            lead = f"leads the CE student by only {gap:.1f}" if gap >= 0 else f"trails the CE student by {-gap:.1f}"
            text += (f" The teacher {lead} F1 (target: leads by {TEACHER_LEAD_F1:.0f}), so it has little to teach on "
                     f"this budget.")
            hard = [k for k in ("answerable_shared", "absent_person") if k in teacher.get("by_kind", {})
                    and k in e.get("by_kind", {})]
            if hard:
                text += (" On the questions that need each value bound to its person the teacher scores "
                         + ", ".join(f"{_f(teacher['by_kind'][k]['f1'])} ({k.replace('_', ' ')}; the student "
                                     f"{_f(e['by_kind'][k]['f1'])})" for k in hard) + ".")
        paras.append(text)
    abstainers = [x["label"] for x in m.values() if always_abstains(x["metrics"])]
    if abstainers:
        paras.append(f"**No extraction learned ({fam}).** " + ", ".join(abstainers) + " answered every test question "
                     "with the no-answer phrase (F1 = the share of unanswerable questions); comparisons involving "
                     "them carry no signal about reading.")
    tg = t["targets"]
    low = {name: val for name, val in tg["students_hasans_f1"]["value"].items()
           if val is None or val < STUDENT_HASANS_TARGET}
    text = (f"**Targets, {fam}.** Teacher >= {TEACHER_TARGET_F1:.0f} F1: {'met' if tg['teacher_f1']['met'] else 'not met'} "
            f"({_f(tg['teacher_f1']['value'])}); teacher >= +{TEACHER_LEAD_F1:.0f} F1 over the CE students: "
            f"{'met' if tg['teacher_lead_over_ce']['met'] else 'not met'} ({_f(tg['teacher_lead_over_ce']['value'])}); "
            f"every student >= {STUDENT_HASANS_TARGET:.0f} HasAns F1: "
            + ("met." if not low else "not met (" + ", ".join(f"{n} {_f(x)}" for n, x in low.items()) + ")."))
    paras.append(text)
    return paras


def reading(rep: dict[str, Any]) -> list[str]:
    paras: list[str] = []
    for t in rep["tasks"].values():
        paras += family_reading(t)
    eff = rep["efficiency"]
    if eff.get("ttft_ratio") is not None:
        L, n = eff.get("input_length"), eff.get("new_tokens")
        text = (f"**Inference.** At preset `{eff.get('preset')}` (random weights), input length {L}, {n} new tokens, "
                f"batch 1: the encoder-decoder's first token took {eff['ttft_ratio']:.2f}x the decoder-only's time "
                f"(the paper: {PAPER['ttft_ratio']:.2f}x)")
        if eff.get("decode_speedup") is not None:
            text += f", it decoded {eff['decode_speedup']:.2f}x as many tokens per second (the paper: up to {PAPER['decode_speedup']}x)"
        if eff.get("flops_ratio") is not None:
            text += f", and used {eff['flops_ratio']:.2f}x the FLOPs per generation (the paper: {PAPER['flops_ratio']}x)"
        text += "."
        if eff.get("memory_ratio") is not None:
            text += f" Peak process memory was {eff['memory_ratio']:.2f}x."
        paras.append(text)
    mach = rep["machine"]
    load = mach.get("load_average")
    text = (f"**How much to trust this.** Intervals resample seeds and test questions; with "
            f"{rep['config']['seeds']} seeds they are rough. Learning rates were chosen on the validation split with "
            f"seed {rep['config']['seed']} (that run is also seed {rep['config']['seed']} of the final results); the "
            f"test split was used only for the numbers reported.")
    if load and mach.get("cpu_count") and load[0] > 1.2 * mach["cpu_count"]:
        text += (f" The machine was busy (load average {load[0]:.1f} on {mach['cpu_count']} cores): wall-clock "
                 f"times and the equal-wall-clock view are inflated and noisy.")
    paras.append(text)
    return paras


# ---------------------------------------------------------------------------------------------
# Markdown


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def fmt_time(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds >= 3600:
        return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
    if seconds >= 60:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"


def family_markdown(t: dict[str, Any]) -> list[str]:
    lines = [f"## Task family `{t['family']}`: {t['description']}\n"]
    ex = t["data"].get("example")
    if ex:
        lines.append(f"Example prompt: `{ex['prompt']}` → `{ex['answer']}`\n")
    rows = []
    for name, r in t["models"].items():
        mt = r["metrics"]
        rows.append([r["label"], f"{r['params']:,}", str(r.get("layers") or ""), f"{r['lr']:g}",
                     f"{r['train_flops']:.3g}", f"{r['train_examples']:,.0f}", str(len(r["per_seed"])), _f(mt["f1"]),
                     f"[{r['f1_ci95'][0]:.1f}, {r['f1_ci95'][1]:.1f}]", _per_seed(r), _f(mt["HasAns_f1"]),
                     _f(mt["NoAns_f1"]), _f(r["val_metrics"]["f1"])])
    lines.append(_table(["model", "params", "layers", "lr", "train FLOPs", "examples seen", "seeds", "test F1",
                         "95% CI", "F1 per seed", "HasAns F1", "NoAns F1", "val F1"], rows))
    rows = []
    for name, k in t["claims"].items():
        rows.append([k["claim"], f"{k['f1_diff']:+.1f} F1", f"[{k['ci95'][0]:+.1f}, {k['ci95'][1]:+.1f}]",
                     " / ".join(f"{x:+.1f}" for x in k["per_seed"]), f">= +{k['target']:.0f}",
                     "yes" if k["met"] else "**no**"])
    lines.append(_table(["claim", "measured (mean)", "95% CI", "per seed", "target", "met"], rows))
    rows = []
    for m, g in t["grid"].items():
        for lr, x in g["by_lr"].items():
            rows.append([m, lr, _f(x["val_f1"]), _f(x["val_loss"], 3), "**chosen**" if float(lr) == g["chosen_lr"] else ""])
    lines.append("Learning-rate grid (seed 0, validation split; the same rates for both architectures):\n")
    lines.append(_table(["student", "lr", "val F1", "val answer CE", ""], rows))
    v = t["views"]
    rows = [[view.replace("_", " "), _f(v[view]["encdec_val_f1"]), _f(v[view]["deconly_val_f1"])]
            for view in ("equal_flops", "equal_examples", "equal_wall_clock") if view in v]
    lines.append("Validation F1 of the two CE students in three views (encoder-decoder read off its curve where "
                 "the decoder-only run ended):\n")
    lines.append(_table(["view", "encoder-decoder", "decoder-only"], rows))
    from mu.data.synthetic_words import QUESTION_KINDS

    kinds = sorted({k for r in t["models"].values() for k in r.get("by_kind", {})}, key=QUESTION_KINDS.index)
    if kinds:
        counts = next(r["by_kind"] for r in t["models"].values() if r.get("by_kind"))
        lines.append("Test F1 by kind of question (mean over seeds): *shared* = both people have the asked attribute, "
                     "so the value must be bound to its person; *absent person* = someone not in the paragraph, "
                     "*absent attribute* = an attribute nobody there has (both unanswerable):\n")
        lines.append(_table(["model"] + [f"{k.replace('_', ' ')} ({counts[k]['n']})" for k in kinds],
                            [[r["label"]] + [_f(r["by_kind"].get(k, {}).get("f1")) for k in kinds]
                             for r in t["models"].values() if r.get("by_kind")]))
    return lines


def markdown(rep: dict[str, Any]) -> str:
    cfg, eff = rep["config"], rep["efficiency"]
    lines = [f"# Mu demo: encoder-decoder vs decoder-only at small scale (preset `{rep['preset']}`)\n",
             "Measures the quality claims of *Return of the Encoder* (Microsoft, 2025) with models trained here, on "
             + ("built-in word-level synthetic reading comprehension" if cfg["train_data"] is None
                else f"`{cfg['train_data']}`") + f", on `{rep['device']}`, {cfg['seeds']} seeds per student.\n"]
    for t in rep["tasks"].values():
        lines += family_markdown(t)
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
        lines.append(f"At input length {eff['input_length']} (ratios encoder-decoder / decoder-only):\n")
        lines.append(_table(["figure", "value"], rows))
    lines.append("## Plots\n")
    lines.append("![training curves](training_curves.png)\n\n![quality](quality.png)\n\n![latency](latency.png)\n")
    lines.append("## Setup\n")
    lines.append(f"* Data: {rep['data'].get('tokenizer')}; {cfg['n_train']} training, {cfg['n_val']} validation, "
                 f"{cfg['n_test']} test questions (knobs {cfg['synthetic'] or 'default'}).")
    lines.append(f"* Training: AdamW, batch {cfg['batch_size']}, cosine schedule, warmup {cfg['warmup']}, weight decay "
                 f"{cfg['weight_decay']}, {cfg['weight_init']} init, {cfg['precision']}; learning-rate grid "
                 f"{', '.join(f'{x:g}' for x in cfg['lr_grid'])} for both students; teacher lr {cfg['teacher_lr']:g}, "
                 f"batch {cfg.get('teacher_batch_size', cfg['batch_size'])}, "
                 + (f"{cfg['teacher_examples']} documents (a language model on each paragraph with its questions "
                    "packed after it, every token scored)" if cfg.get("teacher_documents") and not cfg.get("train_data")
                    else f"{cfg['teacher_examples']} examples")
                 + (f", the best of {cfg['teacher_seeds']} seeds on validation F1" if cfg.get("teacher_seeds", 1) > 1
                    else "")
                 + (f" of its own training split (knobs {cfg['teacher_synthetic']})" if cfg.get("teacher_synthetic")
                    else "") + ". Students: one FLOP budget per task family (6 x parameters x tokens per stack), what "
                 f"the encoder-decoder spends on {cfg['student_examples']} examples"
                 + "".join(f", x{x:g} for {f}" for f, x in (cfg.get("family_budget_scale") or {}).items()
                           if f in cfg["families"]) + ".")
    lines.append(f"* Distillation: {cfg['kd_alpha']} x {cfg['kd_divergence']} (temperature {cfg['kd_temperature']}) + "
                 f"{1 - cfg['kd_alpha']:.1f} x CE; off-policy (gold targets) and on-policy (student samples scored by "
                 f"the teacher, fraction {cfg['kd_on_policy']}). The teacher's forward passes are outside the budget.")
    mach, tm = rep["machine"], rep["timing"]
    stage_times = ", ".join(f"{k} {fmt_time(v)}" for k, v in tm.items() if isinstance(v, (int, float)))
    lines.append(f"* Machine: {mach['cpu_count']} cores ({mach.get('isa')}), {mach['workers']} worker process(es) x "
                 f"{mach['threads_per_worker']} thread(s); stage times (this invocation): {stage_times}.")
    lines.append("* Files: `report.json` (every number), one directory per task family / model / seed with `run.json`, "
                 "`test_predictions.jsonl`, `metrics.jsonl` and `final/` (load with `mu.load_model`), `bench/`.\n")
    return "\n".join(lines)


def _ms(seconds: Optional[float]) -> str:
    return "n/a" if seconds is None else f"{1e3 * seconds:.1f}"


def write_report(rep: dict[str, Any], out: Path) -> dict[str, Path]:
    from mu.demo.plots import write_plots

    files = output_files(out)
    write_plots(rep, {k: files[k] for k in PLOT_FILES})
    atomic_write_text(files["report.json"], json.dumps(rep, indent=1, default=str) + "\n")
    atomic_write_text(files["report.md"], markdown(rep))
    return files
