"""One training run of the demo, as plain data in and out, so that it can run in a worker process.

`execute_run(payload)` trains (mu.train.train) or distils (mu.distill.distill) one model, evaluates its
final weights on the validation and test splits (greedy, SQuAD 2.0 metrics) and writes
`RUN_DIR/run.json` atomically: the payload's hash, the training summary, the metrics, the test F1 of
every question (for paired, bootstrapped comparisons) and the validation curve against training FLOPs,
examples and seconds. A run directory whose run.json carries the same hash is reused as it is.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

RUN_FILE = "run.json"
_CACHE: dict[str, Any] = {}  # per process: tokenizer and examples, read once


def load_done(run_dir: str | Path, run_hash: str) -> dict[str, Any] | None:
    """The finished run's record when RUN_DIR/run.json exists with `run_hash`, else None."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError:
        return None
    return record if record.get("hash") == run_hash else None


def split_examples(payload: dict[str, Any], split: str) -> list:
    from mu.data.tasks import load_examples

    path, family = payload["data"][split], payload["family"]
    key = f"{path}|{family}"
    if key not in _CACHE:
        if family == "squad_v2":
            _CACHE[key] = load_examples("squad_v2", path)
        else:
            from mu.data.synthetic_words import word_example
            from mu.data.tasks import iter_jsonl

            _CACHE[key] = [word_example(record, family) for _, record in iter_jsonl(path)]
    return _CACHE[key]


def teacher_documents(payload: dict[str, Any], tokenizer, examples: list):
    """The training split as language-model documents (built-in data), one per paragraph, which each reads
    once: the first question's prompt and answer, then every later question as a follow-up (`word_follow_up`)
    and its answer (`mu.data.batching.pack_documents`)."""
    from dataclasses import replace

    from mu.data.batching import encode_examples, pack_documents
    from mu.data.synthetic_words import word_follow_up
    from mu.data.tasks import iter_jsonl
    from mu.train.objectives import FeatureDataset

    t = payload["train"]
    records = [record for _, record in iter_jsonl(payload["data"]["train"])]
    contexts = [record["context"] for record in records]
    first: dict[str, int] = {}
    for i, context in enumerate(contexts):
        first.setdefault(context, i)
    examples = [ex if first[context] == i else replace(ex, source=word_follow_up(record))
                for i, (ex, record, context) in enumerate(zip(examples, records, contexts))]
    features = encode_examples(examples, tokenizer, t["max_source_len"], t["max_target_len"], task=t["task"])
    return FeatureDataset(pack_documents(features, contexts))


def cached_tokenizer(path: str):
    if path not in _CACHE:
        from mu.tokenizer import load_tokenizer

        _CACHE[path] = load_tokenizer(path)
    return _CACHE[path]


def curve(run_dir: Path, times: dict[int, float], batch_size: int) -> list[dict[str, Any]]:
    """Validation points (answer CE, F1) against step, training FLOPs, examples and seconds."""
    points = []
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        r = json.loads(line)
        if r.get("event") == "eval":
            points.append({"step": r["step"], "flops": r["flops"], "examples": r["step"] * batch_size,
                           "seconds": times.get(r["step"]), "val_loss": r.get("val_loss"), "f1": r.get("f1"),
                           "HasAns_f1": r.get("HasAns_f1")})
    return points


def per_example_f1(examples, predictions: dict[str, str]) -> dict[str, float]:
    """{id: F1 in [0, 1]} with the official SQuAD 2.0 definition (for paired comparisons)."""
    from mu.eval.metrics import squad_v2_metrics

    return {e.id: squad_v2_metrics({e.id: predictions[e.id]}, {e.id: e.references})["f1"] / 100.0
            for e in examples}


def execute_run(payload: dict[str, Any]) -> dict[str, Any]:
    """Train + evaluate one run described by `payload` (see Demo.payload); -> its run.json record."""
    import torch

    from mu.checkpoint import load_model
    from mu.eval import evaluate_model
    from mu.train import TrainConfig, train
    from mu.atomic import atomic_write_text

    if payload.get("threads"):
        torch.set_num_threads(payload["threads"])
    run_dir = Path(payload["train"]["out"])
    run_dir.mkdir(parents=True, exist_ok=True)
    tok = cached_tokenizer(payload["train"]["tokenizer"])
    train_ex, val_ex, test_ex = (split_examples(payload, s) for s in ("train", "val", "test"))
    times: dict[int, float] = {}
    t0 = time.perf_counter()

    def on_step(state) -> None:
        times[state.step] = time.perf_counter() - t0

    tc = TrainConfig(**payload["train"])
    with open(run_dir / "train.log", "a", encoding="utf-8") as log, \
            contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):  # the trainer's lines
        if payload["kind"] == "kd":
            from mu.distill import DistillConfig, distill

            dc = DistillConfig(train=tc, student_preset="tiny", **payload["kd"])
            result = distill(dc, train_examples=train_ex, val_examples=val_ex, on_step=on_step)
        elif payload.get("documents"):
            result = train(tc, tokenizer=tok, train_dataset=teacher_documents(payload, tok, train_ex),
                           val_examples=val_ex, on_step=on_step)
        else:
            result = train(tc, tokenizer=tok, train_examples=train_ex, val_examples=val_ex, on_step=on_step)
    train_s = time.perf_counter() - t0
    model = load_model(result.final_dir, device="cpu")
    ev = payload["eval"]
    scores: dict[str, Any] = {}
    for split, exs in (("val", val_ex), ("test", test_ex)):
        metrics, preds = evaluate_model(model, tok, "squad_v2", exs, batch_size=ev["batch_size"],
                                        max_new_tokens=ev["max_new_tokens"], max_source_len=ev["max_source_len"],
                                        device="cpu", progress=False)
        scores[split] = {k: float(v) for k, v in metrics.items()}
        if split == "test":
            lines = "".join(json.dumps({"id": i, "prediction": p}) + "\n" for i, p in preds.items())
            atomic_write_text(run_dir / "test_predictions.jsonl", lines)
            scores["test_f1_by_id"] = per_example_f1(exs, preds)
    keep = ("params", "steps", "epochs", "examples", "enc_tokens", "dec_tokens", "loss_tokens", "flops", "train_loss",
            "val_loss", "stop_reason", "precision")
    shape = payload["train"]["model_overrides"]
    layers = (f"{shape['n_encoder_layer']}+{shape['n_decoder_layer']}" if tc.arch == "encdec"
              else str(shape["n_decoder_layer"]))
    record = {"hash": payload["hash"], "spec": payload["spec"], "model_dir": result.final_dir, "layers": layers,
              "train": {k: getattr(result, k) for k in keep}, "val": scores["val"], "test": scores["test"],
              "test_f1_by_id": scores["test_f1_by_id"], "curve": curve(run_dir, times, tc.batch_size),
              "train_seconds": train_s, "seconds": time.perf_counter() - t0, "threads": torch.get_num_threads()}
    if payload["kind"] == "kd":
        # the teacher reads source + target of every KD example: 2 FLOPs per parameter per token, outside the budget
        record["train"]["teacher_forward_flops"] = 2.0 * payload["teacher_params"] * (result.enc_tokens +
                                                                                      result.dec_tokens)
    atomic_write_text(run_dir / RUN_FILE, json.dumps(record) + "\n")
    return record
