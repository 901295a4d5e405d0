"""Peak memory of one configuration, measured in a fresh process so peaks of configurations never mix.

    python -m mu.bench.worker '{"spec": {"arch": "encdec", "preset": "330m"}, "dtype": "fp32",
                                "device": "cpu", "input_length": 1024, "new_tokens": 64, "batch": 1,
                                "replicate": true, "seed": 0, "threads": null}'

Builds the model, runs a tiny warm-up generation, records the resident memory ("loaded"), runs one
greedy generation (the same loop the timings use) and prints one JSON object as its last line: peak
RSS (VmHWM, see `measure.peak_rss`), RSS with only the weights, RSS loaded, the increment of the peak
over loaded, the KV-cache bytes, and on an accelerator `max_memory_allocated` with its increment.
"""

from __future__ import annotations

import json
import sys


def measure(job: dict) -> dict:
    import torch

    from mu.bench.measure import current_rss, peak_rss, random_input_ids, synchronize, time_generation
    from mu.bench.models import ModelSpec, build_runner

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    device = torch.device(job["device"])
    rss_start = current_rss()
    runner = build_runner(ModelSpec(**job["spec"]), job["dtype"], device)
    result = {"rss_start_bytes": rss_start, "rss_weights_bytes": current_rss()}
    # A tiny generation first, so what the model builds lazily on first use (fused projection weights,
    # kernel workspaces, thread pools) counts as the loaded model, not as this configuration's increment.
    time_generation(runner, random_input_ids(1, 8, runner.vocab_size, 0, device), 2, [1], True, device)
    synchronize(device)
    result.update(rss_loaded_bytes=current_rss(), peak_rss_loaded_bytes=peak_rss())
    accel = device.type != "cpu"
    if accel:
        torch.accelerator.reset_peak_memory_stats(device)
        result["device_loaded_bytes"] = torch.accelerator.memory_allocated(device)
    B = int(job["batch"])
    ids = random_input_ids(B, int(job["input_length"]), runner.vocab_size, int(job.get("seed", 0)), device)
    timing = time_generation(runner, ids, int(job["new_tokens"]), [B], bool(job["replicate"]), device)
    result["peak_rss_bytes"] = peak_rss()
    result["increment_bytes"] = result["peak_rss_bytes"] - result["rss_loaded_bytes"]
    result["kv_cache_bytes"] = timing["cache_bytes"][B]
    if accel:
        result["device_peak_bytes"] = torch.accelerator.max_memory_allocated(device)
        result["device_increment_bytes"] = result["device_peak_bytes"] - result["device_loaded_bytes"]
    return result


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m mu.bench.worker '<job JSON>'", file=sys.stderr)
        return 2
    print(json.dumps(measure(json.loads(argv[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
