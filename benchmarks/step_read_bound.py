"""The roofline fraction a decode step's order alone allows: its weights read in one piece vs product by product.

    .venv/bin/python benchmarks/step_read_bound.py --preset 330m --format int8 --threads 2

Batch-1 decode reads every weight once per token, but not in one stream: each product (q, k, v, out, cross q,
cross out, fc1, fc2 per decoder block, then the head, as mu's native step runs them) needs the one before it, so
the threads meet at a barrier between products (q, k and v, which read the same input, share one). This compiles
`step_read_bound.c` (needs a C compiler with OpenMP) and reads the step's weight bytes both ways, alternating, with
the same threads taking 64 KiB at a time as they come, and no arithmetic beyond the loads: the ratio "in pieces /
in one piece" is the highest roofline fraction any step with those barriers reaches, before its attention, norms
and activation codes. A host whose read rate changes over time (two memory states on the KVM hosts of
docs/efficiency.md) gets the ratio per quartile of the one-piece rate.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

from mu.config import MuConfig
from mu.utils import cpu_isa

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="330m")
    p.add_argument("--arch", default="encdec", choices=["encdec", "deconly"])
    p.add_argument("--format", default="int8", choices=sorted(BYTES_PER_WEIGHT))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--samples", type=int, default=400)
    args = p.parse_args()
    if args.threads < 1 or args.samples < 4:
        raise SystemExit(f"step_read_bound: --threads {args.threads} --samples {args.samples}: expected >= 1 and >= 4")
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise SystemExit("step_read_bound: no C compiler (cc or gcc) on PATH")
    pieces = step_pieces(MuConfig.from_name(args.preset, arch=args.arch), BYTES_PER_WEIGHT[args.format])
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "step_read_bound"
        source = Path(__file__).with_suffix(".c")
        subprocess.run([compiler, "-O3", "-march=native", "-fopenmp", str(source), "-o", str(exe)], check=True)
        out = subprocess.run([str(exe), str(args.threads), str(args.samples), *map(str, pieces)], check=True,
                             capture_output=True, text=True).stdout
    rows = sorted((float(a), float(b)) for a, b in (line.split() for line in out.splitlines()))
    ratios = [b / a for a, b in rows]
    q = max(1, len(rows) // 4)
    print(f"# {cpu_isa()}, {args.threads} threads; {args.preset} {args.arch} {args.format}, "
          f"{sum(pieces) / 1e6:.1f} MB a step in {len(pieces)} pieces; {len(rows)} samples")
    print(f"one piece {statistics.median(a for a, _ in rows):.1f} GB/s, in pieces "
          f"{statistics.median(b for _, b in rows):.1f} GB/s (medians); in pieces / one piece:")
    print(f"  all samples {statistics.median(ratios):.3f}")
    print(f"  slowest quartile of the one-piece read ({rows[0][0]:.1f}-{rows[q - 1][0]:.1f} GB/s) "
          f"{statistics.median(ratios[:q]):.3f}")
    print(f"  fastest quartile ({rows[-q][0]:.1f}-{rows[-1][0]:.1f} GB/s) {statistics.median(ratios[-q:]):.3f}")


if __name__ == "__main__":
    main()
