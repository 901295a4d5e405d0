"""Small shared helpers: device selection and seeding (done once, at entry points)."""

from __future__ import annotations

import mmap
import os
import random
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from mu.errors import MuError


def pick_device(name: Optional[str] = None) -> torch.device:
    """'auto'/None -> CUDA when available, else CPU; otherwise the named device, checked."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MuError(f"unknown device {name!r}; expected cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MuError(f"device {name!r} requested but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise MuError(f"device {name!r} requested but this machine has {torch.cuda.device_count()} CUDA device(s) "
                      f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if device.type not in ("cpu", "cuda", "mps"):
        raise MuError(f"device {name!r}: expected cpu, cuda, cuda:N or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise MuError(f"device {name!r} requested but MPS is not available on this machine")
    return device


DATA_ENV = "MU_DATA"  # a data folder the seed-compatible scripts fall back on (phi3_tokenizer/, examples/)


def data_file(name: str) -> Optional[Path]:
    """$MU_DATA/name if MU_DATA is set and that file or folder exists, else None. The library itself never
    needs it: only the paper's scripts' defaults (its tokenizer, its example images) look there."""
    root = os.environ.get(DATA_ENV)
    path = Path(root) / name if root else None
    return path if path is not None and path.exists() else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass
    torch.manual_seed(seed)


CPU_BF16_ENV = "MU_CPU_BF16"  # 1: treat this CPU as bf16-native (torch emulates where it is not); 0: as not


def cpu_bf16_native() -> tuple[bool, str]:
    """Whether automatic precision treats this CPU as running bf16 natively, and why.

    Native means oneDNN reports bf16 support (AVX-512-BF16 or AMX). `MU_CPU_BF16=1` forces the bf16 choice on
    any CPU (torch then computes bf16 in software: slower, same numerics), `MU_CPU_BF16=0` forces fp32; tests
    use the switch so an AVX2 machine exercises what AVX-512 users get.
    """
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("1", "0"):
        return forced == "1", f"{CPU_BF16_ENV}={forced}"
    if forced:
        raise MuError(f"{CPU_BF16_ENV}={forced!r}: expected 1 (force bf16), 0 (force fp32) or unset (detect)")
    try:
        native = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    return native, "CPU has native bf16 (AVX-512-BF16/AMX)" if native else "CPU lacks native bf16"


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """bf16 where the device supports it (CUDA with bf16, or a bf16-native CPU), else None (fp32)."""
    return auto_precision(device)[0]


def auto_precision(device: torch.device) -> tuple[Optional[torch.dtype], str]:
    """The automatic precision for `device` (None = fp32) and the reason, for logs and saved reports."""
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
        return (torch.bfloat16 if native else None), f"CUDA device {'has' if native else 'lacks'} bf16"
    if device.type == "cpu":
        native, why = cpu_bf16_native()
        return (torch.bfloat16 if native else None), why
    return None, f"{device.type} device: fp32"


def precision_note(dtype: Optional[torch.dtype], why: str) -> str:
    """'bf16 (CPU has native bf16 ...)': what a run logs and records about the precision it chose."""
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    return f"{name} ({why})"


@lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (`/proc/cpuinfo`; empty elsewhere), e.g. {'avx2', 'avx512_bf16'}."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return frozenset()


def cpu_isa() -> str:
    """The CPU's vector ISA as it matters to torch's kernels, e.g. 'AVX512 (bf16, vnni, amx)' or 'AVX2'.

    The first word is the kernel level torch dispatches to (`torch.backends.cpu.get_cpu_capability()`); the
    flags in brackets are the ones that change which precision or int8 kernel is fastest. Printed beside
    every speed figure.
    """
    level = torch.backends.cpu.get_cpu_capability()
    extras = [name for name, flag in (("bf16", "avx512_bf16"), ("vnni", "avx512_vnni"), ("amx", "amx_bf16"))
              if flag in cpu_flags()]
    return f"{level} ({', '.join(extras)})" if extras else level


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= n."""
    return -(-n // multiple) * multiple


HUGE_PAGE = 2 << 20  # x86-64's transparent huge page


@lru_cache(maxsize=None)
def _huge_pages_possible() -> bool:
    """Linux with transparent huge pages that a program may ask for (not "never")."""
    try:
        return hasattr(mmap, "MADV_HUGEPAGE") and "[never]" not in Path(
            "/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


def huge_page_bytes(nbytes: int) -> Optional[torch.Tensor]:
    """A uint8 CPU tensor of `nbytes` zeros on fresh memory that starts on a huge-page boundary and is advised to be
    backed by transparent huge pages (Linux's `MADV_HUGEPAGE`, on a private anonymous mapping of its own: memory from
    the allocator may have been touched already, in 4 KiB pages), or None where that cannot be asked for.

    A stream of reads that crosses many 4 KiB pages pays a TLB miss per page, and the hardware prefetchers stop at
    page boundaries: reading a decode step's weights (61 products of 0.4-64 MiB) from huge pages ran 1.28x faster on
    an AVX-512 machine (docs/efficiency.md, round 11)."""
    if nbytes <= 0 or not _huge_pages_possible():
        return None
    try:
        region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # (shared: shmem)
        raw = torch.frombuffer(region, dtype=torch.uint8)  # (holds the mapping while a view of it lives)
        start = -raw.data_ptr() % HUGE_PAGE
        region.madvise(mmap.MADV_HUGEPAGE, start, nbytes)
    except (OSError, ValueError):
        return None
    return raw[start:start + nbytes]
