"""CPU data-parallel training: 1 process vs 2 torchrun processes, with OMP_NUM_THREADS set for the whole machine
and unset (issue 15, category 7).

    flock -x /tmp/mu-cpu.lock .venv/bin/python benchmarks/cpu_ddp_threads.py [--steps 30] [--repeats 3]

Every run trains the tiny preset for the same steps on the same global batch (2 processes: half the micro-batches
each), so the work is equal; the figure is the trainer's tokens/s (medians over repeats; higher is better), and
the ratios are to the 1-process run of the same invocation. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def isa() -> str:
    flags = ""
    try:
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        pass
    return "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else platform.machine()


def run(cmd: list[str], env: dict) -> tuple[float, str]:
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
    result = json.loads(p.stdout.strip().splitlines()[-1])
    note = next((ln for ln in p.stderr.splitlines() if ln.startswith("cpu threads:")), "")
    return float(result["tokens_per_s"]), note


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with tempfile.TemporaryDirectory(prefix="mu-ddp-threads-") as tmp:
        data = Path(tmp) / "train.jsonl"
        data.write_text("".join(json.dumps({"source": f"question {i}: what is {i} times {i % 7}? " * 4,
                                            "target": str(i * (i % 7))}) + "\n" for i in range(256)))
        train = ["-m", "mu", "train", "--preset", "tiny", "--tokenizer", "byte", "--task", "seq2seq", "--train-data",
                 str(data), "--max-steps", str(args.steps), "--batch-size", "8", "--global-batch-size", "16",
                 "--save-every", "0", "--eval-every", "0", "--num-samples", "0", "--no-progress", "--device", "cpu",
                 "--dropout", "0"]
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        base = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        configs = {
            "1 process, OMP_NUM_THREADS=cores": ([sys.executable, *train], {**base, "OMP_NUM_THREADS": str(cores)}),
            "2 processes, OMP_NUM_THREADS=cores": ([*torchrun, *train], {**base, "OMP_NUM_THREADS": str(cores)}),
            "2 processes, OMP_NUM_THREADS unset": ([*torchrun, *train], base),
        }
        results: dict[str, dict] = {}
        for r in range(args.repeats):
            for name, (cmd, env) in configs.items():
                out = Path(tmp) / f"run_{r}_{len(results)}_{name.replace(' ', '_').replace(',', '')}"
                tps, note = run([*cmd, "--out", str(out)], env)
                results.setdefault(name, {"tokens_per_s": [], "log": note})["tokens_per_s"].append(tps)
                print(f"{name}: {tps:,.0f} tokens/s {note}", file=sys.stderr, flush=True)
    one = statistics.median(results["1 process, OMP_NUM_THREADS=cores"]["tokens_per_s"])
    summary = {name: {"tokens_per_s": round(statistics.median(v["tokens_per_s"]), 1),
                      "vs_1_process": round(statistics.median(v["tokens_per_s"]) / one, 3), "log": v["log"]}
               for name, v in results.items()}
    print(json.dumps({"cores": cores, "isa": isa(), "steps": args.steps, "repeats": args.repeats,
                      "results": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
