"""How close are the exported graphs to the PyTorch model on a trained model? fp32 and int8, F1 and greedy tokens.

    flock -x /tmp/mu-cpu.lock .venv/bin/python benchmarks/onnx_agreement.py --model runs/squad-tiny/final \
        --task squad_v2 --data synthetic:test:600 --work /tmp/onnx_agree

Engines, the same trained weights, greedy decoding until EOS through `mu.eval.evaluate_model` (batched,
length-sorted, the task's prompt and metric):
  torch-fp32   the model as trained (the reference)
  torch-int8   `model.quantize_("int8")` (mu's fbgemm int8 linears)
  ort-fp32     `mu export onnx` graphs through `mu.onnx`
  ort-int8     the same after onnxruntime's dynamic int8 quantisation (`--quantize int8`)

For each engine: the task metrics (F1, exact; SQuAD 2.0 HasAns / NoAns), the F1 delta against torch-fp32,
and agreement with torch-fp32's greedy output: the share of examples whose generated tokens (up to EOS)
are identical, and the share of token positions that agree (over each pair's longer output). Also the
seconds each engine took (on a quiet machine, under `flock -x`). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch

import mu
import mu.onnx
from mu.data.tasks import get_task, load_examples
from mu.eval.runner import evaluate_model
from mu.export.onnx_export import MANIFEST, export_onnx, quantize_export
from onnx_speed import cpu_isa  # benchmarks/ is on sys.path when this file runs


class Recorder:
    """Wraps a model; keeps every `generate` output (the evaluation calls it batch by batch, in a fixed order)."""

    def __init__(self, model):
        self.model = model
        self.outputs: list[tuple[int, torch.Tensor]] = []  # (prompt width, output)

    def __getattr__(self, name):
        return getattr(self.model, name)

    def generate(self, input_ids, **kwargs):
        out = self.model.generate(input_ids, **kwargs)
        self.outputs.append((input_ids.shape[1], out))
        return out


def new_tokens(out: torch.Tensor, arch: str, width: int, eos: int) -> list[list[int]]:
    """Each row's generated tokens up to and including EOS."""
    new = out[:, 1:] if arch == "encdec" else out[:, width:]
    rows = []
    for row in new.tolist():
        rows.append(row[:row.index(eos) + 1] if eos in row else row)
    return rows


def agreement(ref: list[list[int]], other: list[list[int]]) -> dict[str, float]:
    same = sum(a == b for a, b in zip(ref, other))
    positions = sum(max(len(a), len(b)) for a, b in zip(ref, other))
    agree = sum(sum(x == y for x, y in zip(a, b)) for a, b in zip(ref, other))
    return {"sequences_identical": same / len(ref), "token_agreement": agree / positions}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a trained mu model directory (with its tokenizer)")
    p.add_argument("--task", default="squad_v2")
    p.add_argument("--data", default="synthetic:test:600", help="the task's evaluation data")
    p.add_argument("--limit", type=int)
    p.add_argument("--work", default="runs/onnx_agree", help="where the exports are written (reused)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    fp32_dir, int8_dir = work / "onnx-fp32", work / "onnx-int8"
    if not (fp32_dir / MANIFEST).is_file():
        export_onnx(args.model, fp32_dir)
    if not (int8_dir / MANIFEST).is_file():
        quantize_export(fp32_dir, int8_dir)

    model = mu.load_model(args.model)
    tok = model.tokenizer
    examples = load_examples(args.task, args.data, limit=args.limit)
    engines = {
        "torch-fp32": model,
        "torch-int8": mu.load_model(args.model).quantize_("int8"),
        "ort-fp32": mu.onnx.load(fp32_dir, threads=args.threads),
        "ort-int8": mu.onnx.load(int8_dir, threads=args.threads),
    }
    metrics, tokens, seconds = {}, {}, {}
    for name, engine in engines.items():
        rec = Recorder(engine)
        t0 = time.perf_counter()
        metrics[name], _ = evaluate_model(rec, tok, args.task, examples, batch_size=args.batch_size, progress=False)
        seconds[name] = time.perf_counter() - t0
        tokens[name] = [row for width, out in rec.outputs
                        for row in new_tokens(out, model.config.arch, width, tok.eos_token_id)]
        print(f"  {name}: {seconds[name]:.1f}s {json.dumps({k: round(v, 3) for k, v in metrics[name].items()})}",
              file=sys.stderr)
    primary = get_task(args.task).metric
    rows = {}
    for name in engines:
        rows[name] = {primary: metrics[name][primary], f"{primary}_delta": metrics[name][primary] -
                      metrics["torch-fp32"][primary], **agreement(tokens["torch-fp32"], tokens[name]),
                      "seconds": seconds[name], "metrics": metrics[name]}
    print(f"{'engine':12s} {primary:>8s} {'delta':>7s} {'identical':>10s} {'tokens':>8s} {'seconds':>8s}")
    for name, r in rows.items():
        print(f"{name:12s} {r[primary]:8.2f} {r[primary + '_delta']:+7.2f} {r['sequences_identical']:10.3f} "
              f"{r['token_agreement']:8.3f} {r['seconds']:8.1f}")
    isa = cpu_isa()
    print(f"{len(examples)} examples of {args.data}; agreement with torch-fp32's greedy tokens; ISA {isa}")
    print(json.dumps({"model": args.model, "task": args.task, "data": args.data, "examples": len(examples),
                      "threads": args.threads, "isa": isa, "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
