"""`mu generate`: text in, text out, with cached generation."""

from __future__ import annotations

import sys
import time

from mu.errors import MuError


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


def check_prompt_length(tok, prompt: str, model, max_new_tokens: int) -> list[int]:
    """The prompt's ids, cut as `mu eval` cuts sources (to `block_size`; decoder-only: minus the new tokens),
    with a warning that says so."""
    from mu.data.tasks import fit_prompt
    from mu.eval.runner import default_max_source_len

    limit = default_max_source_len(model, max_new_tokens)
    ids, n = fit_prompt(tok, prompt, limit)
    if n > limit:
        room = "" if model.config.arch == "encdec" else f" minus {max_new_tokens} new tokens"
        print(f"warning: the prompt has {n} tokens, more than the model's context (block_size "
              f"{model.config.block_size}{room}): truncated to {len(ids)} tokens (the end of the text was cut, "
              f"keeping a final ###marker line)", file=sys.stderr)
    return ids


def run(args) -> int:
    import torch

    from mu.checkpoint import load_model
    from mu.model.quantize import check_format
    from mu.generation import CLI_NAMES, check_generation_args
    from mu.tokenizer import load_tokenizer
    from mu.utils import pick_device

    check_generation_args(args.max_new_tokens, args.sample, args.temperature, args.top_k, args.top_p,
                          args.num_beams, streaming=args.stream, names=CLI_NAMES)  # before the model loads
    check_format(args.dtype)
    device = pick_device(args.device)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    if args.backend == "onnx":
        import mu.onnx

        if args.dtype:
            raise MuError("--dtype applies to --backend torch; an ONNX export is fp32 or int8 "
                          "(mu export onnx --quantize)")
        model = mu.onnx.load(args.model, tokenizer=tokenizer)
        device = model.device
    else:
        model = load_model(args.model, device=device, dtype=args.dtype, tokenizer=tokenizer)
        if args.dtype == "auto":
            from mu.utils import cpu_isa

            picked = model.quantization or str(model.dtype).replace("torch.", "")
            print(f"--dtype auto: {picked} on {device}" + (f" ({cpu_isa()})" if device.type == "cpu" else ""),
                  file=sys.stderr)
    if model.tokenizer is None:
        raise MuError(f"{args.model} has no tokenizer files; pass --tokenizer DIR (e.g. ../shared/data/phi3_tokenizer)")
    tok = model.tokenizer
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt:
        raise MuError("empty prompt: pass --prompt TEXT or text on stdin")
    ids = torch.tensor([check_prompt_length(tok, prompt, model, args.max_new_tokens)], device=device)
    streamer = None
    if args.stream:
        from transformers import TextStreamer

        streamer = TextStreamer(tok, skip_special_tokens=True)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         num_beams=args.num_beams, eos_token_id=tok.eos_token_id, streamer=streamer)
    elapsed = time.perf_counter() - t0
    new = out[0, 1:] if model.config.arch == "encdec" else out[0, ids.shape[1]:]
    if not args.stream:
        print(tok.decode(new, skip_special_tokens=True))
    print(f"[{len(new)} tokens in {elapsed:.2f}s]", file=sys.stderr)
    return 0
