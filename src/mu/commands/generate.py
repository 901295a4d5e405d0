"""`mu generate`: text in, text out, with cached generation."""

from __future__ import annotations

import sys
import time
from typing import Optional

import torch

from mu.data.tasks import fit_prompt
from mu.errors import MuError
from mu.eval.runner import default_max_source_len
from mu.generation import CLI_NAMES, check_generation_args, new_tokens
from mu.model.io import load_model
from mu.model.quantize import check_format
import mu.onnx
from mu.tokenizer import load_tokenizer
from mu.utils import cpu_isa, pick_device


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="model directory or the paper's model.pt (with --backend onnx: "
                                                  "a directory written by `mu export onnx`)")
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                   help="torch (default) or onnx: the exported graphs run by onnxruntime on the CPU")
    p.add_argument("--prompt", help="input text (default: read stdin)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the one saved with the model)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", help="fp32, bf16, fp16, int8, int8wo, int4 or auto (the fastest format this machine "
                                   "supports: int8 on x86 CPUs, bf16 on GPUs with it) (default: as stored)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (float and int8 models): on a GPU replayed as a CUDA graph, "
                        "~5x eager's tokens/s; on a CPU where mu's native step runs, the eager step measured faster "
                        "(AVX-512: int8 ~2x); elsewhere it needs a C++ compiler, ~40 s to compile on 2 cores "
                        "(docs/generation.md)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="on a GPU, replay the eager decode step as a CUDA graph: ~3.8x eager's tokens/s at batch 1, "
                        "no compile to wait for (--compile adds another ~1.4x after its compile)")


def check_prompt_length(tok, prompt: str, model, max_new_tokens: int) -> list[int]:
    """The prompt's ids, cut as `mu eval` cuts sources (to `block_size`; decoder-only: minus the new tokens),
    with a warning that says so."""
    limit = default_max_source_len(model, max_new_tokens)
    ids, n = fit_prompt(tok, prompt, limit)
    if n > limit:
        room = "" if model.config.arch == "encdec" else f" minus {max_new_tokens} new tokens"
        print(f"warning: the prompt has {n} tokens, more than the model's context (block_size "
              f"{model.config.block_size}{room}): truncated to {len(ids)} tokens (the end of the text was cut, "
              f"keeping a final ###marker line)", file=sys.stderr)
    return ids


def load_for_generation(path: str, tokenizer: Optional[str] = None, device: Optional[str] = "auto",
                        dtype: Optional[str] = None, backend: str = "torch"):
    """The model `mu generate` (and the seed script) generates with: torch or an ONNX export, with the
    --tokenizer directory attached if one is given (else the model's own, if it has one)."""
    tok = load_tokenizer(tokenizer) if tokenizer else None
    if backend == "onnx":
        if dtype:
            raise MuError("--dtype applies to --backend torch; an ONNX export is fp32 or int8 "
                          "(mu export onnx --quantize)")
        return mu.onnx.load(path, tokenizer=tok)
    device = pick_device(device)
    model = load_model(path, device=device, dtype=dtype, tokenizer=tok)
    if dtype == "auto":
        picked = model.quantization or str(model.dtype).replace("torch.", "")
        print(f"--dtype auto: {picked} on {device}" + (f" ({cpu_isa()})" if device.type == "cpu" else ""),
              file=sys.stderr)
    return model


def generate_text(model, prompt: str, max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0,
                  top_k: Optional[int] = None, top_p: Optional[float] = None, num_beams: int = 1, seed: int = 0,
                  streamer=None, compile: bool = False, cuda_graph: bool = False) -> tuple[str, int, float]:
    """One prompt through `model.generate` (cut to the context with a warning, seeded): the new text, how many
    tokens it has, and the seconds generation took."""
    tok = model.tokenizer
    ids = torch.tensor([check_prompt_length(tok, prompt, model, max_new_tokens)], device=model.device)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                         top_k=top_k, top_p=top_p, num_beams=num_beams, eos_token_id=tok.eos_token_id,
                         streamer=streamer, compile=compile, cuda_graph=cuda_graph)
    elapsed = time.perf_counter() - t0
    new = new_tokens(model, out, ids)[0]
    return tok.decode(new, skip_special_tokens=True), len(new), elapsed


def run(args) -> int:
    check_generation_args(args.max_new_tokens, args.sample, args.temperature, args.top_k, args.top_p,
                          args.num_beams, streaming=args.stream, names=CLI_NAMES)  # before the model loads
    check_format(args.dtype)
    if pick_device(args.device).type != "cuda" and args.cuda_graph:
        raise MuError(f"--cuda-graph replays the decode step on a GPU: --device {args.device} is not one")
    for flag, on in (("--compile", args.compile), ("--cuda-graph", args.cuda_graph)):
        if on and args.backend == "onnx":
            raise MuError(f"{flag} applies to --backend torch (onnxruntime runs the exported graphs as they are)")
    model = load_for_generation(args.model, args.tokenizer, args.device, args.dtype, args.backend)
    if model.tokenizer is None:
        raise MuError(f"{args.model} has no tokenizer files; pass --tokenizer DIR (e.g. the paper's phi3_tokenizer)")
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt:
        raise MuError("empty prompt: pass --prompt TEXT or text on stdin")
    streamer = None
    if args.stream:
        from transformers import TextStreamer

        streamer = TextStreamer(model.tokenizer, skip_special_tokens=True)
    text, n, elapsed = generate_text(model, prompt, args.max_new_tokens, args.sample, args.temperature, args.top_k,
                                     args.top_p, args.num_beams, args.seed, streamer, args.compile, args.cuda_graph)
    if not args.stream:
        print(text)
    print(f"[{n} tokens in {elapsed:.2f}s]", file=sys.stderr)
    return 0
