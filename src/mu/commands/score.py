"""`mu score`: score a predictions file against a task's references, without a model."""

from __future__ import annotations

import json
import sys

from mu.errors import MuError

TASK_CHOICES = ["squad_v2", "xsum", "code2text", "seq2seq", "vqa"]


def add_arguments(p) -> None:
    p.add_argument("--task", required=True, choices=TASK_CHOICES)
    p.add_argument("--data", required=True, help="the task's data file (.jsonl, see docs/tasks.md)")
    p.add_argument("--predictions", required=True,
                   help='{id: text} JSON (the SQuAD convention) or JSON lines {"id", "prediction"}')
    p.add_argument("--out", help="also write the metrics to this JSON file")
    p.add_argument("--limit", type=int, help="score only the first N examples of --data")
    p.add_argument("--allow-missing", action="store_true",
                   help="score only the examples that have a prediction, with a warning that says how many do "
                        "not (default: refuse a partial predictions file)")


def run(args) -> int:
    if args.task == "vqa":
        from mu.vision.cli import run_score

        return run_score(args)
    from mu.data.tasks import TASKS, load_examples
    from mu.eval.io import read_predictions, write_json_atomic
    from mu.eval.metrics import compute_metrics

    examples = load_examples(args.task, args.data, limit=args.limit)
    predictions = read_predictions(args.predictions)
    ids = {e.id for e in examples}
    missing = [e.id for e in examples if e.id not in predictions]
    if missing:
        shown = ", ".join(map(repr, missing[:5])) + (" ..." if len(missing) > 5 else "")
        problem = (f"{args.predictions}: no prediction for {len(missing)} of the {len(examples)} examples in "
                   f"{args.data} (ids {shown})")
        if not args.allow_missing or len(missing) == len(examples):
            raise MuError(problem + ("" if args.allow_missing else "; pass --allow-missing to score the rest"))
        print(f"warning: {problem}; scoring the other {len(examples) - len(missing)} only", file=sys.stderr)
        examples = [e for e in examples if e.id in predictions]
    extra = sum(k not in ids for k in predictions)
    if extra:
        print(f"note: {extra} predictions have ids that are not in {args.data}; they were ignored", file=sys.stderr)
    metrics = compute_metrics(args.task, examples, predictions)
    result = {"task": args.task, "data": str(args.data), "predictions": str(args.predictions),
              "primary_metric": TASKS[args.task].metric, "metrics": metrics, "scored": len(examples),
              "missing": len(missing)}
    if args.out:
        write_json_atomic(args.out, result)
    print(json.dumps(result, indent=2))
    return 0
