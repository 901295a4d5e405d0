"""`mu convert-reference model.pt OUT_DIR`: the paper's checkpoint -> mu's directory format."""

from __future__ import annotations

from mu.model.io import convert_reference
from mu.tokenizer import load_tokenizer


def add_arguments(p) -> None:
    p.add_argument("checkpoint", help="the paper's model.pt ({'model_state_dict', 'model_config'})")
    p.add_argument("out_dir", help="output directory (config.json + model.safetensors [+ tokenizer])")
    p.add_argument("--tokenizer", help="tokenizer directory to save alongside (e.g. the paper's phi3_tokenizer)")
    p.add_argument("--dtype", help="convert weights to fp32, bf16 or fp16 (default: keep)")


def run(args) -> int:
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    out = convert_reference(args.checkpoint, args.out_dir, tokenizer=tokenizer, dtype=args.dtype)
    print(f"wrote {out}")
    return 0
