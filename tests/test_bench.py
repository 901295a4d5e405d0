"""The efficiency benchmark on tiny models: end to end, FLOP formula vs counter, runners, CLI errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import mu
from mu.bench import BenchConfig, generation_flops, run_benchmark
from mu.bench.measure import count_generation_flops, random_input_ids, time_generation
from mu.bench.models import HFRunner, ModelSpec, MuRunner, build_hf_model, build_runner
from mu.bench.report import PLOTS
from mu.model import native
from mu.cli import main

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    # The box is shared: more busy threads than cores makes OpenMP kernels crawl. Behaviour is the same.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cfg = BenchConfig(preset="tiny", input_lengths=(8, 16), new_tokens=4, batch_sizes=(1, 2), repeats=2, warmup=1,
                      memory_jobs=6, threads=1, out=str(out), progress=False)
    return run_benchmark(cfg), out


def test_writes_json_markdown_and_plots(result):
    res, out = result
    on_disk = json.loads((out / "bench.json").read_text())
    assert on_disk["summary"]["ttft_ratio"] == pytest.approx(res["summary"]["ttft_ratio"])
    md = (out / "bench.md").read_text()
    assert "encdec/deconly" in md and "FlopCounterMode" in md and "peak memory" in md
    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert not list(out.glob("*.tmp"))  # atomic writes leave no temporaries


def test_rows_have_sane_positive_numbers(result):
    res, _ = result
    rows = res["rows"]
    # batch 1 at both lengths and batch 2 at the summary length (the longest here), for both archs
    assert {(r["arch"], r["input_length"], r["batch"]) for r in rows} == {
        (a, L, B) for a in ("encdec", "deconly") for L, B in ((8, 1), (16, 1), (16, 2))}
    for r in rows:
        assert r["decode_ms_median"] > 0 and r["decode_ms_p90"] >= r["decode_ms_median"] * 0.999
        assert r["decode_tok_s"] > 0 and r["roofline_ms"] > 0
        assert len(r["decode_steps_ms"]) == 2 and all(len(run) == 3 for run in r["decode_steps_ms"])  # 2 reps x N-1
        if r["batch"] == 1:
            assert r["ttft_s"] > 0 and r["e2e_s"] > r["ttft_s"]
        assert r["kv_cache_bytes"] == r["kv_cache_bytes_analytic"]  # KVCache.nbytes() == the formula
        assert r["peak_rss_bytes"] >= r["rss_loaded_bytes"] > 0
        assert r["flops_total"] == r["flops_prefill"] + r["flops_decode"] > 0


def test_ratios_are_ratios_of_the_recorded_numbers(result):
    res, _ = result
    rows = {(r["arch"], r["input_length"], r["batch"]): r for r in res["rows"]}
    assert len(res["ratios"]) == 3
    for q in res["ratios"]:
        a, b = rows["encdec", q["input_length"], q["batch"]], rows["deconly", q["input_length"], q["batch"]]
        for m in ("decode_ms_median", "decode_tok_s", "kv_cache_bytes", "flops_total", "peak_rss_bytes",
                  "roofline_ms"):
            assert q[m] == pytest.approx(a[m] / b[m]), m
        if q["batch"] == 1:
            assert q["ttft_s"] == pytest.approx(a["ttft_s"] / b["ttft_s"])
    s = res["summary"]
    assert s["input_length"] == 16
    b1 = rows["encdec", 16, 1], rows["deconly", 16, 1]
    assert s["ttft_ratio"] == pytest.approx(b1[0]["ttft_s"] / b1[1]["ttft_s"])
    assert s["decode_speedup"] == pytest.approx(b1[0]["decode_tok_s"] / b1[1]["decode_tok_s"])
    assert s["memory_ratio"] == pytest.approx(b1[0]["peak_rss_bytes"] / b1[1]["peak_rss_bytes"])
    assert s["flops_ratio"] == pytest.approx(b1[0]["flops_total"] / b1[1]["flops_total"])
    assert set(s["decode_speedup_by_batch"]) == {1, 2}
    assert [t["target"] for t in s["targets"]][0] == "time to first token"


def test_memory_target_reads_the_accelerators_memory_where_measured():
    """On a GPU the host's RSS says little (the weights live on the card): the memory target is the device peak."""
    from mu.bench.runner import TARGETS, _summary

    cfg = BenchConfig(preset="tiny", input_lengths=(16,), dtypes=("bf16",))
    row = {m: 0.5 for _, m, _, _, _ in TARGETS} | {"batch": 1, "dtype": "bf16", "input_length": 16,
                                                   "numerator": "encdec", "denominator": "deconly",
                                                   "peak_rss_bytes": 0.97, "increment_bytes": 1.0,
                                                   "kv_cache_bytes": 0.3, "e2e_s": 0.5, "ttft_cpu_s": 0.5,
                                                   "decode_cpu_tok_s": 2.0, "device_peak_bytes": None}
    memory = [t for t in _summary(cfg, [row])["targets"] if "memory" in t["target"]]
    assert [(t["target"], t["measured"], t["met"]) for t in memory] == [("peak memory (RSS), batch 1", 0.97, False)]
    memory = [t for t in _summary(cfg, [row | {"device_peak_bytes": 0.6}])["targets"] if "memory" in t["target"]]
    assert [(t["target"], t["measured"], t["met"]) for t in memory] == [("peak device memory, batch 1", 0.6, True)]


def test_analytic_flops_within_10_percent_of_the_counter(result):
    res, _ = result
    checks = {c["arch"]: c for c in res["flop_check"]}
    assert set(checks) == {"encdec", "deconly"}
    for c in checks.values():
        for part in ("prefill", "decode", "total"):
            assert abs(c["relative_error"][part]) < 0.10, (c["arch"], part, c)


@pytest.mark.parametrize("arch,dtype", [("encdec", "fp32"), ("deconly", "fp32"), ("encdec", "int8")])
def test_flop_formula_counts_attention_exactly(arch, dtype):
    # At L=96 on `tiny` attention is ~30% of the FLOPs: an uncounted SDPA would be far off. The products run whatever
    # this CPU's kernels are (oneDNN, mu's native ones, fbgemm): each is counted, none is a call the counter misses.
    runner = build_runner(ModelSpec(arch, "tiny"), dtype, CPU)
    ids = random_input_ids(1, 96, runner.vocab_size, 0, CPU)
    counted = count_generation_flops(runner, ids, 5)
    analytic = generation_flops(runner.config, 96, 5)
    for part in ("prefill", "decode"):
        assert analytic[part] == pytest.approx(counted[part], rel=0.01), part


@pytest.mark.parametrize("arch", ["encdec", "deconly"])
def test_replicated_batch_decodes_like_its_source_row(arch):
    runner = build_runner(ModelSpec(arch, "tiny"), torch.float32, CPU)
    ids = random_input_ids(1, 12, runner.vocab_size, 1, CPU)
    with torch.inference_mode():
        state, token = runner.prefill(ids, 4)
        wide = runner.copy(state)
        runner.expand(wide, 3)
        one = runner.step(state, token)
        three = runner.step(wide, token.repeat(3))
        reference = mu.generate(runner.model, ids, max_new_tokens=2)[:, -1]
    assert three.tolist() == [one.item()] * 3 and one.item() == reference.item()


@pytest.mark.parametrize("arch", ["encdec", "deconly"])
def test_steps_of_one_sequence_are_generates_tokens(arch):
    """A turn of the lock-step decode runs `steps`: for one sequence mu's greedy tokens in one native call where the
    CPU runs mu's native step (as `generate` does), the tokens of steps one at a time; several rows step."""
    runner = build_runner(ModelSpec(arch, "tiny"), torch.float32, CPU)
    ids = random_input_ids(1, 12, runner.vocab_size, 1, CPU)
    loops = []
    run = runner.model.greedy_tokens

    def counted(*args):
        got = run(*args)
        if got is not None:
            loops.append(args[2])
        return got

    runner.model.greedy_tokens = counted
    with torch.inference_mode():
        state, token = runner.prefill(ids, 8)
        wide = runner.copy(state)
        runner.expand(wide, 2)
        last = runner.steps(state, token, 6)
        both = runner.steps(wide, token.repeat(2), 6)
        reference = mu.generate(runner.model, ids, max_new_tokens=7)[:, -1]
    assert last.tolist() == reference.tolist() and both.tolist() == reference.tolist() * 2
    assert loops == ([6, 6] if native.decoder_step_available(torch.float32) else [])  # (steps, then generate)
    out = time_generation(runner, ids, 12, [1], replicate=True, device=CPU)
    assert len(out["steps_s"][1]) == 11 and all(s > 0 for s in out["steps_s"][1])


def test_compiled_steps_are_generate_compiled_tokens(monkeypatch):
    """`mu bench --compile`: the timed steps run as generate(compile=True) runs them (the compiled static step,
    counted), with generate's tokens; `step` (the FLOP count's) stays eager; formats without a compiled step are
    refused up front."""
    from mu.model import fast

    calls = []
    compile_decode = fast.compile_decode_
    monkeypatch.setattr(fast, "compile_decode_", lambda model: calls.append(1) or compile_decode(model))
    runner = build_runner(ModelSpec("encdec", "tiny"), torch.float32, CPU, compile=True)
    ids = random_input_ids(1, 12, runner.vocab_size, 1, CPU)
    with torch.inference_mode():
        state, token = runner.prefill(ids, 8)
        assert state.max_len == 64 and not state.static  # generate(compile=True)'s rounded cache
        runner.step(state, token)
        assert not calls
        last = runner.steps(state, token, 5)
        reference = mu.generate(runner.model, ids, max_new_tokens=7)[:, -1]
    assert last.tolist() == reference.tolist() and len(calls) == 5
    with pytest.raises(mu.MuError, match="compile runs float and int8"):
        BenchConfig(preset="tiny", dtypes=("int4",), compile=True)


@pytest.mark.parametrize("arch", ["hf-t5", "hf-llama"])
def test_hf_twins_match_size_and_run(arch):
    mu_arch = "encdec" if arch == "hf-t5" else "deconly"
    config = mu.MuConfig.from_name("tiny", mu_arch)
    runner = HFRunner(build_hf_model(arch, config, torch.float32, CPU), arch, CPU)
    mu_params = mu.build_model("tiny", arch=mu_arch).num_parameters()
    assert runner.describe()["params"] == pytest.approx(mu_params, rel=0.05)
    ids = random_input_ids(1, 10, config.vocab_size, 0, CPU)
    out = time_generation(runner, ids, 4, [1, 2], replicate=True, device=CPU)
    assert len(out["steps_s"][2]) == 3 and out["ttft_s"][1] > 0 and out["cache_bytes"][2] > out["cache_bytes"][1]


def test_mu_runner_reports_decode_weights():
    runner = build_runner(ModelSpec("encdec", "tiny"), torch.float32, CPU)
    assert isinstance(runner, MuRunner)
    c = runner.config
    cross_kv = c.n_decoder_layer * 2 * (c.n_embd * c.n_kv_head * c.head_dim + c.n_kv_head * c.head_dim)
    decoder = sum(p.numel() for p in runner.model.transformer.h.parameters())
    lm_head_and_norm = c.vocab_size * c.n_embd + c.n_embd
    assert runner.decode_weight_bytes() == 4 * (decoder - cross_kv + lm_head_and_norm)
    # a quantized format counts its stored bytes: int8 codes + one fp32 scale per output row (+ fp32 biases)
    q = build_runner(ModelSpec("encdec", "tiny"), "int8", CPU)
    assert q.model.quantization == "int8"
    assert 0.25 < q.decode_weight_bytes() / runner.decode_weight_bytes() < 0.35
    q4 = build_runner(ModelSpec("encdec", "tiny"), "int4", CPU)
    assert q4.decode_weight_bytes() < q.decode_weight_bytes()


def test_bench_runs_a_quantized_and_an_auto_format(tmp_path):
    from mu.model.quantize import auto_format

    r = run_benchmark(BenchConfig(preset="tiny", input_lengths=(16,), new_tokens=3, batch_sizes=(1,),
                                  dtypes=("auto", "int8wo"), repeats=1, warmup=0, memory=False, flop_check=False,
                                  out=None, plots=False, progress=False))
    assert {row["dtype"] for row in r["rows"]} == {auto_format("cpu"), "int8wo"}
    assert all(row["decode_tok_s"] > 0 for row in r["rows"])


def test_bench_times_mu_models_where_generate_puts_their_weights(monkeypatch):
    """`generate` moves a CPU model's weights onto huge pages (`huge_pages_`) before it decodes, which makes a 330m
    int8 step 1.12-1.18x faster on the development machine (docs/efficiency.md, round 17); the benchmark's timed mu
    models get the same move, so its decode figures are generate's."""
    import mu.bench.runner as bench_runner

    moved = []
    monkeypatch.setattr(bench_runner, "huge_pages_", lambda model: moved.append(model.config.arch) or model)
    run_benchmark(BenchConfig(preset="tiny", input_lengths=(8,), new_tokens=2, batch_sizes=(1,), repeats=1,
                              warmup=0, memory=False, flop_check=False, out=None, plots=False, progress=False))
    assert sorted(moved) == ["deconly", "encdec"]


@pytest.mark.parametrize("argv, message", [
    (["--input-lengths", "128,abc"], "--input-lengths: 'abc' is not a positive integer"),
    (["--batch-sizes", "0"], "--batch-sizes: '0' is not a positive integer"),
    (["--arch", "encdec,rnn"], "unknown arch"),
    (["--dtype", "fp8"], "unknown dtype 'fp8'"),
    (["--new-tokens", "1"], "new_tokens must be >= 2"),
    (["--repeats", "0"], "--repeats: expected a positive integer"),
    (["--input-lengths", "128,512", "--summary-length", "1024"], "summary_length 1024 is not one of"),
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--model", "/nonexistent/model"], "no model at"),
    (["--device", "tpu9"], "unknown device"),
])
def test_cli_bad_arguments_exit_2_with_a_clear_message(argv, message, capsys, tmp_path):
    assert main(["bench", "--out", str(tmp_path / "o"), "--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("arch", ["encdec", "deconly"])
def test_param_count_formula(arch):
    from mu.bench.flops import mu_param_count

    for preset in ("tiny", "small"):
        assert mu_param_count(mu.MuConfig.from_name(preset, arch)) == mu.build_model(preset, arch=arch).num_parameters()


def _gomp_binding(code: str) -> str:
    """The library that CTranslate2's `GOMP_parallel` binds to when `code` runs in a fresh interpreter."""
    bench_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    env = {**os.environ, "LD_DEBUG": "bindings", "PYTHONPATH": bench_dir}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [ln for ln in run.stderr.splitlines()
             if "libctranslate2" in ln.split(" to ")[0] and "`GOMP_parallel'" in ln]
    assert lines, "no binding of CTranslate2's GOMP_parallel seen"
    return lines[0].split(" to ", 1)[1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_DEBUG is glibc's")
def test_side_by_side_benchmark_keeps_ctranslate2_on_its_own_openmp_runtime():
    """Imported after torch, CTranslate2's OpenMP calls run in torch's libgomp and slow torch in that process
    (docs/efficiency.md); the benchmark imports it first, so each library keeps its own runtime."""
    pytest.importorskip("ctranslate2")
    after_torch = _gomp_binding("import torch, ctranslate2, ctranslate2._ext")
    assert "torch" in after_torch  # the trap the benchmark avoids (so this test can tell the two apart)
    benchmark = _gomp_binding("import generate_speed, ctranslate2._ext")
    assert "ctranslate2.libs" in benchmark and "torch" not in benchmark


def test_side_by_side_report_gives_every_issue19_target(monkeypatch, capsys):
    """The report's last line carries each target of the CPU-speed issue, from wall-clock and CPU-time medians
    (absent engines give None, not a number)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.syspath_prepend(os.path.join(repo, "benchmarks"))
    import generate_speed

    def row(dtype, ttft, tok_s, roofline_tok_s=None):
        r = {"dtype": dtype, "decode_weight_bytes": 2**20}
        for p in ("", "cpu_"):
            r.update({p + "ttft_s": ttft, p + "decode_tok_s": tok_s, p + "e2e_s": ttft + 64 / tok_s})
        r.update({k + "_range": [r[k], r[k]] for k in ("ttft_s", "decode_tok_s", "e2e_s")})
        if roofline_tok_s:
            r.update(roofline_tok_s=roofline_tok_s, roofline_fraction=tok_s / roofline_tok_s)
        return r

    results = {"mu-encdec-fp32": row("fp32", 1.3, 40.0, 65.0), "mu-encdec-fp32-compiled": row("fp32", 1.3, 52.0, 65.0),
               "mu-encdec-bf16": row("bf16", 0.9, 70.0, 130.0),
               "mu-encdec-int8": row("int8", 0.75, 130.0, 260.0), "ct2-t5-int8": row("int8", 0.70, 80.0, 262.0),
               "hf-t5-fp32": row("fp32", 1.35, 24.0, 66.0)}
    info = {"isa": "AVX2", "read_bandwidth_bytes_per_s": 35e9, "threads": 2, "preset": "330m", "input_len": 512,
            "new_tokens": 64, "isolated": False, "loadavg_start": 0.0}
    def last_line():
        generate_speed.report(results, {}, info)
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    report = last_line()
    ratios, cpu_ratios = report["ratios"], report["cpu_ratios"]
    assert ratios["best_mu"] == "mu-encdec-int8" and ratios["best_ct2"] == "ct2-t5-int8"
    assert ratios["issue19_decode_best_mu_vs_best_ct2"] == pytest.approx(130 / 80)
    assert ratios["issue19_ttft_best_mu_over_best_ct2"] == pytest.approx(0.75 / 0.70)
    assert ratios["issue19_ttft_mu_fp32_over_hf_t5_fp32"] == pytest.approx(1.3 / 1.35)
    assert ratios["issue19_decode_roofline_best_mu"] == pytest.approx(0.5)
    assert ratios["issue19_decode_roofline_mu_fp32"] == pytest.approx(0.8)  # each format's best engine
    assert ratios["issue19_decode_roofline_mu_int8"] == pytest.approx(0.5)
    assert ratios["issue19_bf16_decode_over_fp32"] == pytest.approx(70 / 40)
    assert cpu_ratios["issue19_decode_best_mu_vs_best_ct2"] == pytest.approx(130 / 80)
    assert cpu_ratios["issue19_decode_roofline_best_mu"] is None  # CPU seconds count both threads
    assert cpu_ratios["issue19_decode_roofline_mu_fp32"] is None
    del results["mu-encdec-bf16"]
    assert last_line()["ratios"]["issue19_bf16_decode_over_fp32"] is None


@pytest.mark.parametrize("arch", ["encdec", "deconly"])
def test_step_read_bound_reads_the_decode_steps_weights(monkeypatch, arch):
    """benchmarks/step_read_bound.py's pieces are the weights of the products a decode step runs: every linear
    layer of the decoder blocks and the head, but the cross-attention K/V projections (once per request)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.syspath_prepend(os.path.join(repo, "benchmarks"))
    from step_read_bound import step_pieces

    model = mu.build_model("tiny", arch=arch)
    blocks = {id(m) for m in model.decoder_blocks().modules()}
    once = {id(b.cross_attn.k_linear) for b in model.decoder_blocks() if hasattr(b, "cross_attn")}
    once |= {id(b.cross_attn.v_linear) for b in model.decoder_blocks() if hasattr(b, "cross_attn")}
    read = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and id(m) not in once
            and (id(m) in blocks or m is model.lm_head)]
    pieces = step_pieces(model.config, 2)
    assert sum(pieces) == 2 * sum(m.weight.numel() for m in read)
    per_block = 6 if arch == "encdec" else 4
    assert len(pieces) == per_block * model.config.n_decoder_layer + 1
    assert pieces[-1] == 2 * model.lm_head.weight.numel()
