"""Inference efficiency benchmark: the Mu encoder-decoder vs its decoder-only twin, side by side.

    from mu.bench import BenchConfig, run_benchmark
    result = run_benchmark(BenchConfig(preset="330m", input_lengths=(1024,), out="bench_out"))
    result["summary"]   # {"input_length", "ttft_ratio", "decode_speedup", "memory_ratio", "flops_ratio", ...}

See docs/efficiency.md for what is measured and how; `mu bench` is the command-line front end.
"""

from mu.bench.flops import generation_flops, kv_cache_bytes
from mu.bench.runner import BenchConfig, run_benchmark

__all__ = ["BenchConfig", "run_benchmark", "generation_flops", "kv_cache_bytes"]
