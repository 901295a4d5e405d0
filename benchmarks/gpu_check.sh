#!/usr/bin/env bash
# Issue 19's GPU check, under 8 minutes end to end on one recent NVIDIA GPU:
#   0. the card's two ceilings, measured: a bf16 matrix product (TFLOP/s) and a device-to-device copy (GB/s),
#   1. the test suite's CUDA tests (`-k cuda`: tests named test_cuda_*, skipped on machines without CUDA),
#   2. `mu bench --device cuda --compile` at 330m, bf16, batch 1 and 64, input 1024 (the decode steps as
#      `mu generate --compile` runs them; device memory in fresh processes, eager),
#   3. training throughput (tokens/s) and model FLOPs utilisation of the `small` and `330m` presets in bf16,
#   4. `generate` at 330m in bf16, batch 1 and 16: eager, `cuda_graph=True` (the eager step replayed as a CUDA
#      graph) and `compile=True` (the compiled one), and at batch 1 the compiled step without a graph.
# Usage (from the repository root, after `make install`):  bash benchmarks/gpu_check.sh [OUT_DIR]
# STAGES="1 4" runs only those stages (default: all).
# PY picks the interpreter (default .venv/bin/python, else python3; on a machine where mu is not installed, run it
# with PYTHONPATH=src). PEAK_TFLOPS overrides the datasheet's dense bf16 peak used for MFU (looked up by name);
# MFU is also given against the measured matrix rate. A stage that fails or runs out of time is reported and the
# others still run. Copy the numbers printed at the end (also in OUT_DIR/summary.txt) into docs/efficiency.md.
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PY:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT=${1:-gpu_check_out}
mkdir -p "$OUT"
start=$(date +%s)
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check')" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
STAGES=${STAGES:-0 1 2 3 4}
want() { [[ " $STAGES " == *" $1 "* ]]; }
stage() {  # stage NAME SECONDS COMMAND...: run it under a time limit, say how it ended
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    timeout "$limit" "$@"
    rc=$?
    echo "stage $name: rc $rc after $((SECONDS - t0)) s" | tee -a "$OUT/stages.txt" >&2
}

if want 0; then
echo "== 0/4 ceilings"
stage ceilings 60 "$PY" - "$OUT/ceilings.json" <<'PYEOF'
import json, sys, torch
def timed(fn, n):
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / n
a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
mm = 2 * 8192**3 / timed(lambda: a @ b, 20) / 1e12
src = torch.randn(2**30, device="cuda", dtype=torch.float32)  # 4 GiB, far past the L2
dst = torch.empty_like(src)
copy = 2 * src.numel() * 4 / timed(lambda: dst.copy_(src), 10) / 1e9
res = {"bf16_matmul_tflops": round(mm, 1), "copy_gb_s_read_plus_write": round(copy, 1)}
print(json.dumps(res))
json.dump(res, open(sys.argv[1], "w"))
PYEOF
fi

if want 1; then
echo "== 1/4 CUDA tests"
mapfile -t files < <(grep -l "def test_cuda" tests/test_*.py)
stage tests 180 "$PY" -m pytest -p no:cacheprovider -o addopts="" -q -rs -k cuda "${files[@]}" 2>&1 \
    | tail -n 40 | tee "$OUT/tests.txt"
fi

if want 2; then
echo "== 2/4 mu bench --device cuda --compile (330m, bf16, input 1024, batch 1 and 64)"
stage bench 240 "$PY" -m mu bench --device cuda --compile --preset 330m --dtype bf16 --input-lengths 1024 \
    --batch-sizes 1,64 --new-tokens 64 --repeats 3 --no-flop-check --no-plots --quiet --out "$OUT/bench" \
    > "$OUT/bench_stdout.txt"
tail -n 1 "$OUT/bench_stdout.txt" > "$OUT/bench_summary.json"
fi

if want 3; then
echo "== 3/4 training throughput, bf16"
for preset in small 330m; do
    stage "train_$preset" 100 "$PY" benchmarks/train_throughput.py --device cuda --preset "$preset" \
        --precision bf16 --batch-size 32 --source-len 512 --target-len 64 --warmup 6 --steps 10 --no-dropout \
        2>"$OUT/train_$preset.log" | tail -n 1 > "$OUT/train_$preset.json"
done
fi

if want 4; then
echo "== 4/4 generate: eager, cuda_graph=True, compile=True (330m, bf16, 1024 input tokens, 128 new, batch 1, 16)"
stage generate 300 "$PY" - "$OUT/generate.json" <<'PYEOF'
# cuda_graph=True replays the eager step as a CUDA graph, compile=True the compiled one (mu.model.cuda_graph); at
# batch 1 a fourth variant, the compiled step without a graph, says what the compiler brings alone
import json, sys, time, torch
import mu
from mu.model import cuda_graph

graph_step = cuda_graph.graph_step
def no_graph(model, tokens, cache):
    cache.slot = torch.full((1,), cache.length, dtype=torch.long, device=tokens.device)
    return model._static_body(tokens, cache, cache.length + 1)
VARIANTS = {"eager": {}, "cuda_graph": {"cuda_graph": True}, "compiled": {"compile": True},
            "compiled_without_graph": {"compile": True}}
res = {}
def record(key, value):
    res[key] = value
    print(key, value, flush=True)
    json.dump(res, open(sys.argv[1], "w"))
for arch in ("encdec", "deconly"):
    torch.manual_seed(0)
    model = mu.build_model("330m", arch=arch, dropout=0.0).to("cuda", torch.bfloat16).eval()
    for B in (1, 16):
        ids = torch.randint(4, 30000, (B, 1024), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        outs = {}
        for name, kwargs in VARIANTS.items():
            if B > 1 and name == "compiled_without_graph":
                continue
            cuda_graph.graph_step = no_graph if name == "compiled_without_graph" else graph_step
            times = []
            for _ in range(3):  # the first run of each compiles, records or warms up; the best of the last two
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                outs[name] = model.generate(ids, max_new_tokens=128, **kwargs)  # no EOS: 128 steps
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            cuda_graph.graph_step = graph_step
            n = outs[name].shape[1] - (1 if arch == "encdec" else ids.shape[1])
            record(f"{arch}_B{B}_{name}", {"tokens": B * n, "first_run_s": round(times[0], 2),
                                           "tok_s": round(B * n / min(times[1:]), 1),
                                           "same_tokens_as_eager": bool(torch.equal(outs[name], outs["eager"]))})
PYEOF
fi

"$PY" - "$OUT" <<'PYEOF' | tee "$OUT/summary.txt"
import json, math, os, sys, torch
out = sys.argv[1]
def load(name):
    try:
        with open(f"{out}/{name}") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        print(f"{name}: missing ({e.__class__.__name__})")
        return None
name = torch.cuda.get_device_name(0)
peaks = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "L4": 121, "A10": 125, "4090": 165, "3090": 71}
peak = float(os.environ.get("PEAK_TFLOPS") or next((v for k, v in peaks.items() if k in name), "nan"))
ceil = load("ceilings.json") or {}
measured = ceil.get("bf16_matmul_tflops", math.nan)
print(f"GPU {name}; dense bf16 peak (datasheet) {peak} TFLOP/s; measured 8192^3 bf16 product {measured} TFLOP/s; "
      f"device copy {ceil.get('copy_gb_s_read_plus_write', math.nan)} GB/s (read + write)")
def text(name):
    return open(f"{out}/{name}").read() if os.path.exists(f"{out}/{name}") else ""
print(text("stages.txt").strip())
tests = [ln for ln in text("tests.txt").splitlines() if " in " in ln and ("passed" in ln or "failed" in ln)]
print("CUDA tests:", tests[-1] if tests else "no pytest summary (tests.txt)")
s = load("bench_summary.json") if os.path.exists(f"{out}/bench_summary.json") else None
if s:
    print("mu bench 330m bf16 input 1024:", json.dumps({k: s.get(k) for k in
          ("ttft_ratio", "decode_speedup", "decode_speedup_by_batch", "flops_ratio", "kv_cache_ratio",
           "device_memory_ratio")}))
    for r in (load("bench/bench.json") or {}).get("rows", []):
        mem = r.get("peak_device_bytes") or r.get("device_peak_bytes")
        print(f"  {r['arch']:8s} B={r['batch']:<3d} TTFT {r['ttft_s'] or math.nan:.4f} s  "
              f"decode {r['decode_tok_s']:.1f} tok/s" + (f"  peak device memory {mem / 2**30:.2f} GiB" if mem else ""))
for preset in ("small", "330m"):
    t = load(f"train_{preset}.json") if os.path.exists(f"{out}/train_{preset}.json") else None
    for arch, r in (t or {}).get("results", {}).items():
        f = r["train_flops_per_s"]
        print(f"train {preset:5s} {arch:8s} bf16 batch {t['batch_size']}x({t['source_len']}+{t['target_len']}): "
              f"{r['tokens_per_s']:,.0f} tokens/s, {f / 1e12:.1f} TFLOP/s, MFU {f / (peak * 1e12):.1%} of the "
              f"datasheet, {f / (measured * 1e12):.1%} of the measured product")
for key, r in ((os.path.exists(f"{out}/generate.json") and load("generate.json")) or {}).items():
    print(f"generate 330m bf16 {key:34s} {r['tok_s']:8.1f} tok/s  first run {r['first_run_s']} s  "
          f"tokens {'=' if r['same_tokens_as_eager'] else '!='} eager's")
PYEOF
echo "done in $(( $(date +%s) - start )) s; outputs in $OUT"
