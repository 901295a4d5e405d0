"""`mu score`: score a predictions file against a task's references, without a model."""

from __future__ import annotations

import json

from mu.commands import tasks
from mu.data.tasks import TASKS, load_examples
from mu.eval.io import predicted_only, read_predictions, write_json_atomic
from mu.eval.metrics import compute_metrics


def add_arguments(p) -> None:
    tasks.add_task_argument(p, "score", required=True)
    p.add_argument("--data", required=True, help="the task's data file (.jsonl, see docs/tasks.md)")
    p.add_argument("--predictions", required=True,
                   help='{id: text} JSON (the SQuAD convention) or JSON lines {"id", "prediction"}')
    p.add_argument("--out", help="also write the metrics to this JSON file")
    p.add_argument("--limit", type=int, help="score only the first N examples of --data")
    p.add_argument("--allow-missing", action="store_true",
                   help="score only the examples that have a prediction, with a warning that says how many do "
                        "not (default: refuse a partial predictions file)")


def run(args) -> int:
    return tasks.run("score", args)


def run_text(args) -> int:
    examples = load_examples(args.task, args.data, limit=args.limit)
    predictions = read_predictions(args.predictions)
    n_all = len(examples)
    examples = predicted_only(examples, predictions, args.predictions, args.data, args.allow_missing)
    missing = n_all - len(examples)
    metrics = compute_metrics(args.task, examples, predictions)
    result = {"task": args.task, "data": str(args.data), "predictions": str(args.predictions),
              "primary_metric": TASKS[args.task].metric, "metrics": metrics, "scored": len(examples),
              "missing": missing}
    if args.out:
        write_json_atomic(args.out, result)
    print(json.dumps(result, indent=2))
    return 0
