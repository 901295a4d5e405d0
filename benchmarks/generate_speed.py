"""Generation speed on this machine: mu's cached generation vs the paper's uncached loop, Hugging Face T5
and CTranslate2, in one run.

    .venv/bin/python benchmarks/generate_speed.py            # 330m, batch 1, 512 input tokens, 128 new
    .venv/bin/python benchmarks/generate_speed.py --quick    # "small" sizes, 128 in / 32 new (a minute)
    .venv/bin/python benchmarks/generate_speed.py --side-by-side   # issue 19's table: mu formats vs CT2 vs HF T5
    .venv/bin/python benchmarks/generate_speed.py --side-by-side --isolate   # the same, each engine in its own process

Every run prints the ISA (`mu.utils.cpu_isa()`) and thread count, measures the streaming-read bandwidth
with the same threads (sum of a 512 MiB fp32 tensor on huge pages where the system gives them,
`mu.bench.measure.read_bandwidth`) before the first timed run and after each one, and gives each engine's decode
roofline fraction: bytes of weights one decode token reads (decoder without the cross-attention K/V projections, +
lm_head, in the engine's format) x decode tokens/s / the bandwidth measured around that run (the mean of the reads
just before and just after it), the median over repeats (1.0 = memory-bound). On a shared host the memory's rate
moves by tens of percent within minutes; one reading for the whole run made fractions above 1 possible.

Engines (all random weights, greedy, batch 1, never stopping early):
  mu-encdec / mu-deconly  fp32, bf16, int8 (`model.quantize_("int8")`), int8wo, int4 (weight-only decode
                          kernels, `mu.model.quantize`): `model.generate` with a KV cache;
                          "-compiled" (fp32, bf16, int8): generate(compile=True) (fixed-shape cache, torch.compile'd
                          steps; compiled during the warm-up, which runs the full length for these)
  mu-encdec uncached      the paper's `generate`: encode once, then every step re-runs the whole decoder
                          (and the lm_head) over the full prefix, no cache; built from the model's own
                          uncached `encode` / `decode`, so the kernels are the same
  hf-t5                   `T5ForConditionalGeneration.generate` (use_cache, min_new_tokens = max_new_tokens)
                          of the same size: d_model, heads x d_kv, 20/10 layers, ReLU MLP with d_ff 3840
  ct2-t5                  that T5 converted by `ctranslate2.converters.TransformersConverter` (float32, int8),
                          `Translator.generate_tokens`, when ctranslate2 is installed

Each repeat runs every engine once, in turn (interleaved, so load from other processes spreads over all
of them; `--isolate` runs each engine in a process of its own instead); the table shows medians over repeats and
the min-max spread. ctranslate2 is imported before torch, so that it keeps its own OpenMP runtime: imported after,
its parallel regions run in torch's libgomp and slow every torch engine of the process (docs/efficiency.md).
TTFT = prompt in -> first new token out (encoder + cross K/V + first decoder step + pick); decode tokens/s =
(new - 1) / (last token time - first token time); end to end = the whole call. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Callable, Optional


def _ct2_wanted(argv: list[str]) -> bool:
    """Whether this run's engines include a CTranslate2 one (read before argparse: the import must precede torch's)."""
    if "--no-ct2" in argv:
        return False
    engines = next((argv[i + 1] if a == "--engines" and i + 1 < len(argv) else a.split("=", 1)[1]
                    for i, a in enumerate(argv) if a == "--engines" or a.startswith("--engines=")), "all")
    return engines == "all" or "ct2-" in engines


ctranslate2 = None
if _ct2_wanted(sys.argv[1:]):
    try:
        # Before torch, on purpose: CTranslate2's wheel bundles its own libgomp, but its OpenMP calls bind to the first
        # GOMP_* symbols in the process's global scope, which are torch's once torch is loaded. CTranslate2's worker
        # thread then opens a second team in torch's runtime; with more OpenMP threads than CPUs, libgomp cuts the
        # spin-wait of every team to ~100 iterations, so torch's workers sleep between parallel regions (mu's decode
        # 143 -> 118 tok/s in one process, docs/efficiency.md). Loaded first, CTranslate2 binds to its own libgomp.
        # Only when a CTranslate2 engine runs: on the AVX-512 machine of round 10 the import alone slowed torch's
        # decode by ~18% (fp32 34.2 vs 41.5 tok/s), so `--isolate` runs each mu engine in a process without it.
        import ctranslate2  # noqa: F401
    except ImportError:
        pass

import torch

import mu
from mu.bench.measure import read_bandwidth, stream_tensor
from mu.bench.models import decode_weight_bytes
from mu.config import MuConfig
from mu.model import native
from mu.model.quantize import int8_kernels
from mu.utils import cpu_isa


class Stamps:
    """A streamer that records when each token arrives, in wall-clock and in process CPU time."""

    def __init__(self):
        self.times: list[float] = []
        self.cpu: list[float] = []

    def put(self, _tokens) -> None:
        self.times.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def end(self) -> None:
        pass


def timed(fn: Callable[[Stamps], object], new_tokens: int, skip_first_put: bool = False) -> dict:
    """Run fn(stamps); derive TTFT, decode tokens/s and end-to-end seconds from the token times.

    The same three numbers are also derived from process CPU time (`cpu_*`): with one thread on a
    machine shared with other jobs, CPU seconds are what the run would take alone, while wall-clock
    seconds depend on how many other processes were runnable (with more threads, CPU time also counts
    time spent spinning at barriers, so it is only a proxy there).
    """
    stamps = Stamps()
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(stamps)
    t1, c1 = time.perf_counter(), time.process_time()
    skip = 1 if skip_first_put else 0
    times, cpu = stamps.times[skip:], stamps.cpu[skip:]
    if len(times) != new_tokens:
        raise RuntimeError(f"expected {new_tokens} token times, got {len(times)}")

    def rate(t):
        return (new_tokens - 1) / (t[-1] - t[0]) if new_tokens > 1 else float("nan")

    return {"ttft_s": times[0] - t0, "decode_tok_s": rate(times), "e2e_s": t1 - t0,
            "cpu_ttft_s": cpu[0] - c0, "cpu_decode_tok_s": rate(cpu), "cpu_e2e_s": c1 - c0, "out": out}


# ---------------------------------------------------------------------------------------------
# Engines: name -> callable(stamps, new_tokens) -> tokens


def mu_engine(model, input_ids: torch.Tensor, compile: bool = False):
    def run(stamps: Stamps, new_tokens: int):
        out = model.generate(input_ids, max_new_tokens=new_tokens, streamer=stamps, compile=compile)
        return out[0, -new_tokens:].tolist()

    run.decode_bytes = decode_weight_bytes(model)
    return run


def mu_uncached_engine(model, input_ids: torch.Tensor, bos: int = 1):
    """The paper's Mu.generate, greedy: encode once, then decode the whole prefix at every step."""

    @torch.inference_mode()
    def run(stamps: Stamps, new_tokens: int):
        enc_out, valid = model.encode(input_ids)
        dec = torch.full((input_ids.shape[0], 1), bos, dtype=torch.long)
        for _ in range(new_tokens):
            logits = model.lm_head(model.decode(dec, enc_out, valid))  # (B, T, V): all positions, as the paper
            token = logits[:, -1].argmax(-1, keepdim=True)
            dec = torch.cat([dec, token], dim=1)
            stamps.put(token)
        return dec[0, 1:].tolist()

    return run


def hf_t5_config(c: MuConfig):
    """T5 v1.0 layout (ReLU MLP, tied embeddings) with mu's width, heads x head_dim and depths; d_ff = 15/16
    of mu's hidden_dim (3840 at 330m: parameter counts then match, T5 having no GQA and no biases)."""
    from transformers import T5Config

    d_ff = round(c.hidden_dim * 15 / 16 / 16) * 16
    return T5Config(vocab_size=c.vocab_size, d_model=c.n_embd, d_kv=c.head_dim, d_ff=d_ff, num_layers=c.n_encoder_layer,
                    num_decoder_layers=c.n_decoder_layer, num_heads=c.n_head, feed_forward_proj="relu",
                    dropout_rate=0.0, tie_word_embeddings=True, decoder_start_token_id=0, pad_token_id=0,
                    eos_token_id=1)


def hf_engine(model, input_ids: torch.Tensor):
    @torch.inference_mode()
    def run(stamps: Stamps, new_tokens: int):
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, num_beams=1, use_cache=True, streamer=stamps)
        return out[0, 1:].tolist()

    run.decode_bytes = t5_decode_bytes(model, 4 if model.dtype == torch.float32 else 2)
    return run


def t5_decode_bytes(model, bytes_per_weight: float) -> int:
    """Weights one T5 decode step reads (decoder blocks without the cross-attention k/v, final norm, lm_head),
    at `bytes_per_weight` per matrix entry (+ one fp32 scale per output row when below 2 bytes)."""
    total = 0
    for name, p in model.named_parameters(remove_duplicate=False):
        dec = name.startswith("decoder.block.") and not (".EncDecAttention.k." in name or ".EncDecAttention.v." in name)
        if dec or name.startswith("decoder.final_layer_norm") or name == "lm_head.weight":
            if p.dim() == 2 and "relative_attention_bias" not in name:
                total += int(p.numel() * bytes_per_weight) + (4 * p.shape[0] if bytes_per_weight < 2 else 0)
            else:
                total += p.numel() * 4
    return total


class _Vocab:
    """The little a CTranslate2 converter needs from a tokenizer, for random-weight models without one."""

    pad_token, eos_token, unk_token = "<pad>", "</s>", "<unk>"

    def __init__(self, size: int):
        self.tokens = [self.pad_token, self.eos_token, self.unk_token] + [f"t{i}" for i in range(3, size)]

    def get_vocab(self) -> dict:
        return {t: i for i, t in enumerate(self.tokens)}

    def convert_ids_to_tokens(self, i: int) -> str:
        return self.tokens[i]


def convert_ct2(hf_model, out_dir: str, quantization: str) -> str:
    """Convert an in-memory HF T5 to CTranslate2 (only its config goes through disk)."""
    cfg_dir = os.path.join(out_dir, "hf-config")
    hf_model.config.save_pretrained(cfg_dir)

    class InMemory(ctranslate2.converters.TransformersConverter):
        def load_model(self, model_class, name, **kwargs):
            return hf_model

        def load_tokenizer(self, tokenizer_class, name, **kwargs):
            return _Vocab(hf_model.config.vocab_size)

    path = os.path.join(out_dir, f"ct2-{quantization}")
    InMemory(cfg_dir).convert(path, quantization=quantization, force=True)
    return path


def ct2_engine(path: str, compute_type: str, input_ids: torch.Tensor, threads: int, decode_bytes: int):
    translator = ctranslate2.Translator(path, device="cpu", compute_type=compute_type, intra_threads=threads)
    vocab = _Vocab(0)
    source = [f"t{i}" if i >= 3 else vocab.tokens[i] for i in input_ids[0].tolist()]

    def run(stamps: Stamps, new_tokens: int):
        ids = []
        for step in translator.generate_tokens(source, max_decoding_length=new_tokens, min_decoding_length=new_tokens,
                                               end_token=[]):
            stamps.put(step.token_id)
            ids.append(step.token_id)
        return ids

    run.decode_bytes = decode_bytes
    return run


# ---------------------------------------------------------------------------------------------


def kernels() -> dict:
    """Which kernels mu's int8 and float engines run on this machine, for the header and the JSON."""
    native_gemv = [name for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
                   if native.gemv_available(dtype)]
    steps = [name for name, kind in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("int8", "int8"))
             if native.decoder_step_available(kind)]
    return {"int8_kernels": int8_kernels(),
            "float_decode_kernel": f"mu's AVX-512 GEMV for {' and '.join(native_gemv)}" if native_gemv
            else "PyTorch's (fp32: split_linear)",
            "decode_step": f"one native call for {', '.join(steps)} (library built for {native.build_isa()})" if steps
            else "the modules"}


def build_mu(preset: str, arch: str, seed: int):
    torch.manual_seed(seed)
    return mu.build_model(preset, arch=arch).eval()


SIDE_BY_SIDE = ("mu-encdec-fp32,mu-encdec-fp32-compiled,mu-encdec-int8,mu-encdec-int8-compiled,mu-encdec-int8dec,"
                "mu-encdec-int8wo,mu-encdec-int4,ct2-t5-fp32,ct2-t5-int8,hf-t5-fp32")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes: preset small, 128 input tokens, 32 new")
    p.add_argument("--preset", default=None, help="mu preset (default 330m; small with --quick)")
    p.add_argument("--input-len", type=int, default=None, help="input tokens (default 512; 128 with --quick)")
    p.add_argument("--new-tokens", type=int, default=None, help="new tokens (default 128; 32 with --quick)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per engine (interleaved)")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch / CTranslate2 threads")
    p.add_argument("--engines", default="all",
                   help="comma list of engine names to run (see the table), or 'all'")
    p.add_argument("--no-uncached", action="store_true", help="skip the paper's uncached loop (the slowest engine)")
    p.add_argument("--no-hf", action="store_true", help="skip Hugging Face T5")
    p.add_argument("--no-ct2", action="store_true", help="skip CTranslate2")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd mu engines (minutes to compile)")
    p.add_argument("--side-by-side", action="store_true",
                   help="issue 19's engines only: mu encdec fp32/fp32-compiled/int8/int8-compiled/int8dec/int8wo/int4, "
                        "CT2 fp32/int8, "
                        "HF T5 fp32; bf16 and bf16-compiled too where the CPU has AVX-512-BF16")
    p.add_argument("--isolate", action="store_true",
                   help="run each engine in its own process, one after another (needs --engines or --side-by-side): "
                        "no engine's runtime or thread pools share a process with another's")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.side_by_side and args.engines == "all":
        # bf16 where the CPU multiplies it natively (elsewhere it is emulated: seconds to the first token)
        args.engines = SIDE_BY_SIDE + (",mu-encdec-bf16,mu-encdec-bf16-compiled" if "bf16" in cpu_isa() else "")
    if args.isolate:
        return run_isolated(args)
    preset = args.preset or ("small" if args.quick else "330m")
    L = args.input_len or (128 if args.quick else 512)
    N = args.new_tokens or (32 if args.quick else 128)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()

    gen = torch.Generator().manual_seed(args.seed)
    cfg = MuConfig.from_name(preset)
    input_ids = torch.randint(3, cfg.vocab_size, (1, L), generator=gen)
    engines: dict[str, Callable] = {}
    meta: dict[str, dict] = {}

    def add(name: str, arch: str, dtype: str, make: Callable[[], Callable], skip_first_put: bool = False,
            full_warmup: bool = False):
        if args.engines != "all" and name not in args.engines.split(","):
            return
        engines[name] = make()
        meta[name] = {"arch": arch, "dtype": dtype, "skip_first_put": skip_first_put, "full_warmup": full_warmup,
                      "decode_weight_bytes": getattr(engines[name], "decode_bytes", None)}

    # mu, both architectures; the bf16 and int8 copies are made from the same fp32 weights
    for arch in ("encdec", "deconly"):
        if args.engines != "all" and not any(e.startswith(f"mu-{arch}-") for e in args.engines.split(",")):
            continue  # no engine of this architecture asked for: do not build it
        base = build_mu(preset, arch, args.seed)
        add(f"mu-{arch}-fp32", arch, "fp32", lambda m=base: mu_engine(m, input_ids))
        if not args.no_compile:
            add(f"mu-{arch}-fp32-compiled", arch, "fp32", lambda m=base: mu_engine(m, input_ids, compile=True),
                full_warmup=True)
        if arch == "encdec" and not args.no_uncached:
            add("mu-encdec-fp32-uncached", arch, "fp32", lambda m=base: mu_uncached_engine(m, input_ids))
        if arch == "encdec":
            add("mu-encdec-bf16", arch, "bf16",
                lambda m=base: mu_engine(copy.deepcopy(m).to(torch.bfloat16), input_ids))
            if not args.no_compile:
                add("mu-encdec-bf16-compiled", arch, "bf16",
                    lambda m=base: mu_engine(copy.deepcopy(m).to(torch.bfloat16), input_ids, compile=True),
                    full_warmup=True)
        add(f"mu-{arch}-int8", arch, "int8", lambda m=base: mu_engine(copy.deepcopy(m).quantize_("int8"), input_ids))
        if not args.no_compile:
            add(f"mu-{arch}-int8-compiled", arch, "int8",
                lambda m=base: mu_engine(copy.deepcopy(m).quantize_("int8"), input_ids, compile=True), full_warmup=True)
        if arch == "encdec":
            for mode, label in (("int8wo", "int8 wo dec, int8 pre"), ("int4", "int4 g64 dec, int8 pre")):
                add(f"mu-encdec-{mode}", arch, label,
                    lambda m=base, mode=mode: mu_engine(copy.deepcopy(m).quantize_(mode), input_ids))
        if arch == "encdec":
            add("mu-encdec-int8dec", arch, "fp32 enc + int8 dec",
                lambda m=base: mu_engine(copy.deepcopy(m).quantize_("int8", include_encoder=False), input_ids))

    tmp = tempfile.TemporaryDirectory(prefix="generate_speed-")
    if not args.no_hf:
        import transformers
        from transformers import T5ForConditionalGeneration

        transformers.logging.set_verbosity_error()
        torch.manual_seed(args.seed)
        hf = T5ForConditionalGeneration(hf_t5_config(cfg)).eval()
        hf_ids = input_ids.clone()
        hf_ids[hf_ids == 1] = 2  # no early EOS in the prompt
        add("hf-t5-fp32", "encdec", "fp32", lambda: hf_engine(hf, hf_ids), skip_first_put=True)
        add("hf-t5-bf16", "encdec", "bf16", lambda: hf_engine(copy.deepcopy(hf).to(torch.bfloat16), hf_ids),
            skip_first_put=True)
        if not args.no_ct2 and (args.engines == "all" or "ct2-" in args.engines):  # (asked for: imported above)
            if ctranslate2 is None:
                print("ctranslate2 is not installed: skipping it", file=sys.stderr)
            else:
                for quant, compute in (("float32", "float32"), ("int8", "int8")):
                    name = f"ct2-t5-{'fp32' if quant == 'float32' else quant}"
                    if args.engines == "all" or name in args.engines.split(","):
                        path = convert_ct2(hf, tmp.name, quant)
                        nbytes = t5_decode_bytes(hf, 4 if compute == "float32" else 1)
                        add(name, "encdec", compute, lambda path=path, compute=compute, nbytes=nbytes: ct2_engine(
                            path, compute, input_ids, args.threads, nbytes))

    names = list(engines)
    isa = cpu_isa()
    stream = stream_tensor(512 << 20)
    bws = [read_bandwidth(stream)]  # and again after each timed run: the memory's rate moves on a shared host
    print(f"# ISA {isa}, {args.threads} threads; streaming read (sum of 512 MiB fp32, {args.threads} threads) "
          f"{bws[0] / 1e9:.1f} GB/s", file=sys.stderr)
    print(f"# {preset}, batch 1, {L} input tokens, {N} new, {args.threads} threads, {args.repeats} repeats; "
          f"engines: {', '.join(names)}", file=sys.stderr)
    for name in names:  # warm-up: allocators, thread pools, packed weights; compiled engines compile here
        warm = N if meta[name]["full_warmup"] else min(N, 8)
        t0 = time.perf_counter()
        timed(lambda s, name=name, warm=warm: engines[name](s, warm), warm, meta[name]["skip_first_put"])
        print(f"  warm-up {name:26s} {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    tokens: dict[str, list[int]] = {}
    for r in range(args.repeats):
        for name in names:
            res = timed(lambda s, name=name: engines[name](s, N), N, meta[name]["skip_first_put"])
            tokens[name] = res.pop("out")
            bws.append(read_bandwidth(stream))
            res["read_bandwidth"] = (bws[-2] + bws[-1]) / 2  # just before and just after this run
            runs[name].append(res)
            print(f"  repeat {r + 1} {name:26s} ttft {res['ttft_s']:.3f}s  decode {res['decode_tok_s']:.1f} tok/s  "
                  f"e2e {res['e2e_s']:.2f}s | cpu: ttft {res['cpu_ttft_s']:.3f}s decode {res['cpu_decode_tok_s']:.1f} "
                  f"tok/s e2e {res['cpu_e2e_s']:.2f}s", file=sys.stderr)

    results = {}
    for name in names:
        row = dict(meta[name])
        row.pop("skip_first_put")
        row.pop("full_warmup")
        for k in ("ttft_s", "decode_tok_s", "e2e_s", "cpu_ttft_s", "cpu_decode_tok_s", "cpu_e2e_s"):
            vals = [r[k] for r in runs[name]]
            row[k] = statistics.median(vals)
            row[k + "_range"] = [min(vals), max(vals)]
        if row.get("decode_weight_bytes"):  # each repeat against the bandwidth measured around it
            row["roofline_tok_s"] = (statistics.median(r["read_bandwidth"] for r in runs[name])
                                     / row["decode_weight_bytes"])
            row["roofline_fraction"] = statistics.median(r["decode_tok_s"] * row["decode_weight_bytes"]
                                                         / r["read_bandwidth"] for r in runs[name])
        results[name] = row
    bw = statistics.median(bws)

    checks = {}
    if "mu-encdec-fp32" in tokens and "mu-encdec-fp32-uncached" in tokens:
        checks["uncached_tokens_equal_cached"] = tokens["mu-encdec-fp32"] == tokens["mu-encdec-fp32-uncached"]
    report(results, checks, {"isa": isa, "read_bandwidth_bytes_per_s": bw,
                             "read_bandwidth_range": [min(bws), max(bws)], "preset": preset, "input_len": L,
                             "new_tokens": N, "batch": 1, "threads": args.threads, "repeats": args.repeats,
                             "torch": torch.__version__, "cpu_count": os.cpu_count(), "loadavg_start": load_start[0],
                             "isolated": False, **kernels()})
    tmp.cleanup()
    return 0


def run_isolated(args) -> int:
    """`--isolate`: every engine in a process of its own (this script with `--engines NAME`), one after another;
    their rows, merged, go through the same report: a check that no engine changes another's speed in one process."""
    import subprocess

    if args.engines == "all":
        raise SystemExit("--isolate needs the engines named: --engines a,b,... or --side-by-side")
    flags = ["--threads", str(args.threads), "--repeats", str(args.repeats), "--seed", str(args.seed)]
    for flag, value in (("--preset", args.preset), ("--input-len", args.input_len), ("--new-tokens", args.new_tokens)):
        if value is not None:
            flags += [flag, str(value)]
    flags += ["--quick"] if args.quick else []
    load_start = os.getloadavg()
    results, checks, runs = {}, {}, []
    for name in args.engines.split(","):
        child = subprocess.run([sys.executable, os.path.abspath(__file__), *flags, "--engines", name],
                               capture_output=True, text=True)
        sys.stderr.write(child.stderr)
        if child.returncode != 0:
            raise SystemExit(f"engine {name}: its process exited with status {child.returncode}")
        run = json.loads(child.stdout.strip().splitlines()[-1])
        if name not in run["results"]:
            raise SystemExit(f"engine {name}: unknown here, or not available (see the messages above)")
        results[name] = run["results"][name]
        checks.update(run["checks"])
        runs.append(run)
    bws = [r["read_bandwidth_bytes_per_s"] for r in runs]
    report(results, checks, {**{k: runs[0][k] for k in ("isa", "preset", "input_len", "new_tokens", "batch", "threads",
                                                        "repeats", "torch", "cpu_count")},
                             "read_bandwidth_bytes_per_s": statistics.median(bws),
                             "read_bandwidth_range": [min(bws), max(bws)],
                             "loadavg_start": load_start[0], "isolated": True, **kernels()})
    return 0


def report(results: dict, checks: dict, info: dict) -> None:
    """Print the table, the issue's ratios and the last line's JSON for `results` (engine -> medians)."""

    def ratio(a: Optional[str], b: str, key: str, invert: bool = False) -> Optional[float]:
        if a not in results or b not in results:
            return None
        x, y = results[a][key], results[b][key]
        return y / x if invert else x / y

    def target_ratios(p: str) -> dict:
        """The issue's ratios from wall-clock (p = "") or CPU-time (p = "cpu_") medians."""
        best = min((n for n in results if n.startswith("mu-encdec") and "uncached" not in n),
                   key=lambda n: results[n][p + "e2e_s"], default=None)  # the fastest request end to end
        best_ct2 = min((n for n in results if n.startswith("ct2-")), key=lambda n: results[n][p + "e2e_s"],
                       default=None)
        return {
            # issue 19: best mu vs best CTranslate2 (decode >= 1.5, first token <= 1.0), fp32 TTFT vs HF T5 (<= 1.0)
            "best_ct2": best_ct2,
            "issue19_decode_best_mu_vs_best_ct2": ratio(best, best_ct2, p + "decode_tok_s"),
            "issue19_ttft_best_mu_over_best_ct2": ratio(best, best_ct2, p + "ttft_s"),
            "issue19_ttft_mu_fp32_over_hf_t5_fp32": ratio("mu-encdec-fp32", "hf-t5-fp32", p + "ttft_s"),
            # >= 0.80 "for its format": the best mu engine's, and each format's best; wall clock only (CPU seconds
            # add up both threads)
            "issue19_decode_roofline_best_mu": None if p else results.get(best, {}).get("roofline_fraction"),
            **{f"issue19_decode_roofline_mu_{fmt}": None if p else max(
                (r["roofline_fraction"] for n, r in results.items()
                 if n.startswith("mu-encdec") and r["dtype"] == fmt and r.get("roofline_fraction")), default=None)
               for fmt in ("fp32", "int8", "bf16")},
            # >= 1.7 where the CPU has AVX-512-BF16 or AMX (`--engines` must name both): eager, and compiled
            "issue19_bf16_decode_over_fp32": ratio("mu-encdec-bf16", "mu-encdec-fp32", p + "decode_tok_s"),
            "issue19_bf16_compiled_decode_over_fp32_compiled": ratio("mu-encdec-bf16-compiled",
                                                                     "mu-encdec-fp32-compiled", p + "decode_tok_s"),
            # target 1: end-to-end speed-up of cached generation over the paper's uncached loop (fp32), >= 3.5
            "e2e_speedup_vs_uncached": ratio("mu-encdec-fp32", "mu-encdec-fp32-uncached", p + "e2e_s", invert=True),
            # target 2: decode tokens/s vs HF T5 generate (fp32), >= 1.2
            "decode_vs_hf_t5_fp32": ratio("mu-encdec-fp32", "hf-t5-fp32", p + "decode_tok_s"),
            "decode_compiled_vs_hf_t5_fp32": ratio("mu-encdec-fp32-compiled", "hf-t5-fp32", p + "decode_tok_s"),
            "decode_vs_hf_t5_bf16": ratio("mu-encdec-bf16", "hf-t5-bf16", p + "decode_tok_s"),
            "ttft_speedup_vs_hf_t5_fp32": ratio("mu-encdec-fp32", "hf-t5-fp32", p + "ttft_s", invert=True),
            # the aim beyond: our best CPU dtype vs CTranslate2 (>= 1 means we match or beat it)
            "best_mu": best,
            "decode_best_mu_vs_ct2_int8": ratio(best, "ct2-t5-int8", p + "decode_tok_s"),
            "ttft_speedup_best_mu_vs_ct2_int8": ratio(best, "ct2-t5-int8", p + "ttft_s", invert=True),
            "e2e_speedup_best_mu_vs_ct2_int8": ratio(best, "ct2-t5-int8", p + "e2e_s", invert=True),
            "decode_mu_fp32_vs_ct2_fp32": ratio("mu-encdec-fp32", "ct2-t5-fp32", p + "decode_tok_s"),
            "decode_mu_int8_vs_ct2_int8": ratio("mu-encdec-int8", "ct2-t5-int8", p + "decode_tok_s"),
            "ttft_speedup_mu_int8_vs_ct2_int8": ratio("mu-encdec-int8", "ct2-t5-int8", p + "ttft_s", invert=True),
            "decode_encdec_vs_deconly_int8": ratio("mu-encdec-int8", "mu-deconly-int8", p + "decode_tok_s"),
            "decode_encdec_vs_deconly_fp32": ratio("mu-encdec-fp32", "mu-deconly-fp32", p + "decode_tok_s"),
        }

    ratios = target_ratios("")
    cpu_ratios = target_ratios("cpu_")
    isa, bw = info["isa"], info["read_bandwidth_bytes_per_s"]
    spread = info.get("read_bandwidth_range")
    spread = f" ({spread[0] / 1e9:.1f}-{spread[1] / 1e9:.1f})" if spread else ""
    print(f"ISA {isa}, {info['threads']} threads, streaming read bandwidth {bw / 1e9:.1f}{spread} GB/s; "
          f"{info['preset']}, "
          f"batch 1, {info['input_len']} input tokens, {info['new_tokens']} new"
          + (", each engine in its own process" if info["isolated"] else "")
          + (f"; mu's int8 kernels: {info['int8_kernels']}" if info.get("int8_kernels") else "")
          + (f"; float decode: {info['float_decode_kernel']}" if info.get("float_decode_kernel") else "")
          + (f"; a batch-1 decode step: {info['decode_step']}" if info.get("decode_step") else ""))
    header = (f"{'engine':26s} {'dtype':22s} {'TTFT s':>18s} {'decode tok/s':>18s} {'end-to-end s':>20s}"
              f" {'MiB/tok':>7s} {'roofl.':>6s} {'frac':>5s} | {'CPU: TTFT s':>11s} {'tok/s':>6s} {'e2e s':>7s}")
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        def cell(k, fmt):
            lo, hi = r[k + "_range"]
            return f"{fmt.format(r[k])} ({fmt.format(lo)}-{fmt.format(hi)})"
        roof = (f"{r['decode_weight_bytes'] / 2**20:7.0f} {r['roofline_tok_s']:6.0f} {r['roofline_fraction']:5.2f}"
                if r.get("roofline_fraction") else f"{'-':>7s} {'-':>6s} {'-':>5s}")
        print(f"{name:26s} {r['dtype']:22s} {cell('ttft_s', '{:.2f}'):>18s} {cell('decode_tok_s', '{:.1f}'):>18s} "
              f"{cell('e2e_s', '{:.2f}'):>20s} {roof} | {r['cpu_ttft_s']:11.2f} {r['cpu_decode_tok_s']:6.1f} "
              f"{r['cpu_e2e_s']:7.2f}")
    print("medians over repeats (min-max in brackets); CPU = process CPU seconds (see `timed`); MiB/tok = weights "
          "one decode token reads; roofl. = bandwidth / that (tokens/s); frac = decode tokens/s x MiB/tok / the "
          "bandwidth read around each repeat (median over repeats)")
    print(f"  {'ratio':34s} {'wall':>8s} {'CPU':>8s}")
    for k, v in ratios.items():
        def fmt(x):
            return "-" if x is None else x if isinstance(x, str) else f"{x:.2f}"
        print(f"  {k:34s} {fmt(v):>8s} {fmt(cpu_ratios[k]):>8s}")
    for k, v in checks.items():
        print(f"  {k}: {v}")
    load_end = os.getloadavg()
    print(f"  load average (1 min) at start {info['loadavg_start']:.2f}, at end {load_end[0]:.2f} on "
          f"{os.cpu_count()} CPUs")
    print(json.dumps({**info, "loadavg_end": load_end[0], "results": results, "ratios": ratios,
                      "cpu_ratios": cpu_ratios, "checks": checks}))


if __name__ == "__main__":
    sys.exit(main())
