"""`mu demo`: the paper's comparison at small scale, end to end, with no downloads.

    mu demo --out demo_out                  # ~15 minutes on a 2-core CPU (`make demo`): one task family
    mu demo --preset full --out demo_full   # both task families (~45 minutes)
    mu demo --quick --out /tmp/demo_quick   # under a minute: a smoke test
    mu demo --preset large --device cuda --out demo_large
    mu demo --train-data data/squad_v2_train.jsonl --val-data data/squad_v2_dev.jsonl --out d

Re-running the same command resumes: finished stages are reused, an interrupted training run continues
from its checkpoint, and a changed setting redoes the stages it affects. See docs/demo.md.
"""

from __future__ import annotations

import argparse
import json
import sys

from mu.commands.args import number
from mu.errors import MuError


def _lengths(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts such as 128,512, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive token counts, got {text!r}")
    return values


def _rates(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated learning rates such as 2e-3,5e-3, got {text!r}")
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive learning rates, got {text!r}")
    return values


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_arguments(p: argparse.ArgumentParser) -> None:
    from mu.demo.config import PRESETS

    p.add_argument("--out", default="demo_out", help="output directory (default demo_out); re-running resumes")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="quick (< 1 minute, tests), default (~15 minutes on a 2-core CPU, one task family), full "
                        "(both task families, ~45 minutes), large (GPU or hours)")
    p.add_argument("--quick", action="store_true", help="same as --preset quick")
    g = p.add_argument_group("data (default: built-in synthetic reading comprehension)")
    g.add_argument("--train-data", metavar="FILE", help="squad_v2 training file, e.g. data/squad_v2_train.jsonl")
    g.add_argument("--val-data", metavar="FILE", help="validation file (default: held out from --train-data)")
    g.add_argument("--test-data", metavar="FILE", help="test file (default: --val-data, else held out from --train-data)")
    g.add_argument("--n-train", type=int, help="training examples (synthetic count, or a limit on --train-data)")
    g.add_argument("--n-val", type=int, help="validation examples")
    g.add_argument("--n-test", type=int, help="test examples")
    g.add_argument("--vocab-size", type=int, help="BPE vocabulary trained on --train-data (built-in data: word-level)")
    g.add_argument("--families", type=_names, help="task families of the built-in data, comma-separated: "
                   "context_first (question after the context), question_first")
    g.add_argument("--max-source-len", type=int, help="prompt tokens kept")
    g = p.add_argument_group("training")
    g.add_argument("--teacher-examples", type=int,
                   help="training sequences the teacher sees (documents: a paragraph with its questions)")
    g.add_argument("--teacher-seeds", type=int, help="teachers trained; the best on validation F1 teaches (default 3)")
    g.add_argument("--student-examples", type=int,
                   help="the students' FLOP budget, as what the encoder-decoder spends on this many examples")
    g.add_argument("--max-flops", type=number(float), dest="student_flops",
                   help="an explicit FLOP budget for every student instead of --student-examples")
    g.add_argument("--batch-size", type=int, help="examples per step of every student (default 32)")
    g.add_argument("--teacher-batch-size", type=int, help="the teacher's sequences per step (default 16)")
    g.add_argument("--teacher-lr", type=float)
    g.add_argument("--lr-grid", type=_rates, help="comma-separated learning rates tried for both students (chosen "
                   "per architecture on the validation split)")
    g.add_argument("--seeds", type=int, help="seeds per student (default 3)")
    g = p.add_argument_group("distillation")
    g.add_argument("--kd-alpha", type=float, help="weight of the KD term (default 0.9, the paper's)")
    g.add_argument("--kd-temperature", type=float)
    g.add_argument("--kd-on-policy", type=float,
                   help="the on-policy KD student: fraction of batches with student-sampled targets (default 1)")
    g = p.add_argument_group("inference benchmark")
    g.add_argument("--bench-preset", help="model size of the benchmark (mu presets: tiny, small, 330m, 1b)")
    g.add_argument("--bench-input-lengths", type=_lengths, help="comma-separated prompt lengths")
    g.add_argument("--bench-new-tokens", type=int)
    g.add_argument("--no-bench-memory", action="store_true", help="skip the peak-memory subprocesses")
    g = p.add_argument_group("run")
    g.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    g.add_argument("--workers", type=int, help="training runs in parallel, one process each (default 2)")
    g.add_argument("--threads", type=int, help="torch threads per worker (default: cores / workers)")
    g.add_argument("--seed", type=int)
    g.add_argument("--quiet", action="store_true", help="no progress bars or ETA lines")


SETTINGS = ("train_data", "val_data", "test_data", "families", "n_train", "n_val", "n_test", "vocab_size",
            "max_source_len", "teacher_examples", "teacher_batch_size", "teacher_seeds", "student_examples",
            "student_flops", "batch_size", "teacher_lr", "lr_grid", "seeds", "kd_alpha", "kd_temperature",
            "kd_on_policy", "bench_preset", "bench_input_lengths", "bench_new_tokens", "device", "workers", "threads",
            "seed")


def run(args: argparse.Namespace) -> int:
    from mu.demo import demo_config, run_demo

    preset = "quick" if args.quick else args.preset
    if args.quick and args.preset not in ("default", "quick"):
        raise MuError(f"--quick and --preset {args.preset} disagree; give one of them")
    overrides = {k: getattr(args, k) for k in SETTINGS}
    if args.no_bench_memory:
        overrides["bench_memory"] = False
    overrides["progress"] = not args.quiet
    cfg = demo_config(args.out, preset, **overrides)
    result = run_demo(cfg)
    rep = result.report
    print(f"\nmu demo done in {result.seconds:.0f}s ({sum(v == 'reused' for v in result.stages.values())} of "
          f"{len(result.stages)} runs/stages reused; {rep['machine']['isa']}, {rep['machine']['workers']} worker(s) x "
          f"{rep['machine']['threads_per_worker']} thread(s)).", file=sys.stderr)
    for family, t in rep["tasks"].items():
        print(f"  task {family} ({t['description']}):", file=sys.stderr)
        for name, m in t["models"].items():
            print(f"    {m['label']:<42} {m['params']:>9,} params  F1 {m['metrics']['f1']:5.1f} "
                  f"[{m['f1_ci95'][0]:.1f}, {m['f1_ci95'][1]:.1f}]  HasAns {m['metrics']['HasAns_f1']:5.1f}  "
                  f"({len(m['per_seed'])} seed(s))", file=sys.stderr)
        for name, k in t["claims"].items():
            print(f"    {name}: {k['f1_diff']:+.1f} F1 [{k['ci95'][0]:+.1f}, {k['ci95'][1]:+.1f}] over {k['seeds']} "
                  f"seeds (target >= +{k['target']:.0f}: {'met' if k['met'] else 'NOT met'})", file=sys.stderr)
    print("Outputs:", file=sys.stderr)
    for name, path in result.files.items():
        print(f"  {path}", file=sys.stderr)
    summary = {"out": str(result.out), "report": str(result.files["report.md"]), "seconds": round(result.seconds, 1),
               "tasks": {family: {"f1": {n: round(m["metrics"]["f1"], 2) for n, m in t["models"].items()},
                                  **{name: {"f1_diff": round(k["f1_diff"], 2), "ci95": [round(x, 2) for x in k["ci95"]]}
                                     for name, k in t["claims"].items()}}
                         for family, t in rep["tasks"].items()},
               "efficiency": {x: rep["efficiency"].get(x) for x in ("input_length", "ttft_ratio", "decode_speedup",
                                                                     "memory_ratio", "flops_ratio")}}
    print(json.dumps(summary))
    return 0
