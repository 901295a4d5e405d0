"""Seed-compatible entry point: `torchrun --nproc_per_node=N -m mu.train_text2text_by_kd --student_path ...`.

The paper's script (microsoft/encoder-decoder-slm, src/mu/train_text2text_by_kd.py) with its argument names
and defaults, run on mu's trainer and distillation objective (`mu.distill`). It reads the paper's
`{"source", "target"}` jsonl files and works on CPU (gloo) and CUDA (nccl), with or without torchrun.

Mapping to mu (see docs/distillation.md for the differences from the paper's code):

    --student_path        the paper's model.pt or a mu encoder-decoder directory
    --teacher_path        a HF causal LM directory (with or without an adapter), an adapter directory,
                          a mu decoder-only checkpoint, or the paper's teacher.pt (a state dict of the LoRA-
                          wrapped Phi-3.5) together with --teacher_config (a HF config directory)
    --encoder_seq_len     source tokens kept;  --decoder_seq_len  target tokens kept, EOS included
    --global_batch_size   rounded to a multiple of batch_size x processes, as the paper's code did
    --num_epochs          passes over the training data (--max_steps, ours, caps it)
    --warmup_steps, --learning_rate, --weight_decay, --max_grad_norm: AdamW (betas 0.9, 0.98) with linear
                          warmup and cosine decay to 0, as the paper's trainer
    --generate_temperature, --generate_top_k: the student's on-policy sampling of KD targets (the paper
                          sampled every KD target this way); --generate_frequency: sample generations are shown
                          at each validation; --val_loss_frequency: validation (and best checkpoint) every N steps
    --kd_alpha            loss = kd_alpha * KL(teacher || student) + (1 - kd_alpha) * CE(gold)
    --output_path         the run directory: best/ (lowest validation loss), final/, checkpoints/, metrics.jsonl
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from mu.distill.run import DistillConfig, distill
from mu.errors import MuError
from mu.tokenizer import has_tokenizer_files
from mu.train.config import TrainConfig
from mu.utils import data_file

logger = logging.getLogger("mu.train_text2text_by_kd")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Knowledge distillation of a decoder-only teacher into a Mu student "
                                            "(the paper's train_text2text_by_kd, on mu's trainer)")
    # the paper's arguments and defaults
    p.add_argument("--student_path", default="artifacts/models/model.pt")
    p.add_argument("--teacher_path", default="artifacts/models/teacher.pt")
    p.add_argument("--train_data_path", default="artifacts/data/train.jsonl")
    p.add_argument("--val_data_path", default="artifacts/data/val.jsonl")
    p.add_argument("--encoder_seq_len", type=int, default=1024)
    p.add_argument("--decoder_seq_len", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=6)
    p.add_argument("--global_batch_size", type=int, default=128)
    p.add_argument("--num_epochs", type=int, default=128)
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--warmup_steps", type=int, default=4)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--generate_temperature", type=float, default=0.9)
    p.add_argument("--generate_top_k", type=int, default=128)
    p.add_argument("--generate_frequency", type=int, default=32)
    p.add_argument("--val_loss_frequency", type=int, default=32)
    p.add_argument("--kd_alpha", type=float, default=0.9)
    p.add_argument("--output_path", default="outputs")
    # ours
    p.add_argument("--teacher_config", help="HF config directory for a state-dict teacher.pt (e.g. Phi-3.5-mini)")
    p.add_argument("--tokenizer_path", help="tokenizer directory (default: the student's, else the teacher's, "
                                            "else the Phi-3.5 tokenizer in $MU_DATA/phi3_tokenizer)")
    p.add_argument("--on_policy", type=float, default=1.0,
                   help="probability that a batch's KD targets are sampled by the student (the paper: 1)")
    p.add_argument("--max_steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=1337, help="the paper's set_seeds() value")
    p.add_argument("--no_progress", action="store_true")
    return p.parse_args(argv)


def _tokenizer_path(args) -> str | None:
    if args.tokenizer_path:
        return args.tokenizer_path

    for candidate in (args.student_path, args.teacher_path, args.teacher_config):
        if candidate and Path(candidate).is_dir() and has_tokenizer_files(candidate):
            return None  # the student's or teacher's own tokenizer is used
    default = data_file("phi3_tokenizer")
    return str(default) if default is not None else None


def global_batch(batch_size: int, global_batch_size: int, world_size: int) -> int:
    """The paper's rounding: a whole number of accumulation steps (at least 1) of batch_size x world_size."""
    per_step = batch_size * world_size
    accum = max(1, round(global_batch_size / per_step))
    return accum * per_step


def build_config(args):
    for name in ("student_path", "teacher_path", "train_data_path", "val_data_path"):
        if not Path(getattr(args, name)).exists():
            raise MuError(f"--{name} {getattr(args, name)!r}: no such file or directory")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    gbs = global_batch(args.batch_size, args.global_batch_size, world)
    if gbs != args.global_batch_size:
        logger.warning("global_batch_size %d is not a multiple of batch_size %d x %d process(es); using %d",
                       args.global_batch_size, args.batch_size, world, gbs)
    train = TrainConfig(
        out=args.output_path, arch="encdec", tokenizer=_tokenizer_path(args), objective="seq2seq", task="seq2seq",
        train_data=args.train_data_path, val_data=args.val_data_path, val_limit=1_000_000,
        max_source_len=args.encoder_seq_len, max_target_len=max(1, args.decoder_seq_len - 1),
        max_steps=args.max_steps, epochs=args.num_epochs, batch_size=args.batch_size, global_batch_size=gbs,
        lr=args.learning_rate, min_lr_ratio=0.0, weight_decay=args.weight_decay, adam_betas=(0.9, 0.98),
        warmup=args.warmup_steps, schedule="cosine", grad_clip=args.max_grad_norm, seed=args.seed,
        device=args.device, eval_every=args.val_loss_frequency, save_every=args.val_loss_frequency,
        num_samples=1 if args.generate_frequency else 0, log_every=1, progress=not args.no_progress,
        max_new_tokens=args.decoder_seq_len)
    return DistillConfig(train=train, teacher=args.teacher_path, teacher_config=args.teacher_config,
                         student=args.student_path, alpha=args.kd_alpha, on_policy=args.on_policy,
                         sample_temperature=args.generate_temperature, sample_top_k=args.generate_top_k or None,
                         max_sample_tokens=args.decoder_seq_len)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if os.environ.get("RANK", "0") != "0":
        warnings.simplefilter("ignore")
    args = parse_args(argv)
    try:
        result = distill(build_config(args))
    except MuError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":
        logger.info("best checkpoint (lowest validation loss): %s; final model: %s", result.best_dir,
                    result.final_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
