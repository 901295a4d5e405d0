"""Measuring one generation: clocks (synchronised), memory bandwidth, resident memory, counted FLOPs."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from typing import Optional, Sequence

import torch
from torch import Tensor

from mu.bench.flops import flop_counter
from mu.utils import huge_page_bytes


def synchronize(device: torch.device) -> None:
    """Wait for queued accelerator work, so the clock reads the time the work took."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def random_input_ids(batch: int, length: int, vocab_size: int, seed: int, device: torch.device) -> Tensor:
    """Token ids in [4, vocab): no pad, BOS, EOS or UNK, so every position is a real token."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab_size, (batch, length), generator=g).to(device)


class _Clock:
    """Wall and process-CPU seconds of a block, the accelerator synchronised before both readings."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> "_Clock":
        synchronize(self.device)
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


DECODE_CHUNK = 8  # decode steps a model runs in one turn of `time_generations`


@torch.inference_mode()
def time_generations(runners: dict, input_ids: Tensor, new_tokens: int, batch_sizes: Sequence[int],
                     replicate: bool, device: torch.device, decode_steps: Optional[int] = None) -> dict:
    """Time greedy generations of `new_tokens` tokens by several models in lock-step.

    The models take turns: prefill each (in the dict's order), then for each batch size decode steps
    1..k of each model, steps k+1..2k of each, ... (`DECODE_CHUNK` = k steps a turn, the order flipping
    every turn), so a change in the machine's background load hits all of them alike and their ratios
    stay sharp. A turn is one `runner.steps` call (a mu model's greedy steps of one sequence: one native
    call, as `generate` runs them); each of its steps is given the turn's mean time.

    replicate=True: each model prefills the first row once (batch 1: its TTFT); for each batch size
    that state is copied and expanded to B identical rows before decoding. replicate=False: a real
    prefill per batch size (rows 0..B-1 of `input_ids`). TTFT = prefill (encoder-decoder: encoder,
    cross-attention K/V, start token) + lm_head + the first token's pick; a decode step =
    `decode_step` + pick. `decode_steps` (default new_tokens - 1, as `generate` runs) shortens warm-ups.

    Returns {name: {"ttft_s", "ttft_cpu_s": {B: s}, "steps_s", "steps_cpu_s": {B: [s, ...]},
    "cache_bytes": {B: bytes}}}; *_cpu_s are process CPU seconds (`time.process_time`).
    """
    steps = new_tokens - 1 if decode_steps is None else decode_steps
    names = list(runners)
    out = {n: {"ttft_s": {}, "ttft_cpu_s": {}, "steps_s": {}, "steps_cpu_s": {}, "cache_bytes": {}} for n in names}

    def prefill(ids: Tensor, B: int) -> tuple[dict, dict]:
        states, tokens = {}, {}
        for n in names:
            with _Clock(device) as c:
                states[n], tokens[n] = runners[n].prefill(ids, new_tokens)
            out[n]["ttft_s"][B], out[n]["ttft_cpu_s"][B] = c.wall, c.cpu
        return states, tokens

    def decode(states: dict, tokens: dict, B: int) -> None:
        for n in names:
            out[n]["steps_s"][B], out[n]["steps_cpu_s"][B] = [], []
        for turn, i in enumerate(range(0, steps, DECODE_CHUNK)):
            k = min(DECODE_CHUNK, steps - i)
            for n in (names if turn % 2 == 0 else names[::-1]):
                with _Clock(device) as c:
                    tokens[n] = runners[n].steps(states[n], tokens[n], k)
                out[n]["steps_s"][B] += [c.wall / k] * k
                out[n]["steps_cpu_s"][B] += [c.cpu / k] * k
        for n in names:
            out[n]["cache_bytes"][B] = runners[n].cache_nbytes(states[n])

    if replicate:
        states, tokens = prefill(input_ids[:1], 1)
        order = sorted(batch_sizes)
        for i, B in enumerate(order):
            last = i == len(order) - 1
            wide = {n: states[n] if last else runners[n].copy(states[n]) for n in names}
            if B > 1:
                for n in names:
                    runners[n].expand(wide[n], B)
            decode(wide, {n: t.repeat(B) for n, t in tokens.items()}, B)
            del wide
    else:
        for B in sorted(batch_sizes):
            states, tokens = prefill(input_ids[:B], B)
            decode(states, tokens, B)
            del states
    return out


def time_generation(runner, input_ids: Tensor, new_tokens: int, batch_sizes: Sequence[int], replicate: bool,
                    device: torch.device, decode_steps: Optional[int] = None) -> dict:
    """`time_generations` for one model."""
    return time_generations({"model": runner}, input_ids, new_tokens, batch_sizes, replicate, device,
                            decode_steps)["model"]


@torch.inference_mode()
def count_generation_flops(runner, input_ids: Tensor, new_tokens: int) -> dict[str, int]:
    """FLOPs of one generation counted by `torch.utils.flop_counter.FlopCounterMode` (CPU SDPA included)."""
    with flop_counter() as c:
        state, token = runner.prefill(input_ids, new_tokens)
    prefill = c.get_total_flops()
    with flop_counter() as c:
        for _ in range(new_tokens - 1):
            token = runner.step(state, token)
    decode = c.get_total_flops()
    return {"prefill": prefill, "decode": decode, "total": prefill + decode}


def measure_bandwidth(device: torch.device, nbytes: int = 256 << 20, repeats: int = 7) -> dict[str, float]:
    """Memory bandwidth in bytes/s: reading a large fp32 tensor (sum), and copying it (read + write). On a CPU the
    tensors lie on transparent huge pages where the system gives them (`stream_tensor`), as a model's weights do for
    generation (`mu.model.fast.huge_pages_`): the rate a stream of reads reaches at best."""
    x = stream_tensor(nbytes, device)
    y = stream_tensor(nbytes, device)
    copy = 2 * nbytes / _median_time(lambda: y.copy_(x), device, repeats)
    return {"read_bytes_per_s": read_bandwidth(x, repeats), "copy_bytes_per_s": copy, "tensor_bytes": nbytes}


def stream_tensor(nbytes: int, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """An fp32 tensor of nbytes // 4 ones to read for `read_bandwidth`; on a CPU on huge pages when possible."""
    raw = huge_page_bytes(nbytes // 4 * 4) if device.type == "cpu" else None
    x = torch.empty(nbytes // 4, device=device) if raw is None else raw.view(torch.float32)
    return x.fill_(1.0)


def read_bandwidth(x: torch.Tensor, repeats: int = 7) -> float:
    """Bytes/s of reading `x` once (its sum), the median of `repeats` reads after a first one."""
    return x.nbytes / _median_time(lambda: x.sum(), x.device, repeats)


def _median_time(fn, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])  # the first of them touches fresh pages


def current_rss() -> int:
    """Resident set size of this process now, in bytes."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:  # Linux without psutil
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss() -> int:
    """High-water mark of this process's resident set size, in bytes.

    Linux: `VmHWM` of /proc/self/status, the peak of this process image only. `getrusage(RUSAGE_SELF)
    .ru_maxrss` is not used there because it carries the parent's high-water mark across fork + exec
    (a worker started by a 1 GiB parent would report >= 1 GiB). Elsewhere: `ru_maxrss`.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    v = sorted(values)
    if len(v) == 1:
        return v[0]
    pos = (len(v) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)
