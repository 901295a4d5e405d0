"""The --task registry: every task a verb accepts, and the function that runs it.

Text tasks (`mu.data.tasks.TASKS`: squad_v2, xsum, code2text, seq2seq) run through each verb's text
path; `vqa` runs through `mu.vision.cli`. A verb asks `choices(verb)` for its --task list, `add_arguments`
for the options a kind of task adds (VQA's vision tower flags on `mu train`), and `run(verb, args)` to
call the right function. A task kind that has no function for a verb is not offered by it.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass, field
from typing import Callable

from mu.data.tasks import TASKS as TEXT_TASKS


@dataclass(frozen=True)
class TaskKind:
    names: tuple[str, ...]
    run: dict[str, str]  # verb -> "module:function(args) -> exit status"
    arguments: dict[str, str] = field(default_factory=dict)  # verb -> "module:function(parser)" adding options
    notes: dict[str, str] = field(default_factory=dict)  # verb -> a note for its --task help


KINDS = (
    TaskKind(tuple(sorted(TEXT_TASKS)), {"train": "mu.commands.train:run_text", "eval": "mu.commands.eval:run_text",
                                         "score": "mu.commands.score:run_text",
                                         "distill": "mu.commands.distill:run_text",
                                         "finetune-teacher": "mu.commands.finetune_teacher:run_text"}),
    TaskKind(("vqa",), {"train": "mu.vision.cli:run_train", "eval": "mu.vision.cli:run_eval",
                        "score": "mu.vision.cli:run_score"},
             arguments={"train": "mu.vision.cli:add_train_arguments"},
             notes={"train": "vqa trains a vision-language model, see the vision options",
                    "eval": "vqa: a vision-language model directory on a VQA jsonl file"}),
)


def _resolve(target: str) -> Callable:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def choices(verb: str) -> list[str]:
    return [name for kind in KINDS if verb in kind.run for name in kind.names]


def add_task_argument(group, verb: str, **kwargs) -> None:
    """`--task` with the verb's choices; the help lists the kinds' notes."""
    notes = [k.notes[verb] for k in KINDS if verb in k.notes]
    if kwargs.get("default"):
        notes.insert(0, f"default {kwargs['default']}")
    help_text = kwargs.pop("help", "task format")
    help_text = f"{help_text} ({'; '.join(notes)})" if notes else help_text
    group.add_argument("--task", choices=choices(verb), help=help_text, **kwargs)


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    """The options each task kind adds to `verb`."""
    for kind in KINDS:
        if verb in kind.arguments:
            _resolve(kind.arguments[verb])(parser)


def run(verb: str, args: argparse.Namespace) -> int:
    kind = next(k for k in KINDS if args.task in k.names and verb in k.run)  # argparse checked the choice
    return _resolve(kind.run[verb])(args)
