"""`mu train`: train or fine-tune a model on a task (also under `torchrun --nproc_per_node=N -m mu train ...`).

    mu train --arch encdec --preset small --task squad_v2 --train-data squad_v2_train.jsonl \\
             --val-data squad_v2_dev.jsonl --tokenizer bpe:8192 --max-flops 1e15 --out runs/squad-encdec

Re-running the same command with the same --out resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings

from mu.errors import MuError


def _number(kind):
    """argparse type: accepts 1e15 / 2_000_000 style numbers for int and float options."""

    def parse(text: str):
        try:
            value = float(text.replace("_", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if kind is int:
            if value != int(value):
                raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
            return int(value)
        return value

    parse.__name__ = kind.__name__
    return parse


def add_common_arguments(parser: argparse.ArgumentParser, pretrain: bool) -> None:
    from mu.model.layers import WEIGHT_INITS
    from mu.train.config import PRECISIONS, SCHEDULES, STRATEGIES

    g = parser.add_argument_group("model")
    g.add_argument("--arch", choices=["encdec", "deconly"], default="encdec", help="architecture (default encdec)")
    g.add_argument("--preset", default="small", help="model preset: tiny, small, 330m, 1b (default small)")
    g.add_argument("--init", metavar="DIR", help="start from this model directory instead of a fresh preset")
    g.add_argument("--tokenizer", metavar="SPEC",
                   help="byte, bpe:N (byte-level BPE trained on the training text) or a Hugging Face tokenizer "
                        "directory (e.g. ../shared/data/phi3_tokenizer); default: the --init model's, else byte")
    g.add_argument("--dropout", type=float, help="override the preset's dropout (0.1)")
    g.add_argument("--weight-init", choices=WEIGHT_INITS, default="paper",
                   help="a fresh preset's initialisation: paper (N(0, 0.02), default) or fan_in "
                        "(N(0, 1/sqrt(fan_in)); much faster start for tiny widths)")

    g = parser.add_argument_group("data")
    if pretrain:
        g.add_argument("--objective", choices=["span", "prefix", "causal"],
                       help="span (T5 span corruption) or prefix (prefix LM) for encdec, causal (or prefix) for "
                            "deconly; default span / causal")
        g.add_argument("--train-data", required=True, metavar="PATH",
                       help="plain text: .txt (paragraphs), .jsonl with a 'text' field, or a directory of them")
        g.add_argument("--val-data", metavar="PATH", help="held-out text, same formats")
        g.add_argument("--seq-len", type=_number(int), default=512, help="tokens per training chunk (default 512)")
        g.add_argument("--noise-density", type=float, default=0.15, help="span corruption: masked fraction")
        g.add_argument("--mean-span", type=float, default=3.0, help="span corruption: mean span length")
    else:
        from mu.data.tasks import TASKS

        g.add_argument("--task", choices=sorted(TASKS) + ["vqa"], default="seq2seq",
                       help="task format (default seq2seq; vqa trains a vision-language model, see below)")
        g.add_argument("--objective", choices=["seq2seq", "span", "prefix", "causal"], default="seq2seq",
                       help="seq2seq fine-tuning (default); span/prefix/causal pretrain on text like `mu pretrain`")
        g.add_argument("--train-data", required=True, metavar="PATH",
                       help="task file (.jsonl/.json), saved HF dataset, or synthetic:train[:N]")
        g.add_argument("--val-data", metavar="PATH", help="validation file, same format")
        g.add_argument("--max-source-len", type=_number(int), default=512, help="source tokens kept (default 512)")
        g.add_argument("--max-target-len", type=_number(int), default=128, help="target tokens kept (default 128)")
        g.add_argument("--seq-len", type=_number(int), default=512, help="pretraining objectives: tokens per chunk")
    g.add_argument("--train-limit", type=_number(int), metavar="N", help="use the first N training examples")
    g.add_argument("--val-limit", type=_number(int), default=256, metavar="N",
                   help="validation examples used (default 256)")

    g = parser.add_argument_group("budget (the first reached stops the run; none given: one epoch)")
    g.add_argument("--max-steps", type=_number(int), metavar="N", help="optimizer steps")
    g.add_argument("--max-flops", type=_number(float), metavar="X", help="training FLOPs, e.g. 1e15")
    g.add_argument("--max-tokens", type=_number(int), metavar="N", help="tokens through the model")
    g.add_argument("--epochs", type=float, metavar="E", help="passes over the training data")

    g = parser.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=_number(int), default=8, help="micro-batch per process (default 8)")
    g.add_argument("--global-batch-size", type=_number(int), metavar="N",
                   help="examples per optimizer step over all processes (gradient accumulation fills the rest)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default 3e-4; 1e-3 pretraining)")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr / peak lr (default 0.1)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decoupled weight decay (default 0.1)")
    g.add_argument("--warmup", type=float, default=0.05, help="warmup steps (>= 1) or fraction (< 1) (default 0.05)")
    g.add_argument("--schedule", choices=SCHEDULES, default="cosine", help="lr schedule (default cosine)")
    g.add_argument("--decay-fraction", type=float, default=0.2, help="wsd: fraction of steps decaying (0.2)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm, 0 = off (default 1.0)")
    g.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 autocast where the device has native bf16, else fp32")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--distributed", choices=STRATEGIES, default="auto",
                   help="under torchrun: ddp (default) or fsdp (shard parameters; for the big presets on GPUs)")
    g.add_argument("--seed", type=_number(int), default=0)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")

    g = parser.add_argument_group("output")
    g.add_argument("--out", required=True, metavar="DIR",
                   help="run directory (re-running with the same DIR resumes from its last checkpoint)")
    g.add_argument("--eval-every", type=_number(int), default=200, help="steps between validations (0: at the end)")
    g.add_argument("--save-every", type=_number(int), default=200, help="steps between checkpoints (0: at the end)")
    g.add_argument("--log-every", type=_number(int), default=10, help="steps between metrics.jsonl records")
    g.add_argument("--keep-checkpoints", type=_number(int), default=2, help="checkpoints kept (default 2)")
    g.add_argument("--num-samples", type=_number(int), default=3, help="sample generations shown per validation")
    if not pretrain:
        g.add_argument("--best-metric", default="val_loss",
                       help="val_loss (default) or the task's metric (e.g. f1, rougeL, bleu4) for best/")
        g.add_argument("--max-new-tokens", type=_number(int), help="generation length for samples and metrics")
    g.add_argument("--eval-batch-size", type=_number(int), help="validation batch size (default --batch-size)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--no-resume", action="store_true", help="refuse to continue a run already in --out")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mu.vision.cli import add_train_arguments

    add_common_arguments(parser, pretrain=False)
    add_train_arguments(parser)


def config_from_args(args: argparse.Namespace, pretrain: bool):
    from mu.train.config import TrainConfig

    objective = args.objective or ("span" if args.arch == "encdec" else "causal")
    is_pretrain = objective != "seq2seq"
    overrides = {} if args.dropout is None else {"dropout": args.dropout}
    return TrainConfig(
        out=args.out, arch=args.arch, preset=args.preset, model_overrides=overrides, init=args.init,
        weight_init=args.weight_init,
        tokenizer=args.tokenizer, objective=objective, task=getattr(args, "task", "seq2seq"),
        train_data=args.train_data, val_data=args.val_data, train_limit=args.train_limit, val_limit=args.val_limit,
        max_source_len=getattr(args, "max_source_len", 512), max_target_len=getattr(args, "max_target_len", 128),
        seq_len=args.seq_len, noise_density=getattr(args, "noise_density", 0.15),
        mean_span=getattr(args, "mean_span", 3.0), max_steps=args.max_steps, max_flops=args.max_flops,
        max_tokens=args.max_tokens, epochs=args.epochs, batch_size=args.batch_size,
        global_batch_size=args.global_batch_size,
        lr=args.lr if args.lr is not None else (1e-3 if is_pretrain else 3e-4),
        min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay, warmup=args.warmup, schedule=args.schedule,
        decay_fraction=args.decay_fraction, grad_clip=args.grad_clip, precision=args.precision, compile=args.compile,
        distributed=args.distributed, seed=args.seed, device=args.device, eval_every=args.eval_every,
        save_every=args.save_every, log_every=args.log_every, keep_checkpoints=args.keep_checkpoints,
        num_samples=args.num_samples, best_metric=getattr(args, "best_metric", "val_loss"),
        eval_batch_size=args.eval_batch_size, max_new_tokens=getattr(args, "max_new_tokens", None),
        progress=not args.no_progress, resume=not args.no_resume)


def run_training(args: argparse.Namespace, pretrain: bool) -> int:
    if os.environ.get("RANK", "0") != "0":
        warnings.simplefilter("ignore")  # rank 0 reports data warnings once
    warnings.formatwarning = lambda message, category, *a, **k: f"warning: {message}\n"
    from mu.train import train

    cfg = config_from_args(args, pretrain)
    try:
        result = train(cfg)
    except FileNotFoundError as e:
        raise MuError(f"{e.filename}: no such file") from None
    if os.environ.get("RANK", "0") == "0":
        keys = ("final_dir", "steps", "enc_tokens", "dec_tokens", "flops", "train_loss", "val_loss", "best_metric",
                "stop_reason", "tokens_per_s")
        print(json.dumps({k: getattr(result, k) for k in keys}))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.task == "vqa":
        from mu.vision.cli import run_train

        return run_train(args)
    return run_training(args, pretrain=False)
