#!/usr/bin/env bash
# Issue 19's GPU check, under 8 minutes end to end on one recent NVIDIA GPU:
#   1. the test suite's CUDA tests (`-k cuda`: tests named test_cuda_*, skipped on machines without CUDA),
#   2. `mu bench --device cuda` at 330m, bf16, batch 1 and 64, input 1024,
#   3. training throughput (tokens/s) and model FLOPs utilisation of the `small` and `330m` presets in bf16.
# Usage (from the repository root, after `make install`):  bash benchmarks/gpu_check.sh [OUT_DIR]
# PEAK_TFLOPS overrides the dense bf16 peak used for MFU (default: looked up from the GPU's name).
# Copy the numbers printed at the end (also in OUT_DIR/summary.txt) into docs/efficiency.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-gpu_check_out}
mkdir -p "$OUT"
start=$(date +%s)
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

echo "== 1/3 CUDA tests"
timeout 150 "$PY" -m pytest -p no:cacheprovider -o addopts="" -q -k cuda tests/ 2>&1 | tail -n 15 | tee "$OUT/tests.txt"

echo "== 2/3 mu bench --device cuda (330m, bf16, input 1024, batch 1 and 64)"
timeout 200 "$PY" -m mu bench --device cuda --preset 330m --dtype bf16 --input-lengths 1024 --batch-sizes 1,64 \
    --new-tokens 64 --repeats 3 --no-memory --no-flop-check --no-plots --quiet --out "$OUT/bench" \
    | tail -n 1 > "$OUT/bench_summary.json"
cat "$OUT/bench/bench.md" | head -n 60 > "$OUT/bench_head.md" || true

echo "== 3/3 training throughput, bf16"
for preset in small 330m; do
    timeout 100 "$PY" benchmarks/train_throughput.py --device cuda --preset "$preset" --precision bf16 \
        --batch-size 32 --source-len 512 --target-len 64 --warmup 3 --steps 10 --no-dropout 2>/dev/null \
        | tail -n 1 > "$OUT/train_$preset.json"
done

"$PY" - "$OUT" <<'PYEOF' | tee "$OUT/summary.txt"
import json, os, sys, torch
out = sys.argv[1]
name = torch.cuda.get_device_name(0)
peaks = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "L4": 121, "A10": 125, "4090": 165, "3090": 71}
peak = float(os.environ.get("PEAK_TFLOPS") or next((v for k, v in peaks.items() if k in name), "nan"))
print(f"GPU {name}; dense bf16 peak used for MFU: {peak} TFLOP/s")
s = json.load(open(f"{out}/bench_summary.json"))
print("mu bench 330m bf16 input 1024:", json.dumps({k: s.get(k) for k in
      ("ttft_ratio", "decode_speedup", "decode_speedup_by_batch", "flops_ratio", "kv_cache_ratio")}))
rows = json.load(open(f"{out}/bench/bench.json"))["rows"]
for r in rows:
    print(f"  {r['arch']:8s} B={r['batch']:<3d} TTFT {r['ttft_s'] or float('nan'):.4f} s  decode {r['decode_tok_s']:.1f} tok/s")
for preset in ("small", "330m"):
    t = json.load(open(f"{out}/train_{preset}.json"))
    for arch, r in t["results"].items():
        mfu = r["train_flops_per_s"] / (peak * 1e12)
        print(f"train {preset:5s} {arch:8s} bf16 batch {t['batch_size']}x({t['source_len']}+{t['target_len']}): "
              f"{r['tokens_per_s']:,.0f} tokens/s, {r['train_flops_per_s'] / 1e12:.1f} TFLOP/s, MFU {mfu:.1%}")
PYEOF
echo "done in $(( $(date +%s) - start )) s; outputs in $OUT"
