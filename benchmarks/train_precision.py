"""One training step in fp32 vs bf16 autocast, per preset, on this CPU: is `--precision auto`'s bf16 worth it?

    python benchmarks/train_precision.py --threads 2

Random weights and tokens; medians over repeats after warm-up; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import mu
from mu.utils import cpu_isa


def step_ms(model, batch, amp, repeats: int, warmup: int = 2) -> tuple[float, float]:
    """Median wall and process-CPU milliseconds per step (CPU time is robust to other jobs on the machine)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(wall) * 1e3, statistics.median(cpu) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--source-len", type=int, default=256)
    ap.add_argument("--target-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for preset in args.presets.split(","):
        model = mu.build_model(preset, arch="encdec", dropout=0.0)
        src = torch.randint(3, 500, (args.batch_size, args.source_len))
        tgt = torch.randint(3, 500, (args.batch_size, args.target_len))
        batch = {"encoder_input_ids": src, "decoder_input_ids": tgt, "targets": tgt}
        (fp32, fp32_cpu), (bf16, bf16_cpu) = (step_ms(model, batch, amp, args.repeats) for amp in (False, True))
        rows.append({"preset": preset, "fp32_ms": round(fp32, 1), "bf16_ms": round(bf16, 1),
                     "bf16_speedup": round(fp32 / bf16, 2), "fp32_cpu_ms": round(fp32_cpu, 1),
                     "bf16_cpu_ms": round(bf16_cpu, 1), "bf16_cpu_speedup": round(fp32_cpu / bf16_cpu, 2)})
        print(f"{preset:>6}: fp32 {fp32:8.1f} ms/step   bf16 autocast {bf16:8.1f} ms/step   speed-up "
              f"{fp32 / bf16:.2f}x   (process CPU time: {fp32_cpu:.1f} vs {bf16_cpu:.1f} ms, "
              f"{fp32_cpu / bf16_cpu:.2f}x)", flush=True)
    print(json.dumps({"isa": cpu_isa(), "threads": args.threads, "batch_size": args.batch_size,
                      "source_len": args.source_len, "target_len": args.target_len, "rows": rows}))


if __name__ == "__main__":
    main()
