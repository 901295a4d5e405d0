"""`mu export`: deployment formats of a trained model.

    mu export onnx --model DIR --out DIR [--quantize int8] [--opset N]   # onnxruntime graphs (mu.onnx runs them)
    mu export hf --model DIR --out DIR [--eval FILE]                    # a transformers trust_remote_code directory
"""

from __future__ import annotations

import json
from pathlib import Path

from mu.errors import MuError
from mu.export.onnx_export import MANIFEST, export_onnx
from mu.hf.export import MARKER, export_hf


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    o = sub.add_parser("onnx", help="ONNX graphs with explicit KV caches, run by onnxruntime (`mu generate "
                                    "--backend onnx`, `mu.onnx.load`)")
    o.add_argument("--model", required=True, help="model directory (text model or VLM) or the paper's model.pt")
    o.add_argument("--out", required=True, help="output directory (replaced atomically if it holds an export)")
    o.add_argument("--quantize", choices=["int8"], help="int8 weights by onnxruntime's dynamic quantisation")
    o.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18, the exporter's lowest)")
    h = sub.add_parser("hf", help="a Hugging Face transformers directory that loads with trust_remote_code=True "
                                  "(no mu needed), with a model card")
    h.add_argument("--model", required=True, help="model directory written by mu (encoder-decoder or decoder-only)")
    h.add_argument("--out", required=True, help="output directory (replaced atomically if it holds an export)")
    h.add_argument("--eval", action="append", default=[], metavar="FILE",
                   help="a `mu eval --out` result to state in the model card (repeatable)")


def check_out(model: str, out: str, marker: str) -> None:
    """Refuse to overwrite the model itself or a directory that is not an earlier export (holding `marker`)."""
    src, dst = Path(model), Path(out)
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise MuError(f"--out {out} is the model directory itself; choose another output directory")
    if dst.exists() and (not dst.is_dir() or (any(dst.iterdir()) and not (dst / marker).is_file())):
        raise MuError(f"--out {out} exists and is not an earlier export (no {marker}); choose another output "
                      "directory or remove it")


def run(args) -> int:
    if args.format == "onnx":
        check_out(args.model, args.out, MANIFEST)
        out = export_onnx(args.model, args.out, quantize=args.quantize, opset=args.opset)
        for f in sorted(out.iterdir()):
            if f.suffix in (".onnx", ".data"):
                print(f"{f}  {f.stat().st_size / 1e6:.1f} MB")
        print(f"run it with: mu generate --backend onnx --model {out} --prompt ...")
        return 0

    check_out(args.model, args.out, MARKER)
    out = export_hf(args.model, args.out, eval_results=args.eval)
    auto = json.loads((out / "config.json").read_text())["auto_map"]
    model_class = next(k for k in auto if k != "AutoConfig")
    print(f"wrote {out}: {model_class}.from_pretrained({str(out)!r}, trust_remote_code=True) loads it "
          f"(no mu needed); model card in {out / 'README.md'}")
    return 0
