"""The `mu` command: one table of verbs, each a thin function over the library.

Every verb lives in `mu/commands/<name>.py` with `add_arguments(parser)` and `run(args)`;
its module is imported only when the verb is used, so `mu --help` stays fast.
User mistakes raise `MuError`: printed as one line, exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from mu.errors import MuError

# verb -> (module under mu.commands, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "generate": ("generate", "generate text from a prompt with a model (cached, greedy/sampling/beam)"),
    "info": ("info", "show a model's config, parameter counts and files, or a preset's"),
    "convert-reference": ("convert_reference", "convert the paper's model.pt checkpoint to mu's directory format"),
    "train": ("train", "train or fine-tune a model on a task (also under torchrun)"),
    "pretrain": ("pretrain", "pretrain on plain text (span corruption / prefix-LM / causal LM)"),
    "eval": ("eval", "evaluate a model on a task with cached batched generation"),
    "score": ("score", "score a predictions file against a task's references (no model)"),
    "finetune-teacher": ("finetune_teacher", "LoRA fine-tuning of a Hugging Face causal LM teacher"),
    "distill": ("distill", "distil a decoder-only teacher into an encoder-decoder student"),
    "bench": ("bench", "inference efficiency benchmark: encoder-decoder vs decoder-only"),
    "vqa": ("vqa", "answer a question about an image with a vision-language model"),
    "demo": ("demo", "the paper's comparison at small scale, end to end, with no downloads"),
    "export": ("export", "export a model to ONNX (onnxruntime, int8) or a Hugging Face transformers directory"),
    "serve": ("serve", "HTTP server with continuous batching: OpenAI-compatible API and a web page"),
}


def _load(verb: str):
    module, _ = VERBS[verb]
    try:
        return importlib.import_module(f"mu.commands.{module}")
    except ModuleNotFoundError as e:
        if e.name == f"mu.commands.{module}":
            raise MuError(f"`mu {verb}` is not available in this build") from None
        raise


def build_parser(verb: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mu", description="Small encoder-decoder language models.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, (_, help_text) in VERBS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == verb:
            _load(name).add_arguments(p)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = next((a for a in argv if not a.startswith("-")), None)
    try:
        parser = build_parser(verb if verb in VERBS else None)
        args = parser.parse_args(argv)
        if args.verb is None:
            parser.print_help()
            return 0
        result = _load(args.verb).run(args)
        return int(result or 0)
    except MuError as e:
        print(f"mu {verb or ''}: error: {e}".replace("  ", " "), file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # training's TrainingInterrupted says what was saved and carries 128 + signal
        print(f"mu {verb or ''}: {e or 'interrupted'}".replace("  ", " "), file=sys.stderr)
        return getattr(e, "exit_code", 130)


if __name__ == "__main__":
    sys.exit(main())
