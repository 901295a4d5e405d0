"""`mu info`: config and parameter counts of a model directory, a paper checkpoint or a preset."""

from __future__ import annotations

import json
from pathlib import Path

from mu.config import PRESETS
from mu.errors import MuError
from mu.model.io import build_model, load_model


def add_arguments(p) -> None:
    p.add_argument("target", help="a model directory, a paper .pt checkpoint, or a preset name (tiny, small, 330m, 1b)")
    p.add_argument("--arch", default="encdec", choices=["encdec", "deconly"], help="architecture, for a preset")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    import torch

    if args.target in PRESETS and not Path(args.target).exists():
        with torch.device("meta"):
            model = build_model(args.target, arch=args.arch)
        source = f"preset {args.target!r}"
    elif Path(args.target).exists():
        model = load_model(args.target)
        source = args.target
    else:
        raise MuError(f"{args.target!r} is neither a model path nor a preset ({', '.join(PRESETS)})")
    c = model.config
    stacks = {"encoder": model.transformer.e if c.arch == "encdec" else None, "decoder": model.transformer.h}
    info = {
        "source": source,
        "arch": c.arch,
        "parameters": model.num_parameters(),
        "parameters_without_embeddings": model.num_parameters(exclude_embeddings=True),
        "encoder_parameters": sum(p.numel() for p in stacks["encoder"].parameters()) if stacks["encoder"] else 0,
        "decoder_parameters": sum(p.numel() for p in stacks["decoder"].parameters()),
        "dtype": str(model.dtype).replace("torch.", ""),
        "tokenizer": type(model.tokenizer).__name__ if model.tokenizer is not None else None,
        "config": c.to_dict(),
    }
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{source}: {c.arch}, {info['parameters'] / 1e6:.2f}M parameters "
          f"({info['parameters_without_embeddings'] / 1e6:.2f}M without embeddings), {info['dtype']}")
    if c.arch == "encdec":
        print(f"  encoder {c.n_encoder_layer} layers ({info['encoder_parameters'] / 1e6:.2f}M), "
              f"decoder {c.n_decoder_layer} layers ({info['decoder_parameters'] / 1e6:.2f}M)")
    else:
        print(f"  {c.n_decoder_layer} layers ({info['decoder_parameters'] / 1e6:.2f}M)")
    for k, v in c.to_dict().items():
        print(f"  {k} = {v}")
    if info["tokenizer"]:
        print(f"  tokenizer: {info['tokenizer']} ({len(model.tokenizer)} tokens)")
    return 0
