"""`mu eval`: evaluate a model on a task with batched cached generation; write metrics (and predictions)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from mu.commands import tasks
from mu.data.tasks import TASKS, load_examples
from mu.errors import MuError
from mu.eval.io import write_json_atomic, write_predictions
from mu.eval.runner import MAX_NEW_TOKENS, default_max_source_len, evaluate_model
from mu.model.io import load_model
from mu.tokenizer import load_tokenizer
from mu.utils import pick_device


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="model directory (or the paper's model.pt with --tokenizer)")
    tasks.add_task_argument(p, "eval", required=True)
    p.add_argument("--data", required=True, help="the task's data (.jsonl, saved HF dataset, synthetic:test, ...)")
    p.add_argument("--out", help="write results (metrics + settings) to this JSON file")
    p.add_argument("--predictions", help="write predictions here (.json: {id: text}; otherwise JSON lines)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the one saved with the model)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, help="generation budget (default: per task)")
    p.add_argument("--max-source-len", type=int, help="truncate prompts to this many tokens (default: block_size)")
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--limit", type=int, help="evaluate only the first N examples")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", help="fp32, bf16 or fp16 (default: as stored)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    for name in ("batch_size", "max_new_tokens", "max_source_len", "num_beams"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise MuError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for flag, path in (("--out", args.out), ("--predictions", args.predictions)):
        if path and Path(path).is_dir():  # found now, not after the whole evaluation has run
            raise MuError(f"{flag} {path}: is a directory; expected a file name to write")
    return tasks.run("eval", args)


def run_text(args) -> int:
    examples = load_examples(args.task, args.data, limit=args.limit)  # bad data fails before the model loads
    device = pick_device(args.device)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    model = load_model(args.model, device=device, dtype=args.dtype, tokenizer=tokenizer)
    if model.tokenizer is None:
        raise MuError(f"{args.model} has no tokenizer files; pass --tokenizer DIR")
    max_new = args.max_new_tokens or MAX_NEW_TOKENS[args.task]
    max_src = args.max_source_len or default_max_source_len(model, max_new)
    t0 = time.perf_counter()
    metrics, predictions = evaluate_model(model, model.tokenizer, args.task, examples, batch_size=args.batch_size,
                                          max_new_tokens=max_new, max_source_len=max_src,
                                          progress=not args.quiet, num_beams=args.num_beams)
    seconds = time.perf_counter() - t0
    result = {"task": args.task, "model": str(args.model), "arch": model.config.arch, "data": str(args.data),
              "primary_metric": TASKS[args.task].metric, "metrics": metrics,
              "generation": {"batch_size": args.batch_size, "max_new_tokens": max_new, "max_source_len": max_src,
                             "num_beams": args.num_beams, "device": str(device), "dtype": str(model.dtype)},
              "seconds": round(seconds, 3)}
    if args.predictions:
        write_predictions(args.predictions, predictions)
    if args.out:
        write_json_atomic(args.out, result)
    print(json.dumps(result, indent=2))
    if not args.out:
        print("(pass --out FILE to save these results)", file=sys.stderr)
    return 0
