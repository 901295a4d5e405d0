"""Answer questions about images with a Mu VLM (the paper's `generate_text+image2text.py`, seed-compatible).

    python -m mu.generate_text+image2text                 # runs/vqa/final on the paper's three prompts
    python -m mu.generate_text+image2text --model DIR
    python -m mu.generate_text+image2text --model DIR --image_file photo.jpg --question "What is this?"

Without --image_file it answers the paper's three example prompts (kids_playing.jpg, dog.jpg,
desert_pic.jpg) from $MU_DATA/examples/ (MU_DATA: a data folder) or the seed repo's artifacts/images/.
Each answer is printed with its inference time (image loading + preprocessing + generation).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from mu.errors import MuError
from mu.generation import check_generation_args
from mu.model.io import parse_dtype
from mu.utils import data_file, pick_device
from mu.vision.model import load_vlm
from mu.vision.preprocess import load_image

DEFAULT_MODEL = "runs/vqa/final"
EXAMPLES = [
    ("kids_playing.jpg", "What sport are they playing?"),
    ("dog.jpg", "What color is the dog?"),
    ("desert_pic.jpg", "Where is this place?"),
]


def example_dirs() -> list[Path]:
    examples = data_file("examples")
    return ([examples] if examples is not None else []) + [Path("artifacts/images")]


def default_prompts() -> list[tuple[Path, str]]:
    for d in example_dirs():
        if all((d / name).is_file() for name, _ in EXAMPLES):
            return [(d / name, q) for name, q in EXAMPLES]
    raise MuError("the paper's example images were not found (looked in "
                  f"{', '.join(str(d) for d in example_dirs())}; set MU_DATA to a data folder holding examples/); pass "
                  "--image_file FILE --question TEXT")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m mu.generate_text+image2text", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL,
                    help=f"VLM directory (written by train_vqa / save_pretrained; default {DEFAULT_MODEL}, where the "
                         "README's `mu train --task vqa ... --out runs/vqa` puts it)")
    ap.add_argument("--image_file", "--image-file", action="append", default=None,
                    help="image to ask about (repeatable; pairs with --question in order)")
    ap.add_argument("--question", action="append", default=None, help="question (repeatable)")
    ap.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=64)
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    ap.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: as stored)")
    return ap.parse_args(argv)


def prompts_from(args: argparse.Namespace) -> list[tuple[Path, str]]:
    images, questions = args.image_file or [], args.question or []
    if not images:
        if questions:
            raise MuError("--question needs --image_file (one image per question)")
        return default_prompts()
    if len(questions) == 1 and len(images) > 1:
        questions = questions * len(images)
    if len(questions) != len(images):
        raise MuError(f"got {len(images)} --image_file and {len(questions)} --question; give one question per "
                      f"image (or one question for all)")
    return [(Path(i), q) for i, q in zip(images, questions)]


def run(args: argparse.Namespace) -> int:
    check_generation_args(args.max_new_tokens, names={"max_new_tokens": "--max_new_tokens"})
    parse_dtype(args.dtype)
    prompts = prompts_from(args)
    for path, _ in prompts:  # fail before the model loads
        load_image(path)
    model = load_vlm(args.model, device=pick_device(args.device), dtype=args.dtype)
    for path, question in prompts:
        image = load_image(path)
        answer, seconds = model.timed_answer(path, question, max_new_tokens=args.max_new_tokens)
        print(f"Image: {path} ({image.size[0]}x{image.size[1]})")
        print(f"Question: {question}")
        print(f"Response: {answer}")
        print(f"Inference time (sec): {seconds:.3f}\n", flush=True)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except MuError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
