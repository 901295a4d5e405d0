"""`mu vqa`: answer questions about an image with a vision-language model directory."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="VLM directory (written by train_vqa / save_pretrained)")
    parser.add_argument("--image", required=True, help="image file (PNG, JPEG, ...)")
    parser.add_argument("--question", required=True, action="append",
                        help="question about the image (repeat for several)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: as stored)")
    parser.add_argument("--time", action="store_true", help="also print each answer's inference time")


def run(args) -> int:
    from mu.utils import pick_device
    from mu.vision.model import load_vlm
    from mu.vision.preprocess import load_image

    from mu.model.io import parse_dtype
    from mu.generation import CLI_NAMES, check_generation_args

    check_generation_args(args.max_new_tokens, num_beams=args.num_beams, names=CLI_NAMES)
    parse_dtype(args.dtype)
    image = load_image(args.image)  # checked before the model loads: a bad path fails fast
    model = load_vlm(args.model, device=pick_device(args.device), dtype=args.dtype)
    for question in args.question:
        answer, seconds = model.timed_answer(image, question, max_new_tokens=args.max_new_tokens,
                                             num_beams=args.num_beams)
        print(f"{answer}\t({seconds:.3f} s)" if args.time else answer, flush=True)
    return 0
