"""`mu distill`: distil a decoder-only teacher into an encoder-decoder student (also under torchrun).

    mu distill --teacher runs/phi3-lora --student-preset small --task squad_v2 \\
               --train-data squad_v2_train.jsonl --val-data squad_v2_dev.jsonl --out runs/kd --max-steps 2000

The training options (budget, optimiser, checkpoints, logging) are `mu train`'s, with the same names
and defaults; re-running the same command with the same --out resumes. Under
`torchrun --nproc_per_node=N -m mu distill ...` every process holds a teacher replica.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings

from mu.errors import MuError


def _number(kind):
    def parse(text: str):
        try:
            value = float(text.replace("_", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if kind is int and value != int(value):
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
        return int(value) if kind is int else value

    parse.__name__ = kind.__name__
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from mu.data.tasks import TASKS
    from mu.distill.losses import DIVERGENCES
    from mu.train.config import PRECISIONS, SCHEDULES, STRATEGIES

    g = p.add_argument_group("teacher")
    g.add_argument("--teacher", required=True, metavar="PATH",
                   help="Hugging Face causal LM directory, PEFT adapter directory (local base), mu decoder-only "
                        "checkpoint, or a .pt state dict (with --teacher-config)")
    g.add_argument("--teacher-adapter", metavar="DIR", help="PEFT LoRA adapter merged into the teacher")
    g.add_argument("--teacher-config", metavar="DIR",
                   help="Hugging Face config directory for a .pt teacher (e.g. the paper's teacher.pt)")
    g.add_argument("--teacher-dtype", choices=["fp32", "bf16"],
                   help="default: bf16 where the device runs bf16 natively, else fp32")
    g = p.add_argument_group("student")
    s = g.add_mutually_exclusive_group(required=True)
    s.add_argument("--student", metavar="PATH", help="mu encoder-decoder directory or the paper's model.pt")
    s.add_argument("--student-preset", metavar="NAME", help="a fresh student: tiny, small, 330m, 1b")
    g.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: the student's, else the "
                                                     "teacher's); teacher and student must share it")
    g.add_argument("--dropout", type=float, help="override the student preset's dropout (0.1)")

    g = p.add_argument_group("distillation")
    g.add_argument("--alpha", type=float, default=0.9, help="loss = alpha*KD + (1-alpha)*CE (default 0.9)")
    g.add_argument("--divergence", choices=DIVERGENCES, default="forward_kl", help="KD divergence")
    g.add_argument("--temperature", type=float, default=1.0, help="KD temperature tau (default 1)")
    g.add_argument("--jsd-beta", type=float, default=0.5, help="JSD mixture weight of the teacher (default 0.5)")
    g.add_argument("--no-t2-scaling", action="store_true", help="do not multiply the KD term by tau^2")
    g.add_argument("--on-policy", type=float, default=0.0, metavar="LAMBDA",
                   help="probability that a batch's KD targets are sampled by the student (0: gold targets; "
                        "1: always, as the paper's code)")
    g.add_argument("--sample-temperature", type=float, default=0.9, help="on-policy sampling temperature (0.9)")
    g.add_argument("--sample-top-k", type=_number(int), default=128, help="on-policy sampling top-k (128)")
    g.add_argument("--max-sample-tokens", type=_number(int), help="on-policy target length (default "
                                                                  "max-target-len + 1)")
    g.add_argument("--topk", type=_number(int), default=0, metavar="K",
                   help="precompute the teacher's top-K logits on the gold targets once and reuse them (0: off)")

    g = p.add_argument_group("data")
    g.add_argument("--task", choices=sorted(TASKS), default="seq2seq", help="task format (default seq2seq)")
    g.add_argument("--train-data", required=True, metavar="PATH", help="task file, or synthetic:train[:N]")
    g.add_argument("--val-data", metavar="PATH", help="validation file, same format")
    g.add_argument("--max-source-len", type=_number(int), default=512, help="source tokens kept (default 512)")
    g.add_argument("--max-target-len", type=_number(int), default=128, help="target tokens kept (default 128)")
    g.add_argument("--train-limit", type=_number(int), metavar="N", help="use the first N training examples")
    g.add_argument("--val-limit", type=_number(int), default=256, metavar="N", help="validation examples (256)")

    g = p.add_argument_group("budget (the first reached stops the run; none given: one epoch)")
    g.add_argument("--max-steps", type=_number(int), metavar="N", help="optimizer steps")
    g.add_argument("--max-flops", type=_number(float), metavar="X", help="student training FLOPs")
    g.add_argument("--max-tokens", type=_number(int), metavar="N", help="tokens through the student")
    g.add_argument("--epochs", type=float, metavar="E", help="passes over the training data")

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=_number(int), default=8, help="micro-batch per process (default 8)")
    g.add_argument("--global-batch-size", type=_number(int), metavar="N", help="examples per optimizer step")
    g.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default 3e-4)")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr / peak lr (default 0.1)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decoupled weight decay (default 0.1)")
    g.add_argument("--warmup", type=float, default=0.05, help="warmup steps (>= 1) or fraction (< 1)")
    g.add_argument("--schedule", choices=SCHEDULES, default="cosine", help="lr schedule (default cosine)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm, 0 = off (default 1.0)")
    g.add_argument("--precision", choices=PRECISIONS, default="auto", help="student autocast precision")
    g.add_argument("--distributed", choices=STRATEGIES, default="auto", help="under torchrun: ddp or fsdp")
    g.add_argument("--seed", type=_number(int), default=0)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")

    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, metavar="DIR", help="run directory (same DIR resumes)")
    g.add_argument("--eval-every", type=_number(int), default=200, help="steps between validations (0: at the end)")
    g.add_argument("--save-every", type=_number(int), default=200, help="steps between checkpoints (0: at the end)")
    g.add_argument("--log-every", type=_number(int), default=10, help="steps between metrics.jsonl records")
    g.add_argument("--keep-checkpoints", type=_number(int), default=2, help="checkpoints kept (default 2)")
    g.add_argument("--num-samples", type=_number(int), default=3, help="sample generations shown per validation")
    g.add_argument("--best-metric", default="val_loss", help="val_loss (default) or a task metric, e.g. f1")
    g.add_argument("--max-new-tokens", type=_number(int), help="generation length for samples and metrics")
    g.add_argument("--eval-batch-size", type=_number(int), help="validation batch size (default --batch-size)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--no-resume", action="store_true", help="refuse to continue a run already in --out")


def config_from_args(args: argparse.Namespace):
    from mu.distill.run import DistillConfig
    from mu.train.config import TrainConfig

    train = TrainConfig(
        out=args.out, arch="encdec", preset=args.student_preset or "small",
        model_overrides={} if args.dropout is None else {"dropout": args.dropout}, tokenizer=args.tokenizer,
        objective="seq2seq", task=args.task, train_data=args.train_data, val_data=args.val_data,
        train_limit=args.train_limit, val_limit=args.val_limit, max_source_len=args.max_source_len,
        max_target_len=args.max_target_len, max_steps=args.max_steps, max_flops=args.max_flops,
        max_tokens=args.max_tokens, epochs=args.epochs, batch_size=args.batch_size,
        global_batch_size=args.global_batch_size, lr=args.lr, min_lr_ratio=args.min_lr_ratio,
        weight_decay=args.weight_decay, warmup=args.warmup, schedule=args.schedule, grad_clip=args.grad_clip,
        precision=args.precision, distributed=args.distributed, seed=args.seed, device=args.device,
        eval_every=args.eval_every, save_every=args.save_every, log_every=args.log_every,
        keep_checkpoints=args.keep_checkpoints, num_samples=args.num_samples, best_metric=args.best_metric,
        eval_batch_size=args.eval_batch_size, max_new_tokens=args.max_new_tokens, progress=not args.no_progress,
        resume=not args.no_resume)
    if args.dropout is not None and args.student:
        raise MuError("--dropout applies to a fresh --student-preset, not to a loaded --student")
    return DistillConfig(
        train=train, teacher=args.teacher, teacher_adapter=args.teacher_adapter, teacher_config=args.teacher_config,
        teacher_dtype=args.teacher_dtype, student=args.student, student_preset=args.student_preset, alpha=args.alpha,
        divergence=args.divergence, temperature=args.temperature, jsd_beta=args.jsd_beta,
        scale_by_t2=not args.no_t2_scaling, on_policy=args.on_policy, sample_temperature=args.sample_temperature,
        sample_top_k=args.sample_top_k or None, max_sample_tokens=args.max_sample_tokens, topk=args.topk)


def run(args: argparse.Namespace) -> int:
    if os.environ.get("RANK", "0") != "0":
        warnings.simplefilter("ignore")  # rank 0 reports data warnings once
    from mu.distill.run import distill

    result = distill(config_from_args(args))
    if os.environ.get("RANK", "0") == "0":
        keys = ("final_dir", "best_dir", "steps", "flops", "train_loss", "val_loss", "best_metric", "stop_reason",
                "tokens_per_s")
        print(json.dumps({k: getattr(result, k) for k in keys}))
    return 0
