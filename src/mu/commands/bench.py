"""`mu bench`: encoder-decoder vs decoder-only inference efficiency, written to DIR/bench.{json,md} + PNGs.

The last line printed to stdout is one JSON object: the summary (ratios at the summary length).
Progress lines with an ETA go to stderr.
"""

from __future__ import annotations

import argparse
import json

from mu.errors import MuError

QUICK = dict(input_lengths="128,512", new_tokens=16, batch_sizes="1,4", repeats=1, warmup=1)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="330m", help="model size for random weights (default 330m)")
    p.add_argument("--arch", default="encdec,deconly", help="comma-separated: encdec, deconly (default both)")
    p.add_argument("--model", action="append", default=[], metavar="DIR",
                   help="a trained model (mu directory or paper .pt) instead of random weights; "
                        "repeat or comma-separate for one encdec and one deconly")
    p.add_argument("--input-lengths", default=None, help="comma-separated prompt lengths (default 128,512,1024,2048)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per sequence (default 64)")
    p.add_argument("--batch-sizes", default=None,
                   help="comma-separated decode batch sizes, run at the summary length (default 1,16)")
    p.add_argument("--summary-length", type=int, default=None,
                   help="input length of the batch sweep and the summary (default 1024 if listed, else the longest)")
    p.add_argument("--dtype", default="fp32",
                   help="comma-separated: fp32, bf16, fp16, int8, int8wo, int4, or auto (the fastest format this "
                        "machine supports: int8 on x86 CPUs, bf16 on GPUs with it) (default fp32)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds, medians over them (default 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up rounds (default 1)")
    p.add_argument("--compare-hf", action="store_true",
                   help="add Hugging Face T5ForConditionalGeneration and LlamaForCausalLM of the same sizes")
    p.add_argument("--prefill-batch", choices=["auto", "replicate", "full"], default="auto",
                   help="batch>1 decode after one batch-1 prefill copied to B rows (replicate), or a real batch-B "
                        "prefill (full); auto = replicate on CPU, full elsewhere")
    p.add_argument("--compile", action="store_true",
                   help="mu models decode as `mu generate --compile` does: a torch.compile'd step, on a GPU replayed "
                        "as a CUDA graph (float and int8; Hugging Face models and the memory runs stay eager)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-configuration memory subprocesses")
    p.add_argument("--memory-jobs", type=int, default=2,
                   help="memory subprocesses at once, each with cores/jobs threads unless --threads (default 2)")
    p.add_argument("--no-flop-check", action="store_true", help="skip the FlopCounterMode cross-check")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="a short run (lengths 128,512; 16 new tokens; batch 1,4; 1 repeat); explicit flags win")
    p.add_argument("--out", default="bench_out", help="output directory (default bench_out)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def _ints(flag: str, text: str) -> tuple[int, ...]:
    values = []
    for part in str(text).split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise MuError(f"{flag}: {part!r} is not a positive integer (expected e.g. {flag} 128,512)")
        values.append(int(part))
    return tuple(values)


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def config_from_args(args: argparse.Namespace):
    from mu.bench import BenchConfig

    quick = QUICK if args.quick else {}

    def pick(name: str, default):
        value = getattr(args, name)
        return value if value is not None else quick.get(name, default)

    for flag, value in (("--new-tokens", args.new_tokens), ("--repeats", args.repeats), ("--warmup", args.warmup),
                        ("--memory-jobs", args.memory_jobs), ("--threads", args.threads)):
        if value is not None and value < (0 if flag == "--warmup" else 1):
            raise MuError(f"{flag}: expected a {'non-negative' if flag == '--warmup' else 'positive'} integer, "
                          f"got {value}")
    models = tuple(m for arg in args.model for m in _names(arg))
    return BenchConfig(
        preset=args.preset, archs=_names(args.arch), model_dirs=models,
        input_lengths=_ints("--input-lengths", pick("input_lengths", "128,512,1024,2048")),
        new_tokens=pick("new_tokens", 64), batch_sizes=_ints("--batch-sizes", pick("batch_sizes", "1,16")),
        summary_length=args.summary_length, dtypes=_names(args.dtype), device=args.device,
        repeats=pick("repeats", 3), warmup=pick("warmup", 1), compare_hf=args.compare_hf,
        prefill_batch=args.prefill_batch, compile=args.compile, memory=not args.no_memory, memory_jobs=args.memory_jobs,
        flop_check=not args.no_flop_check, threads=args.threads, seed=args.seed, out=args.out,
        plots=not args.no_plots, progress=not args.quiet)


def run(args: argparse.Namespace) -> int:
    from mu.bench import run_benchmark

    result = run_benchmark(config_from_args(args))
    if not args.quiet:
        print(f"wrote {args.out}/bench.json, bench.md and plots", flush=True)
    print(json.dumps(result["summary"], default=str))
    return 0
