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

from mu.commands import tasks
from mu.commands.args import add_config_arguments, add_config_groups, config_kwargs
from mu.config import ARCHS, MuConfig
from mu.errors import MuError
from mu.model.layers import WEIGHT_INITS
from mu.train import train
from mu.train.config import PRECISIONS, SCHEDULES, STRATEGIES, TrainConfig

HIDDEN = ("model_overrides", "adam_betas", "adam_eps", "group_by_length")  # settable from Python, not flags
TASK_ONLY = ("task", "max_source_len", "max_target_len", "best_metric", "max_new_tokens")
OBJECTIVES = ("seq2seq", "span", "prefix", "causal")
OPTIONS = dict(  # how TrainConfig's fields read as flags, for every verb that trains (train, pretrain, distill)
    defaults={"preset": "small", "lr": None},
    helps={"lr": "peak learning rate (default 3e-4; 1e-3 pretraining)",
           "train_data": "task file (.jsonl/.json), saved HF dataset, or synthetic:train[:N]",
           "out": "run directory (re-running with the same DIR resumes from its last checkpoint)"},
    choices={"arch": ARCHS, "weight_init": WEIGHT_INITS, "schedule": SCHEDULES, "precision": PRECISIONS,
             "distributed": STRATEGIES, "objective": OBJECTIVES},
    metavars={"init": "DIR", "tokenizer": "SPEC", "train_data": "PATH", "val_data": "PATH", "out": "DIR",
              "train_limit": "N", "val_limit": "N", "max_steps": "N", "max_flops": "X", "max_tokens": "N",
              "epochs": "E", "global_batch_size": "N"},
    required=("train_data", "out"),
)
TITLES = {"": "output", "model": "model", "data and objective": "data"}


def add_training_groups(parser: argparse.ArgumentParser, exclude=(), **changes) -> dict:
    """TrainConfig's fields (minus `exclude`) as argument groups; `changes` update OPTIONS' dicts."""
    options = {k: {**v, **changes.get(k, {})} if isinstance(v, dict) else (*v, *changes.get(k, ()))
               for k, v in OPTIONS.items()}
    groups = add_config_groups(parser, TrainConfig, exclude=(*HIDDEN, *exclude), titles=TITLES, **options)
    if "model" in groups:
        add_dropout_argument(groups["model"])
    return groups


def add_dropout_argument(group) -> None:
    """--dropout: MuConfig's field, overriding a fresh preset's value (TrainConfig.model_overrides)."""
    add_config_arguments(group, MuConfig, ["dropout"], defaults={"dropout": None},
                         helps={"dropout": "override the preset's dropout (0.1)"})


def add_common_arguments(parser: argparse.ArgumentParser, pretrain: bool) -> None:
    if pretrain:
        add_training_groups(parser, exclude=TASK_ONLY, defaults={"objective": None},
                            helps={"objective": "span (T5 span corruption) or prefix (prefix LM) for encdec, causal "
                                                "(or prefix) for deconly; default span / causal",
                                   "train_data": "plain text: .txt (paragraphs), .jsonl with a 'text' field, or a "
                                                 "directory of them"},
                            choices={"objective": OBJECTIVES[1:]})
        return
    groups = add_training_groups(parser, exclude=("task",))
    tasks.add_task_argument(groups["data and objective"], "train", default="seq2seq")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, pretrain=False)
    tasks.add_arguments(parser, "train")


def config_from_args(args: argparse.Namespace, pretrain: bool = False, **fixed) -> TrainConfig:
    """The TrainConfig the flags describe; `fixed` sets fields a verb decides itself (e.g. distill's arch)."""
    kw = {**config_kwargs(args, TrainConfig, exclude=HIDDEN), **fixed}
    kw["objective"] = kw.get("objective") or ("span" if kw.get("arch", "encdec") == "encdec" else "causal")
    if kw.get("lr") is None:
        kw["lr"] = 3e-4 if kw["objective"] == "seq2seq" else 1e-3
    overrides = {} if args.dropout is None else {"dropout": args.dropout}
    return TrainConfig(model_overrides=overrides, **kw)


def run_training(args: argparse.Namespace, pretrain: bool) -> int:
    if os.environ.get("RANK", "0") != "0":
        warnings.simplefilter("ignore")  # rank 0 reports data warnings once
    warnings.formatwarning = lambda message, category, *a, **k: f"warning: {message}\n"

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


def run_text(args: argparse.Namespace) -> int:
    return run_training(args, pretrain=False)


def run(args: argparse.Namespace) -> int:
    return tasks.run("train", args)
