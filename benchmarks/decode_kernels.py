"""Decode-step linear kernels at batch 1: every GEMV one 330m decoder token runs, per kernel.

    .venv/bin/python benchmarks/decode_kernels.py --threads 2

The weights of one decode token of the 330m encoder-decoder (10 decoder layers: fused q/k/v 768x1024, out
1024x384, cross q 384x1024, cross out 1024x384, fc1 4096x1024, fc2 1024x4096; lm_head 32128x1024; 139M
weights, random) are multiplied by one input row each, in order, through each kernel: fp32 `F.linear`, fp32
`split_linear`, fbgemm's int8 GEMM as `mu.model.quantize.Int8Linear` runs it (aten's tensor-only
`fbgemm_linear_int8_weight_fp32_activation`) and through `quantized::linear_dynamic` (what it ran before),
`torch._weight_int8pack_mm` (fp32 and
bf16 activations) and `torch._weight_int4pack_mm_for_cpu` (groups of 64, bf16 activations). Medians of 5
passes; "GB/s" = the kernel's weight bytes per token / time, and its fraction of the streaming read: the
ceiling that kernel puts on a decode step's roofline fraction, whatever runs around it. Also prints the
streaming-read bandwidth (sum of a fp32 tensor the size of the fp32 weights) with the same threads, the ISA and
the thread count.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from mu.model.fast import split_linear
from mu.model.quantize import Int4Linear, Int8Linear, Int8WeightOnlyLinear, _DynamicInt8, _per_channel_int8
from mu.utils import cpu_isa

SHAPES = [(768, 1024), (1024, 384), (384, 1024), (1024, 384), (4096, 1024), (1024, 4096)] * 10 + [(32128, 1024)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weights = [torch.randn(n, k) * 0.02 for n, k in SHAPES]
    n_weights = sum(w.numel() for w in weights)
    xs = {k: torch.randn(1, k) for k in (384, 1024, 4096)}

    def bench(name: str, fns, bytes_per_weight: float) -> None:
        for f, (_, k) in zip(fns, SHAPES):
            f(xs[k])
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for f, (_, k) in zip(fns, SHAPES):
                f(xs[k])
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        rate = n_weights * bytes_per_weight / t
        print(f"{name:34s} {t * 1e3:7.1f} ms/token {1 / t:7.1f} tok/s {rate / 1e9:6.1f} GB/s = {rate / bw:4.2f} of the "
              f"streaming read", flush=True)

    a = torch.ones(n_weights)
    a.sum()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        a.sum()
        times.append(time.perf_counter() - t0)
    bw = a.nbytes / statistics.median(times)
    del a
    print(f"ISA {cpu_isa()}, {torch.get_num_threads()} threads; {n_weights / 1e6:.0f}M weights per token; "
          f"streaming read {bw / 1e9:.1f} GB/s")
    with torch.inference_mode():
        bench("fp32 F.linear", [lambda x, w=w: F.linear(x, w) for w in weights], 4)
        bench("fp32 split_linear", [lambda x, w=w: split_linear(x, w, None) for w in weights], 4)
        bench("int8 fbgemm (Int8Linear)", [Int8Linear(w) for w in weights], 1)
        bench("int8 fbgemm, quantized::linear_dynamic",
              [_DynamicInt8(*_per_channel_int8(w), None).raw for w in weights], 1)
        wo = [Int8WeightOnlyLinear(w) for w in weights]
        bench("int8 _weight_int8pack_mm, bf16 act", wo, 1)
        bench("int8 _weight_int8pack_mm, fp32 act",
              [lambda x, m=m: torch._weight_int8pack_mm(x, m.weight_int8, m.scale) for m in wo], 1)
        del wo
        bench("int4 g64 _weight_int4pack_mm, bf16 act", [Int4Linear(w) for w in weights], 0.5 + 4 / 64)


if __name__ == "__main__":
    main()
