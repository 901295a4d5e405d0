"""`run_benchmark(BenchConfig) -> dict`: encoder-decoder vs decoder-only, side by side, in one run.

Order of work (so ratios come from interleaved runs in one process and peaks never mix):
1. memory bandwidth (for the roofline column);
2. per dtype: build every model (random weights in the target dtype, or `model_dirs`), warm up, then
   `repeats` rounds of: for each input length, one lock-step generation of all models (prefill each,
   then decode steps 1..8 of each, 9..16 of each, ...; see `measure.time_generations`; who goes first
   alternates between rounds) at batch 1, and at `summary_length` at every batch size; then one
   FlopCounterMode-counted generation per model at the shortest length;
3. peak memory: one fresh `python -m mu.bench.worker` process per configuration, after all timings.
Figures are medians over repeats (per-token latencies: over all steps); every ratio is encoder-decoder /
decoder-only of those medians.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from mu.bench.flops import generation_flops, kv_cache_bytes, mu_param_count
from mu.bench.measure import (count_generation_flops, measure_bandwidth, percentile, random_input_ids,
                              time_generations)
from mu.bench.models import MU_ARCHS, ModelSpec, build_runner, mu_config_for
from mu.config import MuConfig
from mu.errors import MuError
from mu.model.fast import huge_pages_
from mu.utils import cpu_isa

PRIMARY_PAIR = ("encdec", "deconly")
HF_PAIRS = [("hf-t5", "hf-llama"), ("encdec", "hf-t5"), ("deconly", "hf-llama")]
PREFILL_MODES = ("auto", "replicate", "full")
FLOP_CHECK_TOKENS = 8  # new tokens of the FlopCounterMode cross-check (the counter's hooks are slow)

# The targets at the 330m presets, input 1024, 64 new tokens (encoder-decoder / decoder-only).
TARGETS = [
    # (name, metric, batch, comparison, bound)
    ("time to first token", "ttft_s", 1, "<=", 0.65),
    ("decode tokens/s, batch 1", "decode_tok_s", 1, ">=", 2.3),
    ("decode tokens/s, batch 16", "decode_tok_s", 16, ">=", 3.0),
    ("peak memory (RSS), batch 1", "peak_rss_bytes", 1, "<=", 0.9),
    ("FLOPs per generation", "flops_total", 1, "<=", 0.78),
]

# Row fields that get an encoder-decoder / decoder-only ratio.
RATIO_METRICS = ("ttft_s", "decode_ms_median", "decode_ms_p90", "decode_tok_s", "e2e_s", "e2e_tok_s",
                 "ttft_cpu_s", "decode_cpu_ms_median", "decode_cpu_tok_s", "kv_cache_bytes", "flops_total",
                 "flops_prefill", "flops_decode", "peak_rss_bytes", "increment_bytes", "device_peak_bytes",
                 "device_increment_bytes", "roofline_ms", "decode_weight_bytes")


@dataclass
class BenchConfig:
    preset: str = "330m"  # model size for random-weight models (ignored for `model_dirs`)
    archs: tuple[str, ...] = ("encdec", "deconly")  # encdec, deconly (hf-t5, hf-llama come with compare_hf)
    model_dirs: tuple[str, ...] = ()  # trained models (mu directories / paper .pt); their archs replace `archs`
    input_lengths: tuple[int, ...] = (128, 512, 1024, 2048)  # prompt lengths (batch 1 at each)
    new_tokens: int = 64  # tokens generated per sequence (prefill gives the first, then new_tokens-1 steps)
    batch_sizes: tuple[int, ...] = (1, 16)  # decode batch sizes, measured at `summary_length` (1 is always run)
    summary_length: Optional[int] = None  # length of the batch sweep and the summary (None: 1024 if listed, else max)
    dtypes: tuple[str, ...] = ("fp32",)  # fp32 / bf16 / fp16 / int8 / int8wo / int4 / auto, a round of models each
    device: str = "auto"  # cpu, cuda[:N] or auto
    repeats: int = 3  # timed rounds; figures are medians over them
    warmup: int = 1  # untimed rounds first (shortest length, a few decode steps, every batch size)
    compare_hf: bool = False  # add HF T5ForConditionalGeneration and LlamaForCausalLM of the same sizes
    prefill_batch: str = "auto"  # batch>1 decode: replicate (1 prefill, rows copied) | full | auto (cpu: replicate)
    compile: bool = False  # mu models decode as generate(compile=True) does (a GPU replays a CUDA graph); HF eager
    memory: bool = True  # peak memory in one fresh subprocess per configuration
    memory_jobs: int = 2  # memory subprocesses at once (timings are over by then), each with cores/jobs threads
    flop_check: bool = True  # count one generation per model with FlopCounterMode at the shortest length
    threads: Optional[int] = None  # torch.set_num_threads for the run and the workers
    seed: int = 0  # input ids and weights
    out: Optional[str] = None  # directory for bench.json, bench.md and the PNGs (None: nothing written)
    plots: bool = True  # write the PNGs (needs matplotlib)
    progress: bool = True  # per-configuration lines with an ETA on stderr

    def __post_init__(self) -> None:
        from mu.model.quantize import check_format

        self.archs = tuple(self.archs)
        self.model_dirs = tuple(str(d) for d in self.model_dirs)
        self.input_lengths = tuple(sorted(set(int(x) for x in self.input_lengths)))
        self.batch_sizes = tuple(sorted(set(int(x) for x in self.batch_sizes) | {1}))
        self.dtypes = tuple(self.dtypes)
        for name in ("input_lengths", "batch_sizes"):
            values = getattr(self, name)
            if not values or min(values) < 1:
                raise MuError(f"bench: {name} must be positive integers, got {list(values)}")
        if self.new_tokens < 2:
            raise MuError(f"bench: new_tokens must be >= 2 (the first comes from the prefill), got {self.new_tokens}")
        if self.repeats < 1 or self.warmup < 0:
            raise MuError(f"bench: repeats must be >= 1 and warmup >= 0, got {self.repeats} and {self.warmup}")
        if not self.model_dirs:
            bad = [a for a in self.archs if a not in MU_ARCHS]
            if bad or not self.archs:
                raise MuError(f"bench: unknown arch {bad or self.archs}; expected some of {MU_ARCHS} "
                              f"(Hugging Face models come with compare_hf)")
        if len(set(self.dtypes)) != len(self.dtypes) or not self.dtypes:
            raise MuError(f"bench: dtypes must be a non-empty list without repeats, got {list(self.dtypes)}")
        for d in self.dtypes:
            check_format(d)
            if self.compile and d in ("int8wo", "int4"):
                raise MuError(f"bench: compile runs float and int8 models; dtype {d!r} decodes eagerly only")
        if self.prefill_batch not in PREFILL_MODES:
            raise MuError(f"bench: prefill_batch is {self.prefill_batch!r}; expected one of {PREFILL_MODES}")
        if self.summary_length is None:
            self.summary_length = 1024 if 1024 in self.input_lengths else self.input_lengths[-1]
        elif self.summary_length not in self.input_lengths:
            raise MuError(f"bench: summary_length {self.summary_length} is not one of input_lengths "
                          f"{list(self.input_lengths)}")


# ---------------------------------------------------------------------------------------------
# Progress with an ETA


class Progress:
    """Per-task lines on stderr. The ETA scales each kind's predicted cost of what is left by the pace
    (measured / predicted seconds) of that kind's finished tasks, so builds and warm-ups do not skew it."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.tasks: list[tuple[str, float]] = []  # (kind, predicted seconds)
        self.finished: set[int] = set()
        self.actual: dict[str, float] = {}
        self.predicted_done: dict[str, float] = {}
        self.t0 = time.perf_counter()

    def plan(self, kind: str, cost: float, parallel: int = 1) -> int:
        self.tasks.append((kind, max(cost, 1e-6) / parallel))
        return len(self.tasks) - 1

    def _pace(self, kind: str) -> float:
        for k in (kind, "timing"):
            if self.predicted_done.get(k):
                return self.actual[k] / self.predicted_done[k]
        return 1.0

    def finish(self, task: int, seconds: float, message: str) -> None:
        kind, cost = self.tasks[task]
        self.finished.add(task)
        self.actual[kind] = self.actual.get(kind, 0.0) + seconds
        self.predicted_done[kind] = self.predicted_done.get(kind, 0.0) + cost
        if not self.enabled:
            return
        left = sum(c * self._pace(k) for i, (k, c) in enumerate(self.tasks) if i not in self.finished)
        elapsed = time.perf_counter() - self.t0
        print(f"[{len(self.finished):>3}/{len(self.tasks)}] {message} | {_fmt_time(elapsed)} elapsed, "
              f"~{_fmt_time(left)} left", file=sys.stderr, flush=True)

    def note(self, message: str) -> None:
        if self.enabled:
            print(message, file=sys.stderr, flush=True)


def _fmt_time(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s" if s >= 60 else f"{s:.1f}s"


def _predicted_cost(config: MuConfig, L: int, N: int, batches, dtype: str, device: torch.device) -> float:
    """Rough seconds for one generation: prefill FLOPs at a guessed rate, decode steps as weight reads or FLOPs."""
    rate = 5e10 if dtype == "fp32" or device.type != "cpu" else 8e9  # bf16 GEMMs are emulated on AVX2 CPUs
    f = generation_flops(config, L, N)
    step = f["decode"] / max(N - 1, 1)
    overhead = 3e-4 * config.n_decoder_layer  # Python and dispatch per decode step
    return f["prefill"] / rate + (N - 1) * sum(max(B * step / rate, step / 1e10) + overhead for B in batches)


# ---------------------------------------------------------------------------------------------
# The run


def _specs(cfg: BenchConfig) -> dict[str, ModelSpec]:
    specs: dict[str, ModelSpec] = {}
    if cfg.model_dirs:
        for d in cfg.model_dirs:
            mc = _read_mu_config(d)
            if mc.arch in specs:
                raise MuError(f"bench: two models with arch {mc.arch!r} ({specs[mc.arch].model_dir} and {d}); "
                              f"give at most one encdec and one deconly model")
            specs[mc.arch] = ModelSpec(mc.arch, preset=None, model_dir=d, mu_config=mc.to_dict())
    else:
        for arch in cfg.archs:
            specs[arch] = ModelSpec(arch, preset=cfg.preset, mu_config=MuConfig.from_name(cfg.preset, arch).to_dict())
    if cfg.compare_hf:
        for hf, base in (("hf-t5", "encdec"), ("hf-llama", "deconly")):
            mc = MuConfig.from_dict(specs[base].mu_config) if base in specs else MuConfig.from_name(cfg.preset, base)
            specs[hf] = ModelSpec(hf, preset=None, mu_config=mc.to_dict())
    return specs


def _read_mu_config(path: str) -> MuConfig:
    p = Path(path)
    if p.is_dir():
        f = p / "config.json"
        if not f.is_file():
            raise MuError(f"bench: {p} has no config.json (expected a model directory from save_pretrained)")
        try:
            raw = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise MuError(f"{f}: not valid JSON ({e})") from None
        return MuConfig.from_dict({k: v for k, v in raw.items() if k not in ("model_type", "mu_format")}, str(f))
    if p.is_file():
        from mu.checkpoint import load_reference_checkpoint

        return load_reference_checkpoint(p)[0]
    raise MuError(f"bench: no model at {str(p)!r}: expected a model directory or a paper checkpoint (.pt)")


def run_benchmark(cfg: BenchConfig) -> dict[str, Any]:
    """Run the benchmark; return everything measured (the content of bench.json).

    result["summary"] is flat: {"input_length", "new_tokens", "dtype", "preset", "ttft_ratio",
    "decode_speedup", "decode_speedup_by_batch", "memory_ratio", "memory_increment_ratio",
    "device_memory_ratio", "flops_ratio", "kv_cache_ratio", "e2e_ratio", "cpu_time", "by_dtype",
    "targets"}; ratios are encoder-decoder / decoder-only at `summary_length` for the first dtype
    (decode_speedup is the ratio of tokens/s, so > 1 means the encoder-decoder is faster).
    """
    threads = torch.get_num_threads()
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(threads)  # `threads` is for this run only


def _run(cfg: BenchConfig) -> dict[str, Any]:
    from mu.utils import pick_device, seed_everything

    device = pick_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if "auto" in cfg.dtypes:  # the format this machine runs fastest (mu.model.quantize.auto_format)
        from dataclasses import replace

        from mu.model.quantize import auto_format

        picked = auto_format(device)
        cfg = replace(cfg, dtypes=tuple(dict.fromkeys(picked if d == "auto" else d for d in cfg.dtypes)))
    seed_everything(cfg.seed)
    replicate = cfg.prefill_batch == "replicate" or (cfg.prefill_batch == "auto" and device.type == "cpu")
    specs = _specs(cfg)
    archs = list(specs)
    lengths, N, S = cfg.input_lengths, cfg.new_tokens, cfg.summary_length
    batches_at = {L: (cfg.batch_sizes if L == S else (1,)) for L in lengths}
    progress = Progress(cfg.progress)

    # Plan the tasks (for the ETA).
    cost = {(d, a, L): _predicted_cost(mu_config_for(specs[a]), L, N, batches_at[L], d, device)
            for d in cfg.dtypes for a in archs for L in lengths}
    plan_timing = {(d, r, L): progress.plan("timing", sum(cost[d, a, L] for a in archs)) for d in cfg.dtypes
                   for r in range(cfg.repeats) for L in lengths}
    # FLOPs do not depend on the dtype: counted once, with the first dtype.
    plan_flops = {(cfg.dtypes[0], a): progress.plan("flops", 3 * _predicted_cost(
        mu_config_for(specs[a]), lengths[0], min(N, FLOP_CHECK_TOKENS), (1,), cfg.dtypes[0], device))
        for a in archs if cfg.flop_check}
    memory_jobs = [(d, a, L, B) for d in cfg.dtypes for a in archs for L in lengths for B in batches_at[L]]
    plan_memory = {job: progress.plan("memory", cost[job[:3]] / len(batches_at[job[2]]) + 3.0, cfg.memory_jobs)
                   for job in memory_jobs if cfg.memory}

    started = time.time()
    progress.note(f"mu bench: {archs} x dtypes {list(cfg.dtypes)} x input lengths {list(lengths)} "
                  f"(batch sizes {list(cfg.batch_sizes)} at {S}), {N} new tokens, {cfg.repeats} repeats, "
                  f"device {device}, {torch.get_num_threads()} threads")
    # A tensor well past the last-level cache, about the size of the weights a decode step reads.
    weights = max(mu_param_count(mu_config_for(s)) for s in specs.values()) * 4
    bandwidth = measure_bandwidth(device, nbytes=min(256 << 20, max(64 << 20, weights)))
    progress.note(f"memory bandwidth: read {bandwidth['read_bytes_per_s'] / 1e9:.1f} GB/s, "
                  f"copy {bandwidth['copy_bytes_per_s'] / 1e9:.1f} GB/s")

    raw: dict[tuple[str, str], dict] = {}
    models: dict[str, dict] = {}
    counted: dict[tuple[str, str], dict] = {}
    for dtype in cfg.dtypes:
        runners = {}
        for a in archs:
            t0 = time.perf_counter()
            runners[a] = build_runner(specs[a], dtype, device, cfg.compile)
            if a in MU_ARCHS and device.type == "cpu":  # timed where `generate` puts the weights: on 2 MiB pages
                huge_pages_(runners[a].model)  # (not in the memory workers: the move's copy would be their peak)
            models.setdefault(a, {}).update({dtype: runners[a].describe()})
            progress.note(f"built {a} ({dtype}) in {time.perf_counter() - t0:.1f}s: "
                          f"{models[a][dtype]['params'] / 1e6:.1f}M parameters")
        vocab = min(r.vocab_size for r in runners.values())
        max_b = max(cfg.batch_sizes) if not replicate else 1
        inputs = {L: random_input_ids(max_b, L, vocab, cfg.seed + L, device) for L in lengths}

        for w in range(cfg.warmup):  # compiled steps: every length too (each is a shape of its own to compile)
            for L in (lengths if cfg.compile else lengths[:1]):
                time_generations(runners, inputs[L], N, cfg.batch_sizes, replicate, device,
                                 decode_steps=min(N - 1, 4))
            progress.note(f"warm-up {w + 1}/{cfg.warmup} ({dtype}) done")

        for a in archs:
            raw[dtype, a] = {k: {} for k in ("ttft_s", "ttft_cpu_s", "steps_s", "steps_cpu_s", "cache_bytes")}
        for r in range(cfg.repeats):
            for L in lengths:
                order = archs if r % 2 == 0 else archs[::-1]  # who goes first alternates between repeats
                t0 = time.perf_counter()
                res = time_generations({a: runners[a] for a in order}, inputs[L], N, batches_at[L], replicate,
                                       device)
                seconds = time.perf_counter() - t0
                parts = []
                for a in archs:
                    rec = raw[dtype, a]
                    for key in ("ttft_s", "ttft_cpu_s", "steps_s", "steps_cpu_s"):
                        for B, value in res[a][key].items():
                            rec[key].setdefault((L, B), []).append(value)
                    for B, n in res[a]["cache_bytes"].items():
                        rec["cache_bytes"][L, B] = n
                    parts.append(f"{a} TTFT {next(iter(res[a]['ttft_s'].values())):.2f}s, " + ", ".join(
                        f"B={B} {statistics.median(s) * 1e3:.0f}ms" for B, s in res[a]["steps_s"].items()))
                progress.finish(plan_timing[dtype, r, L], seconds,
                                f"{dtype} L={L} rep {r + 1}/{cfg.repeats}: " + "; ".join(parts))

        if cfg.flop_check and dtype == cfg.dtypes[0]:
            L0, n_check = lengths[0], min(N, FLOP_CHECK_TOKENS)
            for a in archs:
                t0 = time.perf_counter()
                counted[dtype, a] = count_generation_flops(runners[a], inputs[L0][:1], n_check)
                counted[dtype, a].update(input_length=L0, new_tokens=n_check)
                progress.finish(plan_flops[dtype, a], time.perf_counter() - t0, f"{dtype} {a:>8} L={L0}: counted "
                                f"{counted[dtype, a]['total'] / 1e9:.2f} GFLOPs with FlopCounterMode")
        del runners
        gc.collect()

    memory: dict[tuple, dict] = {}
    if cfg.memory:
        memory = _measure_memory(cfg, specs, memory_jobs, device, replicate,
                                 lambda job, seconds, msg: progress.finish(plan_memory[job], seconds, msg))

    result = _assemble(cfg, specs, raw, models, counted, memory, bandwidth, device, replicate, batches_at)
    result["meta"]["wall_s"] = time.time() - started
    if cfg.out:
        from mu.bench.report import write_outputs

        write_outputs(result, Path(cfg.out), plots=cfg.plots)
    return result


def _measure_memory(cfg: BenchConfig, specs: dict[str, ModelSpec], jobs: list, device: torch.device,
                    replicate: bool, done: Callable[[tuple, float, str], None]) -> dict[tuple, dict]:
    # Workers share the cores: more threads than cores makes OpenMP kernels crawl (spinning barriers).
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // max(1, cfg.memory_jobs))

    def one(job: tuple) -> tuple[tuple, dict]:
        dtype, arch, L, B = job
        t0 = time.perf_counter()
        payload = {"spec": specs[arch].to_dict(), "dtype": dtype, "device": str(device), "input_length": L,
                   "new_tokens": cfg.new_tokens, "batch": B, "replicate": replicate, "seed": cfg.seed + L,
                   "threads": threads}
        proc = subprocess.run([sys.executable, "-m", "mu.bench.worker", json.dumps(payload)],
                              capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            res = {"error": f"worker exited {proc.returncode}: {tail}"}
            msg = f"memory {dtype} {arch:>8} L={L} B={B}: FAILED ({tail})"
        else:
            res = json.loads(lines[-1])
            msg = (f"memory {dtype} {arch:>8} L={L} B={B}: peak RSS {res['peak_rss_bytes'] / 2**30:.2f} GiB "
                   f"(+{res['increment_bytes'] / 2**20:.0f} MiB over the loaded weights)")
        done(job, time.perf_counter() - t0, msg)
        return job, res

    with ThreadPoolExecutor(max_workers=max(1, cfg.memory_jobs)) as pool:
        return dict(pool.map(one, jobs))


# ---------------------------------------------------------------------------------------------
# From raw samples to rows, ratios and the summary


def _median(xs):
    return statistics.median(xs) if xs else None


def _ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def _assemble(cfg, specs, raw, models, counted, memory, bandwidth, device, replicate, batches_at) -> dict:
    N = cfg.new_tokens
    rows = []
    for (dtype, arch), rec in raw.items():
        info = models[arch][dtype]
        runner_cfg = mu_config_for(specs[arch])
        elsize = torch.empty((), dtype=_dtype(dtype)).element_size()
        for L in cfg.input_lengths:
            for B in batches_at[L]:
                has_ttft = B == 1 or not replicate
                ttft_samples = rec["ttft_s"].get((L, B if not replicate else 1), []) if has_ttft else []
                ttft_cpu = rec["ttft_cpu_s"].get((L, B if not replicate else 1), []) if has_ttft else []
                step_runs, cpu_runs = rec["steps_s"][L, B], rec["steps_cpu_s"][L, B]
                steps = [s for run in step_runs for s in run]
                tok_s = [B * len(run) / sum(run) for run in step_runs]
                row = {"dtype": dtype, "arch": arch, "input_length": L, "batch": B, "new_tokens": N,
                       "ttft_s": _median(ttft_samples), "ttft_samples_s": ttft_samples,
                       "decode_ms_median": statistics.median(steps) * 1e3,
                       "decode_ms_p90": percentile(steps, 90) * 1e3,
                       "decode_tok_s": statistics.median(tok_s), "decode_tok_s_samples": tok_s,
                       "decode_steps_ms": [[s * 1e3 for s in run] for run in step_runs],
                       # process CPU time: what the work cost, without the waiting a busy machine adds
                       "ttft_cpu_s": _median(ttft_cpu), "ttft_cpu_samples_s": ttft_cpu,
                       "decode_cpu_ms_median": statistics.median(s for run in cpu_runs for s in run) * 1e3,
                       "decode_cpu_tok_s": statistics.median(B * len(run) / sum(run) for run in cpu_runs)}
                if has_ttft:
                    totals = [t + sum(run) for t, run in zip(ttft_samples, step_runs)]
                    row["e2e_s"] = statistics.median(totals)
                    row["e2e_tok_s"] = B * N / row["e2e_s"]
                else:
                    row["e2e_s"] = row["e2e_tok_s"] = None
                row["kv_cache_bytes"] = rec["cache_bytes"][L, B]
                row["kv_cache_bytes_analytic"] = (kv_cache_bytes(runner_cfg, L, N, B, elsize)
                                                  if arch in MU_ARCHS else None)
                if arch in MU_ARCHS:
                    f = generation_flops(runner_cfg, L, N)  # per sequence
                    row.update(flops_prefill=f["prefill"], flops_decode=f["decode"], flops_total=f["total"])
                else:  # Hugging Face models: counted only (see flop_check), no formula
                    row.update(flops_prefill=None, flops_decode=None, flops_total=None)
                step_bytes = info["decode_weight_bytes"] + _runner_kv_read(specs[arch], runner_cfg, L, N, B, elsize)
                row["decode_weight_bytes"] = info["decode_weight_bytes"]
                row["decode_bytes_per_step"] = step_bytes
                row["roofline_ms"] = step_bytes / bandwidth["read_bytes_per_s"] * 1e3
                row["roofline_fraction"] = row["roofline_ms"] / row["decode_ms_median"]
                mem = memory.get((dtype, arch, L, B)) or {}
                for k in ("peak_rss_bytes", "rss_loaded_bytes", "increment_bytes", "device_peak_bytes",
                          "device_increment_bytes"):
                    row[k] = mem.get(k)
                row["memory_raw"] = mem or None
                rows.append(row)

    index = {(r["dtype"], r["arch"], r["input_length"], r["batch"]): r for r in rows}
    pairs = [PRIMARY_PAIR] + (HF_PAIRS if cfg.compare_hf else [])
    ratios = []
    for num, den in pairs:
        for (dtype, arch, L, B), a in index.items():
            b = index.get((dtype, den, L, B))
            if arch != num or b is None:
                continue
            entry = {"dtype": dtype, "input_length": L, "batch": B, "numerator": num, "denominator": den}
            for m in RATIO_METRICS:
                entry[m] = _ratio(a.get(m), b.get(m))
            # Paired per-repeat ratios: their spread shows the noise of a shared machine.
            entry["ttft_s_per_repeat"] = [x / y for x, y in zip(a["ttft_samples_s"], b["ttft_samples_s"])]
            entry["decode_tok_s_per_repeat"] = [x / y for x, y in zip(a["decode_tok_s_samples"],
                                                                       b["decode_tok_s_samples"])]
            ratios.append(entry)

    flop_check = []
    for (dtype, arch), c in counted.items():
        item = {"dtype": dtype, "arch": arch, "input_length": c["input_length"], "new_tokens": c["new_tokens"],
                "counted": {k: c[k] for k in ("prefill", "decode", "total")}}
        if arch in MU_ARCHS:
            a = generation_flops(mu_config_for(specs[arch]), c["input_length"], c["new_tokens"])
            item["analytic"] = a
            item["relative_error"] = {k: (a[k] - c[k]) / c[k] if c[k] else None for k in a}
        flop_check.append(item)

    from mu.model import quantize  # as the other quantization helpers here: only a run that reports needs it

    summary = _summary(cfg, ratios)
    meta = {"config": asdict(cfg), "device": str(device), "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "isa": cpu_isa(), "cpu_count": os.cpu_count(), "prefill_batch": "replicate" if replicate else "full",
            "int8_kernels": quantize.int8_kernels(),
            "bandwidth": bandwidth, "specs": {a: s.to_dict() for a, s in specs.items()},
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average": _loadavg()}
    return {"meta": meta, "models": models, "rows": rows, "ratios": ratios, "flop_check": flop_check,
            "summary": summary}


def _dtype(name: str) -> torch.dtype:
    """The float dtype of a format (a quantized model keeps activations and KV cache in fp32)."""
    from mu.checkpoint import parse_dtype
    from mu.model.quantize import split_format

    return parse_dtype(split_format(name)[0])


def _runner_kv_read(spec: ModelSpec, c: MuConfig, L: int, N: int, B: int, elsize: int) -> float:
    from mu.bench.flops import kv_read_bytes_per_step, mu_kv_read_bytes

    if spec.arch in MU_ARCHS:
        return mu_kv_read_bytes(c, L, N, B, elsize)
    if spec.arch == "hf-t5":  # full multi-head K/V
        return kv_read_bytes_per_step(c.n_decoder_layer, c.qkv_embd, (N + 2) / 2, L, B, elsize)
    return kv_read_bytes_per_step(c.n_decoder_layer, c.n_kv_head * c.head_dim, L + N / 2, 0, B, elsize)


def _loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def _summary(cfg: BenchConfig, ratios: list[dict]) -> dict:
    S = cfg.summary_length
    by_dtype = {}
    targets = []
    for dtype in cfg.dtypes:
        primary = {r["batch"]: r for r in ratios if r["dtype"] == dtype and r["input_length"] == S
                   and (r["numerator"], r["denominator"]) == PRIMARY_PAIR}
        if 1 not in primary:
            continue
        b1 = primary[1]
        by_dtype[dtype] = {
            "ttft_ratio": b1["ttft_s"], "decode_speedup": b1["decode_tok_s"],
            "decode_speedup_by_batch": {B: r["decode_tok_s"] for B, r in sorted(primary.items())},
            "memory_ratio": b1["peak_rss_bytes"], "memory_increment_ratio": b1["increment_bytes"],
            "device_memory_ratio": b1["device_peak_bytes"], "flops_ratio": b1["flops_total"],
            "kv_cache_ratio": b1["kv_cache_bytes"], "e2e_ratio": b1["e2e_s"],
            # the same from process CPU time (robust on a shared machine; meaningless on accelerators)
            "cpu_time": {"ttft_ratio": b1["ttft_cpu_s"],
                         "decode_speedup_by_batch": {B: r["decode_cpu_tok_s"] for B, r in sorted(primary.items())}},
        }
        for name, metric, B, op, bound in TARGETS:
            if metric == "peak_rss_bytes" and b1.get("device_peak_bytes") is not None:  # an accelerator: its memory
                name, metric = f"peak device memory, batch {B}", "device_peak_bytes"
            value = primary[B][metric] if B in primary else None
            met = None if value is None else (value <= bound if op == "<=" else value >= bound)
            targets.append({"dtype": dtype, "target": name, "metric": metric, "batch": B, "bound": f"{op} {bound}",
                            "measured": value, "met": met})
    first = by_dtype.get(cfg.dtypes[0], {})
    return {"input_length": S, "new_tokens": cfg.new_tokens, "dtype": cfg.dtypes[0], "preset": cfg.preset,
            **first, "by_dtype": by_dtype, "targets": targets}
