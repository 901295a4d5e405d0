"""The roofline fraction a decode step's order alone allows: its weights read in one piece vs product by product.

    .venv/bin/python benchmarks/step_read_bound.py --preset 330m --format int8 --threads 2

Batch-1 decode reads every weight once per token, but not in one stream: each product (q, k, v, out, cross q,
cross out, fc1, fc2 per decoder block, then the head, as mu's native step runs them) needs the one before it, so
the threads meet at a barrier between products (q, k and v, which read the same input, share one). This compiles
`step_read_bound.c` (needs a C compiler with OpenMP), loads it beside torch (its reads run in torch's OpenMP
threads, as mu's native step does) and reads the step's weight bytes, on huge pages, both ways in turn, the
threads sharing 16 KiB blocks out as the step shares its rows, with no arithmetic beyond the loads; beside each
sample it measures the streaming read the benchmarks divide by (`mu.bench.measure.read_bandwidth`). "in pieces /
read" is the highest roofline fraction any step with those barriers reaches, before its attention, norms and
activation codes.
Unless --no-step, each sample also times mu's own decode step on a model of that size and format (random weights,
on huge pages as `generate` puts them, `--input-length` tokens prefilled, blocks of 8 greedy steps from the same
cache state): its roofline fraction beside the ceiling, in the same moments. A host whose read rate changes over
time (two memory states on the KVM hosts of docs/efficiency.md) gets every ratio per quartile of that read.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from mu.bench.measure import random_input_ids, read_bandwidth, stream_tensor
from mu.bench.models import ModelSpec, build_runner
from mu.config import MuConfig
from mu.model.fast import huge_pages_
from mu.utils import cpu_isa, huge_page_bytes

BYTES_PER_WEIGHT = {"fp32": 4, "bf16": 2, "int8": 1}


def step_pieces(c: MuConfig, weight_bytes: int) -> list[int]:
    """Bytes of weights between two barriers of one decode step, in the native step's order (q, k and v together:
    they read the same input)."""
    hd = c.qkv_embd // c.n_head
    d, qd, kvd, f = c.n_embd, c.qkv_embd, c.n_kv_head * hd, c.hidden_dim
    block = [(qd + 2 * kvd) * d, d * qd]
    if c.arch == "encdec":
        block += [qd * d, d * qd]
    block += [f * d, d * f]
    return [n * weight_bytes for _ in range(c.n_decoder_layer) for n in block] + [c.vocab_size * d * weight_bytes]


def step_timer(args, block: int = 8):
    """A function timing `block` greedy decode steps of a model of `args`' size and format, from the same cache state
    each time: seconds a step; and the weight bytes a step reads."""
    cpu = torch.device("cpu")
    runner = build_runner(ModelSpec(args.arch, args.preset), args.format, cpu)
    huge_pages_(runner.model)
    ids = random_input_ids(1, args.input_length, runner.vocab_size, 0, cpu)
    with torch.no_grad():
        cache, token = runner.prefill(ids, block + 1)
    start = cache.length, cache.positions.clone(), cache.valid.clone(), cache.all_valid

    def run() -> float:
        cache.length, cache.all_valid = start[0], start[3]
        cache.positions.copy_(start[1])
        cache.valid.copy_(start[2])
        with torch.no_grad():
            t0 = time.perf_counter()
            runner.steps(cache, token, block)
            return (time.perf_counter() - t0) / block

    run()
    return run, runner.decode_weight_bytes()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="330m")
    p.add_argument("--arch", default="encdec", choices=["encdec", "deconly"])
    p.add_argument("--format", default="int8", choices=sorted(BYTES_PER_WEIGHT))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--input-length", type=int, default=512, help="tokens prefilled before the timed steps")
    p.add_argument("--no-step", action="store_true", help="only the reads, not mu's decode step")
    args = p.parse_args()
    if args.threads < 1 or args.samples < 4:
        raise SystemExit(f"step_read_bound: --threads {args.threads} --samples {args.samples}: expected >= 1 and >= 4")
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise SystemExit("step_read_bound: no C compiler (cc or gcc) on PATH")
    torch.set_num_threads(args.threads)
    pieces = [(n + 255) // 256 * 256 for n in step_pieces(MuConfig.from_name(args.preset, arch=args.arch),
                                                          BYTES_PER_WEIGHT[args.format])]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "step_read_bound.so"
        source = Path(__file__).with_suffix(".c")
        subprocess.run([compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(source), "-o", str(path)],
                       check=True)
        lib = ctypes.CDLL(str(path))
    lib.step_read.restype = ctypes.c_double
    lib.step_read.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64), ctypes.c_int, ctypes.c_int,
                              ctypes.c_int]
    total = sum(pieces)
    weights = huge_page_bytes(total)  # (where a model's weights lie once `generate` has moved them)
    weights = (torch.empty(total, dtype=torch.uint8) if weights is None else weights).fill_(1)
    buf = weights.data_ptr()
    sizes = (ctypes.c_int64 * len(pieces))(*pieces)
    stream = stream_tensor(256 << 20)
    step, step_bytes = (None, 0) if args.no_step else step_timer(args)
    rows = []  # (the benchmarks' read, one piece, in pieces: bytes/s; the step's weight bytes / its time)
    for _ in range(args.samples):
        read = read_bandwidth(stream, repeats=3)
        one, split = (lib.step_read(buf, sizes, len(pieces), args.threads, k) for k in (0, 1))
        if one < 0 or split < 0:
            raise SystemExit(f"step_read_bound: out of memory for {args.threads} threads' turns")
        rows.append((read, total / one, total / split, step_bytes / step() if step else math.nan))
    rows.sort()
    q = max(1, len(rows) // 4)
    print(f"# {cpu_isa()}, {args.threads} threads; {args.preset} {args.arch} {args.format}, {total / 1e6:.1f} MB a "
          f"step in {len(pieces)} pieces; {len(rows)} samples")
    print("medians of: GB/s read (the benchmarks'), in one piece, in pieces; in pieces / one piece, in pieces / read"
          + ("" if args.no_step else f"; mu's step ({step_bytes / 1e6:.1f} MB): GB/s, / read (its roofline "
             "fraction), / in pieces"))
    for name, part in (("all samples", rows), ("slowest quartile of the read", rows[:q]),
                       ("fastest quartile of the read", rows[-q:])):
        med = [statistics.median(r[i] for r in part) / 1e9 for i in range(3)]
        line = (f"  {name:30s} {med[0]:5.1f} {med[1]:5.1f} {med[2]:5.1f}   "
                f"{statistics.median(r[2] / r[1] for r in part):.3f} "
                f"{statistics.median(r[2] / r[0] for r in part):.3f}")
        if step:
            line += (f"   {statistics.median(r[3] for r in part) / 1e9:5.1f} "
                     f"{statistics.median(r[3] / r[0] for r in part):.3f} "
                     f"{statistics.median(r[3] / r[2] for r in part):.3f}")
        print(line)


if __name__ == "__main__":
    main()
