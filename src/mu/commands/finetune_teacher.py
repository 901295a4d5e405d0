"""`mu finetune-teacher`: LoRA fine-tuning of a causal-LM teacher on a task (the paper's r 16, alpha 32, dropout 0.05).

    mu finetune-teacher --model phi-3.5-mini --task squad_v2 --train-data squad_v2_train.jsonl \\
                        --val-data squad_v2_dev.jsonl --out runs/teacher-lora --max-steps 500 --merge
    mu distill --teacher runs/teacher-lora/adapter ...      # or --teacher runs/teacher-lora/merged
"""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    from mu.data.tasks import TASKS

    p.add_argument("--model", required=True, metavar="DIR",
                   help="Hugging Face causal LM directory or a mu decoder-only checkpoint")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: the model's)")
    p.add_argument("--task", choices=sorted(TASKS), default="seq2seq", help="task format (default seq2seq)")
    p.add_argument("--train-data", required=True, metavar="PATH")
    p.add_argument("--val-data", metavar="PATH")
    p.add_argument("--out", required=True, metavar="DIR", help="writes DIR/adapter (and DIR/merged with --merge)")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha (default 32)")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout (default 0.05)")
    p.add_argument("--lora-target-modules", metavar="A,B,...",
                   help="module names to adapt (default: the attention and MLP projections of the architecture)")
    p.add_argument("--merge", action="store_true", help="also save the merged model to DIR/merged")
    p.add_argument("--max-source-len", type=int, default=512)
    p.add_argument("--max-target-len", type=int, default=128)
    p.add_argument("--train-limit", type=int, metavar="N")
    p.add_argument("--val-limit", type=int, default=256, metavar="N")
    p.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps (default: --epochs passes)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=float, default=0.05, help="warmup steps (>= 1) or fraction (< 1)")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=0, help="steps between validation losses (0: at the end)")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from mu.distill.lora import FinetuneTeacherConfig, finetune_teacher

    targets = None
    if args.lora_target_modules:
        targets = [t.strip() for t in args.lora_target_modules.split(",") if t.strip()]
    cfg = FinetuneTeacherConfig(
        model=args.model, out=args.out, train_data=args.train_data, task=args.task, val_data=args.val_data,
        tokenizer=args.tokenizer, lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=targets, merge=args.merge, max_source_len=args.max_source_len,
        max_target_len=args.max_target_len, train_limit=args.train_limit, val_limit=args.val_limit,
        max_steps=args.max_steps, epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
        lr=args.lr, weight_decay=args.weight_decay, warmup=args.warmup, grad_clip=args.grad_clip, seed=args.seed,
        device=args.device, precision=args.precision, log_every=args.log_every, eval_every=args.eval_every,
        progress=not args.no_progress)
    result = finetune_teacher(cfg)
    print(json.dumps({k: v for k, v in result.items() if k != "config"}))
    return 0
