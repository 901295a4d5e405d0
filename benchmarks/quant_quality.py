"""Quality of each reduced inference format on a trained model: greedy-token agreement with fp32 and F1 change.

    .venv/bin/python benchmarks/quant_quality.py                  # trains a tiny encdec, ~2-4 min on 2 cores
    .venv/bin/python benchmarks/quant_quality.py --model DIR --data test.jsonl --task squad_v2   # a trained one
    .venv/bin/python benchmarks/quant_quality.py --model STUDENT --demo-words   # a demo student (issue 20)
    .venv/bin/python benchmarks/quant_quality.py --model DEMO_OUT/context_first/encdec/seed0-lr0.002/final \
        --demo-words --data DEMO_OUT/data/test.jsonl      # a demo student on that demo's own test split

Without --model it writes the built-in synthetic reading-comprehension splits (`mu.data.synthetic`, SQuAD-2.0
schema, paragraph-disjoint) into a temporary directory, trains the `tiny` encoder-decoder on the train split
for a fixed number of steps (`mu train`, byte tokenizer), and evaluates the test split. Each format is the
trained fp32 model loaded with `mu.load_model(dtype=FORMAT)`: fp32, bf16, int8 (dynamic int8, both phases),
int8dec (encoder fp32, decoder + lm_head int8), int8wo (weight-only int8 decode, dynamic int8 prefill) and int4
(group-wise int4 decode, dynamic int8 prefill). Greedy decoding, the same batches for every format.

Token agreement: over all test examples, the fraction of fp32's generated answer tokens (its prediction,
re-tokenized) matched at the same position by the format's. F1 is the task's metric (SQuAD-2.0 F1, x100).
`--demo-words`: the demo's word-level synthetic task (`mu.data.synthetic_words`, merged with issue 20):
the held-out examples are its test and validation questions at n_test=10, n_val=200 (`word_splits(0, 200,
10)`: 210 questions a student trained on `word_splits(N, 200, 10)["train"]` never saw), or with --data the questions
of that file (a demo run's `data/test.jsonl`), in the prompt order given by --order. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import mu
from mu.data.synthetic import write_synthetic_splits
from mu.data.tasks import load_examples
from mu.eval.runner import evaluate_model
from mu.utils import cpu_isa

FORMATS = ("fp32", "bf16", "int8", "int8dec", "int8wo", "int4")


def load(model_dir: str, fmt: str):
    if fmt == "int8dec":
        return mu.load_model(model_dir, dtype="fp32").quantize_("int8", include_encoder=False)
    return mu.load_model(model_dir, dtype=fmt)


def agreement(tok, ref: dict[str, str], got: dict[str, str]) -> float:
    match = total = 0
    for k, text in ref.items():
        a, b = tok.encode(text, add_special_tokens=False), tok.encode(got[k], add_special_tokens=False)
        total += max(len(a), 1)
        match += sum(x == y for x, y in zip(a, b)) if a else int(not b)
    return match / total


def train(tmp: Path, args) -> tuple[str, Path]:
    paths = write_synthetic_splits(tmp / "data", args.n_train, 200, args.n_test, seed=args.seed)
    cmd = [sys.executable, "-m", "mu", "train", "--task", "squad_v2", "--preset", args.preset, "--weight-init",
           "fan_in", "--train-data", str(paths["train"]), "--val-data", str(paths["val"]), "--max-steps",
           str(args.steps), "--batch-size", "32", "--lr", "3e-3", "--warmup", "50", "--seed", str(args.seed),
           "--precision", "fp32", "--eval-every", str(args.steps), "--no-progress", "--out", str(tmp / "run")]
    print("# " + " ".join(cmd[1:]), file=sys.stderr)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return str(tmp / "run" / "final"), paths["test"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a trained fp32 mu model directory (default: train a tiny one)")
    p.add_argument("--data", help="test file for --model (with --demo-words: a demo run's data/test.jsonl)")
    p.add_argument("--demo-words", action="store_true", help="held-out examples of the demo's word-level task")
    p.add_argument("--order", default="context_first", help="--demo-words prompt order")
    p.add_argument("--words-module", help="path of synthetic_words.py when mu.data.synthetic_words is not installed")
    p.add_argument("--task", default="squad_v2")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--n-train", type=int, default=8000)
    p.add_argument("--n-test", type=int, default=400)
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32,
                   help="evaluation batch (steps of at most 8 rows run the decode kernels: fast.SPLIT_MAX_ROWS)")
    args = p.parse_args(argv)
    if args.batch_size < 1:  # before any training: a bad value found after it would waste minutes
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    torch.set_num_threads(args.threads)
    tmp_obj = tempfile.TemporaryDirectory(prefix="quant_quality-")
    if args.model:
        model_dir, test = args.model, Path(args.data or "-")
    else:
        model_dir, test = train(Path(tmp_obj.name), args)
    if args.demo_words:
        if args.words_module:  # the demo's module from another checkout, loaded by path
            import importlib.util

            spec = importlib.util.spec_from_file_location("synthetic_words", args.words_module)
            words = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(words)
            word_example, word_splits = words.word_example, words.word_splits
        else:
            from mu.data.synthetic_words import word_example, word_splits
        if args.data:  # a demo run's own split (DEMO_OUT/data/test.jsonl)
            from mu.data.tasks import iter_jsonl

            examples = [word_example(r, args.order) for _, r in iter_jsonl(args.data)]
        else:
            held = word_splits(0, 200, 10, seed=0)
            examples = [word_example(r, args.order) for r in held["test"] + held["val"]]
            test = Path("demo-words test+val")
    else:
        examples = load_examples(args.task, test)
    results, preds = {}, {}
    for fmt in args.formats.split(","):
        model = load(model_dir, fmt)
        metrics, preds[fmt] = evaluate_model(model, None, args.task, examples, batch_size=args.batch_size,
                                             progress=False, max_new_tokens=args.max_new_tokens)
        results[fmt] = {"f1": metrics["f1"], "exact": metrics.get("exact")}
    tok = mu.load_model(model_dir).tokenizer
    ref = results.get("fp32")
    print(f"ISA {cpu_isa()}, {args.threads} threads; {len(examples)} test examples of {test.name}; model {model_dir}")
    print(f"{'format':8s} {'F1':>7s} {'dF1':>7s} {'EM':>7s} {'token agreement':>16s}")
    for fmt, r in results.items():
        r["token_agreement"] = agreement(tok, preds["fp32"], preds[fmt]) if "fp32" in preds else None
        r["f1_change"] = r["f1"] - ref["f1"] if ref else None
        print(f"{fmt:8s} {r['f1']:7.2f} {r['f1_change'] if ref else float('nan'):+7.2f} "
              f"{(r['exact'] or float('nan')):7.2f} {r['token_agreement'] or float('nan'):16.4f}")
    tmp_obj.cleanup()
    print(json.dumps({"isa": cpu_isa(), "threads": args.threads, "examples": len(examples), "steps": args.steps,
                      "preset": args.preset, "results": results}))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
