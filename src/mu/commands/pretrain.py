"""`mu pretrain`: pretrain on plain text (span corruption or prefix LM for encdec, causal LM for deconly).

    mu pretrain --arch encdec --preset small --train-data data/corpus/tinyshakespeare.txt \\
                --tokenizer bpe:8192 --max-flops 1e15 --out runs/pretrain-encdec

Same options, outputs and resuming as `mu train`; fine-tune the result with `mu train --init DIR/final`.
"""

from __future__ import annotations

import argparse

from mu.commands.train import add_common_arguments, run_training


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, pretrain=True)


def run(args: argparse.Namespace) -> int:
    return run_training(args, pretrain=True)
