"""`mu finetune-teacher`: LoRA fine-tuning of a causal-LM teacher on a task (the paper's r 16, alpha 32, dropout 0.05).

    mu finetune-teacher --model phi-3.5-mini --task squad_v2 --train-data squad_v2_train.jsonl \\
                        --val-data squad_v2_dev.jsonl --out runs/teacher-lora --max-steps 500 --merge
    mu distill --teacher runs/teacher-lora/adapter ...      # or --teacher runs/teacher-lora/merged
"""

from __future__ import annotations

import argparse
import json

from mu.commands import tasks
from mu.commands.args import add_config_arguments, config_kwargs, require_finite
from mu.distill.lora import FinetuneTeacherConfig, finetune_teacher

FIELDS = ("model", "tokenizer", "train_data", "val_data", "out", "lora_r", "lora_alpha", "lora_dropout",
          "merge", "max_source_len", "max_target_len", "train_limit", "val_limit", "max_steps", "epochs",
          "batch_size", "grad_accum", "lr", "weight_decay", "warmup", "grad_clip", "precision", "seed", "device",
          "log_every", "eval_every", "progress")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(
        p, FinetuneTeacherConfig, FIELDS, required=("model", "train_data", "out"),
        choices={"precision": ["auto", "fp32", "bf16"]},
        metavars={"model": "DIR", "tokenizer": "DIR", "train_data": "PATH", "val_data": "PATH", "out": "DIR"},
        helps={"out": "writes DIR/adapter (and DIR/merged with --merge)",
               "merge": "also save the merged model to DIR/merged",
               "grad_accum": "micro-batches per optimizer step (default 1)",
               "val_data": "validation file, same format", "train_limit": "use the first N training examples",
               "val_limit": "validation examples used (default 256)", "lr": "peak learning rate (default 2e-4)",
               "weight_decay": "AdamW weight decay (default 0.0)", "grad_clip": "max gradient norm (default 1.0)",
               "epochs": "passes over the training data (default 1.0)",
               "batch_size": "micro-batch size (default 4)", "device": "auto, cpu, cuda, cuda:N (default auto)",
               "log_every": "steps between metrics.jsonl records (default 10)", "progress": "no progress bar"})
    tasks.add_task_argument(p, "finetune-teacher", default="seq2seq")
    p.add_argument("--lora-target-modules", metavar="A,B,...",
                   help="module names to adapt (default: the attention and MLP projections of the architecture)")


def run_text(args: argparse.Namespace) -> int:
    targets = None
    if args.lora_target_modules:
        targets = [t.strip() for t in args.lora_target_modules.split(",") if t.strip()]
    cfg = FinetuneTeacherConfig(**config_kwargs(args, FinetuneTeacherConfig), target_modules=targets)
    require_finite(cfg)  # e.g. --lr inf: one line, exit status 2, like the trainer's checks
    result = finetune_teacher(cfg)
    print(json.dumps({k: v for k, v in result.items() if k != "config"}))
    return 0


def run(args: argparse.Namespace) -> int:
    return tasks.run("finetune-teacher", args)
