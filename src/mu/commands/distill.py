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

from mu.commands import tasks
from mu.commands.args import add_config_arguments, config_kwargs
from mu.commands.train import add_dropout_argument, add_training_groups, config_from_args as train_config
from mu.distill.losses import DIVERGENCES
from mu.distill.run import DistillConfig, distill
from mu.errors import MuError

# mu train's options that a distillation run sets itself: the student is a fresh preset or a model, not --init
STUDENT_FIXED = ("arch", "preset", "init", "weight_init", "tokenizer", "objective", "seq_len", "noise_density",
                 "mean_span", "task")
KD_FIELDS = ("alpha", "divergence", "temperature", "jsd_beta", "scale_by_t2", "on_policy", "sample_temperature",
             "sample_top_k", "max_sample_tokens", "topk")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("teacher")
    g.add_argument("--teacher", required=True, metavar="PATH",
                   help="Hugging Face causal LM directory, PEFT adapter directory (local base), mu decoder-only "
                        "checkpoint, or a .pt state dict (with --teacher-config)")
    add_config_arguments(g, DistillConfig, ["teacher_adapter", "teacher_config", "teacher_dtype"],
                         choices={"teacher_dtype": ["fp32", "bf16"]},
                         metavars={"teacher_adapter": "DIR", "teacher_config": "DIR"})
    g = p.add_argument_group("student")
    s = g.add_mutually_exclusive_group(required=True)
    s.add_argument("--student", metavar="PATH", help="mu encoder-decoder directory or the paper's model.pt")
    s.add_argument("--student-preset", metavar="NAME", help="a fresh student: tiny, small, 330m, 1b")
    g.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: the student's, else the "
                                                     "teacher's); teacher and student must share it")
    add_dropout_argument(g)
    g = p.add_argument_group("distillation")
    add_config_arguments(g, DistillConfig, KD_FIELDS, choices={"divergence": DIVERGENCES},
                         flags={"scale_by_t2": "--no-t2-scaling"}, metavars={"on_policy": "LAMBDA", "topk": "K"},
                         helps={"sample_top_k": "on-policy sampling top-k (0: no top-k filter) (default 128)",
                                "topk": "precompute the teacher's top-K logits on the gold targets once and reuse "
                                        "them (0: off)"})
    groups = add_training_groups(p, exclude=STUDENT_FIXED,
                                 helps={"lr": "peak learning rate (default 3e-4)",
                                        "train_data": "task file, or synthetic:train[:N]"})
    tasks.add_task_argument(groups["data and objective"], "distill", default="seq2seq")


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    if args.dropout is not None and args.student:
        raise MuError("--dropout applies to a fresh --student-preset, not to a loaded --student")
    train = train_config(args, arch="encdec", preset=args.student_preset or "small", tokenizer=args.tokenizer,
                         objective="seq2seq", task=args.task)
    kd = config_kwargs(args, DistillConfig, exclude=("train",))
    kd["sample_top_k"] = kd["sample_top_k"] or None  # 0: no top-k filter
    return DistillConfig(train=train, **kd)


def run_text(args: argparse.Namespace) -> int:
    if os.environ.get("RANK", "0") != "0":
        warnings.simplefilter("ignore")  # rank 0 reports data warnings once

    result = distill(config_from_args(args))
    if os.environ.get("RANK", "0") == "0":
        keys = ("final_dir", "best_dir", "steps", "flops", "train_loss", "val_loss", "best_metric", "stop_reason",
                "tokens_per_s")
        print(json.dumps({k: getattr(result, k) for k in keys}))
    return 0


def run(args: argparse.Namespace) -> int:
    return tasks.run("distill", args)
