"""Where a served batch's time goes, in process (no HTTP): the prefill of 1 and 16 prompts and the decode
step of 1 and 16 rows through the server's own backend (`mu.serve.engine.TorchBackend`: slot cache, packed
weights), each timed (median of repeats) and split by operator kind with torch.profiler.

    flock -x /tmp/mu-cpu.lock .venv/bin/python benchmarks/serve_breakdown.py          # small, encdec, fp32
    .venv/bin/python benchmarks/serve_breakdown.py --preset tiny --reps 3             # a smoke run

The workload is serve_load.py's: random weights, 256-token prompts, decode steps at a cache of about 64
generated tokens. With the medians it prints what they imply for serve_load's closed-loop levels (one
request = one prefill + 64 steps at one client; a wave of 16 = 16 prompts prefilled together + 64 steps of
16 rows) and the 16-vs-1 ratio of tokens/s that the engine alone would give. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import mu
from mu.serve.engine import Prompt, TorchBackend
from mu.utils import cpu_isa

KINDS = {  # operator name -> kind (anything else is "other": norms, RoPE, residuals, copies, masks)
    "aten::addmm": "linear", "aten::mm": "linear", "aten::bmm": "linear", "mkldnn::_linear_pointwise": "linear",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention", "aten::gelu": "gelu",
    "aten::_index_put_impl_": "cache writes",
}


def prompts(n: int, length: int, seed: int = 0) -> list[Prompt]:
    g = torch.Generator().manual_seed(seed)
    return [Prompt(torch.randint(4, 260, (length,), generator=g).tolist()) for _ in range(n)]


def timed(fn, reps: int) -> tuple[float, dict[str, float]]:
    """Median seconds of `fn` over `reps` runs, and the share of each operator kind (one profiled run)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    kinds: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        kinds[KINDS.get(e.key, "other")] += e.self_cpu_time_total
    total = sum(kinds.values())
    return statistics.median(times), {k: v / total for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}


@torch.inference_mode()
def measure(backend: TorchBackend, args) -> dict:
    """Prefill of 1 and 16 prompts, decode step of 1 and 16 rows (as the engine's thread runs them)."""
    result = {}
    for n in (1, 16):
        batch = prompts(n, args.prompt_tokens)
        backend.prefill(batch)  # warm-up
        seconds, kinds = timed(lambda: backend.prefill(batch), max(3, args.reps // n))
        result[f"prefill_{n}"] = {"seconds": seconds, "per_prompt_s": seconds / n, "kinds": kinds}
        backend.reset()
        _, cache = backend.prefill(batch)
        for i in range(n):
            backend.admit(cache, i)
        tokens = [5] * n
        for _ in range(args.new_tokens // 2):  # the cache at about the middle of an answer
            backend.step(tokens)
        seconds, kinds = timed(lambda: backend.step(tokens), args.reps)
        backend.reset()
        result[f"step_{n}"] = {"seconds": seconds, "kinds": kinds}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--arch", default="encdec")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=20, help="repeats of each decode step (prefills: fewer)")
    args = p.parse_args()
    torch.manual_seed(0)
    model = mu.build_model(args.preset, arch=args.arch).eval()  # built outside inference mode, as a server does
    print(f"# {args.preset} {args.arch} fp32; ISA {cpu_isa()}; torch threads {torch.get_num_threads()}", flush=True)
    result = {"isa": cpu_isa(), "threads": torch.get_num_threads(), "preset": args.preset, "arch": args.arch,
              **measure(TorchBackend(model, max_batch=64), args)}
    for name, r in result.items():
        if isinstance(r, dict):
            shares = ", ".join(f"{k} {v:.0%}" for k, v in r["kinds"].items())
            print(f"{name:10s} {r['seconds'] * 1e3:8.1f} ms  ({shares})")
    one = result["prefill_1"]["seconds"] + args.new_tokens * result["step_1"]["seconds"]
    wave = result["prefill_16"]["seconds"] + args.new_tokens * result["step_16"]["seconds"]
    result["engine_ratio_16_vs_1"] = 16 * one / wave
    result["wave_16_prefill_share"] = result["prefill_16"]["seconds"] / wave
    print(f"one request at 1 client: {one * 1e3:.0f} ms; a wave of 16: {wave * 1e3:.0f} ms "
          f"({result['wave_16_prefill_share']:.0%} prefill); 16-vs-1 tokens/s from the engine alone: "
          f"{result['engine_ratio_16_vs_1']:.2f}x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
