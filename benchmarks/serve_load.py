"""Load test of `mu serve` on loopback: throughput and latency with 1, 4, 16 and 64 concurrent clients,
the encoder-decoder vs its decoder-only twin under the same load.

    flock -x /tmp/mu-cpu.lock .venv/bin/python benchmarks/serve_load.py          # small preset, both archs
    .venv/bin/python benchmarks/serve_load.py --quick                             # tiny preset, a smoke run

For each architecture a random-weight model of the preset is saved to a temporary directory and served by a
`mu serve` subprocess on 127.0.0.1 (one model copy, continuous batching, --max-batch 64 so that 64 clients
can decode together). Each level runs C closed-loop clients: every client sends its requests one after the
other over one keep-alive connection, each a non-streaming /v1/completions request with a 256-token prompt
(token ids, different for every request) and max_tokens 64 with ignore_eos, so every answer is exactly 64
tokens. A level sends max(2, 8 // C) requests per client and stops starting new ones after --time-limit
seconds. Reported per level: generated tokens / wall time of the level, p50 and p99 end-to-end latency,
and from the server's /metrics the mean decode batch and the mean time to first token (request in the
engine -> first token). Warm-up: 4 requests before the first level. Traffic goes to loopback only; the
server is stopped at the end. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import mu
from mu.tokenizer import byte_tokenizer


def isa() -> dict:
    flags = set()
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu": model, "torch_capability": torch.backends.cpu.get_cpu_capability(),
            "avx512_bf16": "avx512_bf16" in flags, "amx": "amx_tile" in flags, "cores": os.cpu_count()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model_dir: str, port: int, threads: int, max_batch: int, prompt_tokens: int,
                 new_tokens: int, dtype: str | None = None):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        cmd = [sys.executable, "-m", "mu", "serve", "--model", model_dir, "--port", str(port), "--model-name", "m",
               "--max-batch", str(max_batch), "--max-queue", "256", "--max-input-tokens", str(prompt_tokens),
               "--max-new-tokens", str(new_tokens), "--threads", str(threads), "--log-level", "warning"]
        if dtype:
            cmd += ["--dtype", dtype]
        self.port = port
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mu serve exited: {self.proc.stderr.read()}")
            try:
                if get(port, "/health")["status"] == "ok":
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("mu serve did not start in 180 s")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def get(port: int, path: str):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        body = r.read().decode()
        return json.loads(body) if r.getheader("Content-Type", "").startswith("application/json") else body
    finally:
        conn.close()


def metric_sums(port: int) -> dict[str, float]:
    """_sum and _count of the engine's histograms: decode batch and step time, prefill batch and time, TTFT."""
    text = get(port, "/metrics")
    out = {}
    for name in ("mu_batch_size", "mu_decode_step_seconds", "mu_prefill_batch_size", "mu_prefill_seconds",
                 "mu_time_to_first_token_seconds"):
        for part in ("sum", "count"):
            m = re.search(rf"^{name}_{part} (\S+)$", text, re.M)
            out[f"{name}_{part}"] = float(m.group(1)) if m else 0.0
    return out


def prompt_ids(seed: int, n: int) -> list[int]:
    return torch.randint(4, 260, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run_level(port: int, clients: int, requests_per_client: int, prompt_tokens: int, new_tokens: int,
              time_limit: float, seed0: int) -> dict:
    latencies: list[float] = []
    tokens: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + time_limit

    def client(c: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        for r in range(requests_per_client):
            if time.monotonic() > deadline:
                break
            body = json.dumps({"model": "m", "prompt": prompt_ids(seed0 + c * 1000 + r, prompt_tokens),
                               "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True})
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                out = json.loads(resp.read())
            except (OSError, http.client.HTTPException, json.JSONDecodeError) as e:
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
                continue
            dt = time.perf_counter() - t0
            with lock:
                if resp.status == 200:
                    latencies.append(dt)
                    tokens.append(out["usage"]["completion_tokens"])
                else:
                    errors.append(f"{resp.status}: {out}")
        conn.close()

    before = metric_sums(port)
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = metric_sums(port)
    delta = {k: after[k] - before[k] for k in after}
    lat = sorted(latencies)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(round(q * (len(lat) - 1))))] if lat else float("nan")

    steps = delta["mu_batch_size_count"]
    prefills = delta["mu_prefill_seconds_count"]
    return {"clients": clients, "requests": len(lat), "errors": len(errors), "first_error": errors[0] if errors else None,
            "tokens": sum(tokens), "wall_s": wall, "tokens_per_s": sum(tokens) / wall,
            "latency_p50_s": pct(0.50), "latency_p99_s": pct(0.99),
            "mean_decode_batch": delta["mu_batch_size_sum"] / steps if steps else 0.0,
            # where the engine thread's time went: prefills, decode steps (model step + picking tokens +
            # handing them out), and the rest of the wall time (waiting for requests, admitting them)
            "prefill_s": delta["mu_prefill_seconds_sum"], "decode_s": delta["mu_decode_step_seconds_sum"],
            "mean_prefill_batch": delta["mu_prefill_batch_size_sum"] / prefills if prefills else 0.0,
            "mean_prefill_s": delta["mu_prefill_seconds_sum"] / prefills if prefills else float("nan"),
            "mean_step_s": delta["mu_decode_step_seconds_sum"] / steps if steps else float("nan"),
            "mean_ttft_s": (delta["mu_time_to_first_token_seconds_sum"] / delta["mu_time_to_first_token_seconds_count"]
                            if delta["mu_time_to_first_token_seconds_count"] else float("nan"))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--archs", default="encdec,deconly")
    p.add_argument("--clients", default="1,4,16,64")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the server")
    p.add_argument("--dtype", help="the server's --dtype (default: fp32, as the models are built)")
    p.add_argument("--time-limit", type=float, default=300.0, help="seconds per level before clients stop")
    p.add_argument("--quick", action="store_true", help="tiny preset, 64-token prompts, 16 new tokens")
    p.add_argument("--out", help="also write the JSON result here")
    args = p.parse_args()
    if args.quick:
        args.preset, args.prompt_tokens, args.new_tokens = "tiny", 64, 16
    levels = [int(c) for c in args.clients.split(",")]
    info = {**isa(), "server_threads": args.threads, "torch": torch.__version__, "preset": args.preset,
            "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "max_batch": args.max_batch,
            "dtype": args.dtype or "fp32"}
    print(f"# {info['cpu']}; torch {info['torch']} CPU capability {info['torch_capability']}, "
          f"avx512_bf16={info['avx512_bf16']}, amx={info['amx']}; {info['cores']} cores; server threads "
          f"{args.threads}; {info['dtype']}", flush=True)
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="mu-serve-load-") as tmp:
        for arch in args.archs.split(","):
            torch.manual_seed(0)
            model = mu.build_model(args.preset, arch=arch)
            model.tokenizer = byte_tokenizer()
            model_dir = model.save_pretrained(Path(tmp) / arch)
            n_params = model.num_parameters()
            del model
            server = ServerProcess(str(model_dir), free_port(), args.threads, args.max_batch, args.prompt_tokens,
                                   args.new_tokens, args.dtype)
            try:
                run_level(server.port, 4, 1, args.prompt_tokens, args.new_tokens, args.time_limit, seed0=10 ** 6)
                results[arch] = []
                for clients in levels:
                    r = run_level(server.port, clients, max(2, 8 // clients), args.prompt_tokens, args.new_tokens,
                                  args.time_limit, seed0=clients * 10 ** 5)
                    r["params"] = n_params
                    results[arch].append(r)
                    print(f"{arch:8s} clients {clients:3d}: {r['requests']:4d} requests, {r['tokens_per_s']:8.1f} "
                          f"tokens/s, latency p50 {r['latency_p50_s']:6.2f} s p99 {r['latency_p99_s']:6.2f} s, "
                          f"mean batch {r['mean_decode_batch']:5.1f}, mean TTFT {r['mean_ttft_s']:.3f} s; engine: "
                          f"prefill {r['prefill_s'] / r['wall_s']:.0%} (mean {r['mean_prefill_batch']:.1f} prompts, "
                          f"{r['mean_prefill_s'] * 1e3:.0f} ms), decode {r['decode_s'] / r['wall_s']:.0%} "
                          f"(mean step {r['mean_step_s'] * 1e3:.1f} ms), other "
                          f"{1 - (r['prefill_s'] + r['decode_s']) / r['wall_s']:.0%}"
                          + (f", {r['errors']} errors ({r['first_error']})" if r["errors"] else ""), flush=True)
            finally:
                server.stop()
    summary = {}
    for arch, rows in results.items():
        by = {r["clients"]: r for r in rows}
        if 1 in by and 16 in by:
            summary[f"{arch}_speedup_16_vs_1"] = by[16]["tokens_per_s"] / by[1]["tokens_per_s"]
    if "encdec" in results and "deconly" in results:
        for a, b in zip(results["encdec"], results["deconly"]):
            summary[f"encdec_vs_deconly_tokens_per_s_c{a['clients']}"] = a["tokens_per_s"] / b["tokens_per_s"]
            summary[f"encdec_vs_deconly_p50_latency_c{a['clients']}"] = a["latency_p50_s"] / b["latency_p50_s"]
    for k, v in summary.items():
        print(f"{k}: {v:.2f}")
    result = {"machine": info, "results": results, "summary": summary}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
