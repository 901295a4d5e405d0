"""ONNX Runtime vs mu's PyTorch generation, fp32 and int8, in one run (random weights).

    # export once (heavy, untimed: shared lock), then time (exclusive lock)
    flock -s /tmp/mu-cpu.lock .venv/bin/python benchmarks/onnx_speed.py --work /tmp/onnx_bench --prepare-only
    flock -x /tmp/mu-cpu.lock .venv/bin/python benchmarks/onnx_speed.py --work /tmp/onnx_bench
    .venv/bin/python benchmarks/onnx_speed.py --quick          # small preset, 128 in / 32 new, everything in one go

Engines (greedy, batch 1, never stopping early, the same weights):
  torch-fp32   `model.generate` (mu's cached loop)
  torch-int8   `model.quantize_("int8")` (fbgemm dynamic int8 linears), same loop
  ort-fp32     `mu export onnx` graphs run by onnxruntime through `mu.onnx` (the same loop, sampler and cache
               bookkeeping; only prefill / decode_step call the graphs)
  ort-int8     the same graphs after `--quantize int8` (onnxruntime dynamic quantisation, per-channel weights)

The exported directories are kept in --work (keyed by preset, arch and seed) and reused, so the timed run
does no exporting. Each repeat runs every engine in turn (interleaved); medians over repeats. TTFT = prompt
in -> first new token; decode tokens/s = (new - 1) / (last token time - first token time). The CPU's
instruction set is printed with the numbers (speeds differ a lot between AVX2, AVX-512 VNNI and AMX).
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

import mu
import mu.onnx
from mu.export.onnx_export import MANIFEST, export_onnx, quantize_export
from generate_speed import mu_engine, timed  # benchmarks/ is on sys.path when this file runs


def cpu_isa() -> dict:
    """The CPU model and the vector / matrix extensions that decide int8 and fp32 GEMM speed."""
    info = {"machine": platform.machine(), "torch_capability": torch.backends.cpu.get_cpu_capability()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        if line.startswith("model name") and "model" not in info:
            info["model"] = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            info["flags"] = sorted(f for f in flags if f in {"avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni",
                                                             "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"})
            break
    return info


def build(preset: str, arch: str, seed: int):
    torch.manual_seed(seed)
    return mu.build_model(preset, arch=arch).eval()


def prepare(work: Path, preset: str, arch: str, seed: int) -> dict[str, Path]:
    """Export fp32 and int8 graphs of the seeded random model into `work` unless they are there already."""
    base = work / f"{preset}-{arch}-seed{seed}"
    dirs = {"fp32": base / "onnx-fp32", "int8": base / "onnx-int8"}
    if not (dirs["fp32"] / MANIFEST).is_file():
        t0 = time.perf_counter()
        export_onnx(build(preset, arch, seed), dirs["fp32"])
        print(f"  exported {dirs['fp32']} in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    if not (dirs["int8"] / MANIFEST).is_file():
        t0 = time.perf_counter()
        quantize_export(dirs["fp32"], dirs["int8"])
        print(f"  quantized {dirs['int8']} in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return dirs


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="runs/onnx_bench", help="where exported graphs are kept and reused")
    p.add_argument("--prepare-only", action="store_true", help="export (and quantize) only, no timing")
    p.add_argument("--quick", action="store_true", help="small preset, 128 input tokens, 32 new")
    p.add_argument("--preset", default=None, help="mu preset (default 330m; small with --quick)")
    p.add_argument("--arch", default="encdec", choices=["encdec", "deconly"])
    p.add_argument("--input-len", type=int, default=None, help="input tokens (default 512; 128 with --quick)")
    p.add_argument("--new-tokens", type=int, default=None, help="new tokens (default 128; 32 with --quick)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch and onnxruntime threads")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    preset = args.preset or ("small" if args.quick else "330m")
    L = args.input_len or (128 if args.quick else 512)
    N = args.new_tokens or (32 if args.quick else 128)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    dirs = prepare(work, preset, args.arch, args.seed)
    if args.prepare_only:
        return 0

    load_start = os.getloadavg()
    isa = cpu_isa()
    cfg = mu.MuConfig.from_name(preset, arch=args.arch)
    input_ids = torch.randint(3, cfg.vocab_size, (1, L), generator=torch.Generator().manual_seed(args.seed))
    model = build(preset, args.arch, args.seed)
    engines: dict[str, Callable] = {
        "torch-fp32": mu_engine(model, input_ids),
        "torch-int8": mu_engine(copy.deepcopy(model).quantize_("int8"), input_ids),
        "ort-fp32": mu_engine(mu.onnx.load(dirs["fp32"], threads=args.threads), input_ids),
        "ort-int8": mu_engine(mu.onnx.load(dirs["int8"], threads=args.threads), input_ids),
    }
    print(f"# {preset} {args.arch}, batch 1, {L} input tokens, {N} new, {args.threads} threads, {args.repeats} "
          f"repeats; ISA {isa}", file=sys.stderr)
    for name, run in engines.items():  # warm-up: thread pools, packed weights, allocator
        timed(lambda s, run=run: run(s, 8), 8)
    runs: dict[str, list[dict]] = {n: [] for n in engines}
    tokens: dict[str, list[int]] = {}
    for r in range(args.repeats):
        for name, run in engines.items():
            res = timed(lambda s, run=run: run(s, N), N)
            tokens[name] = res.pop("out")
            runs[name].append(res)
            print(f"  repeat {r + 1} {name:10s} ttft {res['ttft_s']:.3f}s  decode {res['decode_tok_s']:.1f} tok/s  "
                  f"e2e {res['e2e_s']:.2f}s", file=sys.stderr)
    results = {}
    for name in engines:
        row = {}
        for k in ("ttft_s", "decode_tok_s", "e2e_s", "cpu_ttft_s", "cpu_decode_tok_s", "cpu_e2e_s"):
            vals = [x[k] for x in runs[name]]
            row[k] = statistics.median(vals)
            row[k + "_range"] = [min(vals), max(vals)]
        results[name] = row

    def agree(a: str, b: str) -> float:
        return sum(x == y for x, y in zip(tokens[a], tokens[b])) / N

    checks = {"ort_fp32_tokens_equal_torch_fp32": tokens["ort-fp32"] == tokens["torch-fp32"],
              "token_agreement_ort_int8_vs_fp32": agree("ort-int8", "torch-fp32"),
              "token_agreement_torch_int8_vs_fp32": agree("torch-int8", "torch-fp32")}
    pairs = (("ort-fp32", "torch-fp32"), ("ort-int8", "torch-int8"), ("ort-int8", "ort-fp32"),
             ("torch-int8", "torch-fp32"))
    ratios = {f"{k}_{a}_vs_{b}": results[a][k] / results[b][k] if k == "decode_tok_s" else results[b][k] / results[a][k]
              for k in ("ttft_s", "decode_tok_s") for a, b in pairs}  # > 1: a is faster
    header = f"{'engine':12s} {'TTFT s':>18s} {'decode tok/s':>18s} {'end-to-end s':>20s}"
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        def cell(k, fmt):
            lo, hi = r[k + "_range"]
            return f"{fmt.format(r[k])} ({fmt.format(lo)}-{fmt.format(hi)})"
        print(f"{name:12s} {cell('ttft_s', '{:.2f}'):>18s} {cell('decode_tok_s', '{:.1f}'):>18s} "
              f"{cell('e2e_s', '{:.2f}'):>20s}")
    print(f"medians over {args.repeats} repeats (min-max); speed-ups (> 1: the first is faster):")
    for k, v in ratios.items():
        print(f"  {k:40s} {v:.2f}")
    for k, v in checks.items():
        print(f"  {k}: {v}")
    load_end = os.getloadavg()
    print(f"  ISA: {isa}")
    print(f"  load average (1 min) at start {load_start[0]:.2f}, at end {load_end[0]:.2f} on {os.cpu_count()} CPUs")
    import onnxruntime

    print(json.dumps({"preset": preset, "arch": args.arch, "input_len": L, "new_tokens": N, "batch": 1,
                      "threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
                      "onnxruntime": onnxruntime.__version__, "isa": isa, "loadavg_start": load_start[0],
                      "loadavg_end": load_end[0], "results": results, "ratios": ratios, "checks": checks}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
