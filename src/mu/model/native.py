"""mu's native CPU kernels (`native.c`): the int8 prefill GEMM for AVX2 CPUs without VNNI, its activation codes
and its fused tanh-GELU; compiled on first use with the system's C compiler, loaded with ctypes.

    from mu.model import native
    if native.int8_available():
        packed = native.pack_weights(codes)                  # (out, in) int8, |q| <= 63: once per layer
        a, scale, zero = native.activation_codes(x)          # (rows, in) fp32 -> 7-bit codes
        y, _ = native.gemm(a, packed, mult, off)             # y = (a . w) mult + off, fp32

On such CPUs (AVX2's u8 x s8 multiply-add sums pairs in int16) 7-bit activation codes let the kernel add two pair
sums in int16 before widening them: 3 multiply uops per 64 multiply-adds instead of 4, ~1.2x the int8 GEMMs of
oneDNN and fbgemm at a 512-token prefill (docs/efficiency.md, round 9). CPUs with VNNI (AVX-512 or AVX-VNNI) get
oneDNN's VNNI kernels instead, which this one would not beat.

The library is built once per source, compiler and CPU into `$MU_CACHE_DIR` (default `~/.cache/mu`), with
`-march=native` and OpenMP (the process's OpenMP runtime: torch's). Without a C compiler, with `MU_NATIVE=0`, or
where the build fails, nothing native is used and the int8 prefill runs oneDNN's kernel as before.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from mu.atomic import atomic_file

SOURCE = Path(__file__).with_name("native.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
K_MULTIPLE, N_MULTIPLE, M_MULTIPLE = 8, 16, 2  # native.c's padding of the inner dimension, the outputs and the rows
ACTIVATION_MAX = 127  # 7-bit activation codes (see native.c)
WEIGHT_MAX = 63  # 7-bit weight codes

_P, _I64, _F32, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
_SIGNATURES = {
    "mu_pack_weights": [_P, _I64, _I64, _I64, _I64, _P],
    "mu_range": [_P, _I64, _I64, _I64, _P, _INT],
    "mu_quantize_u7": [_P, _I64, _I64, _I64, _F32, _F32, _P, _I64, _INT],
    "mu_gemm_u7s7": [_P, _I64, _I64, _P, _I64, _P, _P, _P, _I64, _INT, _P, _INT],
    "mu_gemv_u8s7": [_P, _I64, _I64, _P, _I64, _I64, _P, _P, _P, _P, _I64, _P, _INT],
    "mu_gemv_layer": [_P, _P, _I64, _P, _INT],
}
GEMV_ROWS = 8  # native.c's rows per pass of the GEMV


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return set()


def _cache_dir() -> Path:
    return Path(os.environ.get("MU_CACHE_DIR") or Path.home() / ".cache" / "mu") / "native"


def _build(compiler: str, flags: set[str]) -> Optional[Path]:
    """The compiled library for this source, compiler and CPU (built now if missing), or None if the build fails."""
    source = SOURCE.read_bytes()
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), version.encode(),
                                     " ".join(sorted(flags)).encode(), platform.machine().encode()])).hexdigest()[:16]
    path = _cache_dir() / f"mu_native-{key}.so"
    if path.exists():
        return path
    try:
        with atomic_file(path) as tmp:
            done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True,
                                  timeout=300)
            if done.returncode != 0:
                raise RuntimeError((done.stderr.strip().splitlines() or ["the compiler failed"])[-1])
    except Exception as e:  # no compiler, a read-only cache, a failed build: the library's kernels run instead
        warnings.warn(f"mu: native kernels not built ({e}); the int8 prefill uses oneDNN", stacklevel=3)
        return None
    return path


@lru_cache(maxsize=None)
def library() -> Optional[ctypes.CDLL]:
    """The loaded native library, or None where this CPU, the environment or the toolchain rules it out."""
    flags = _cpu_flags()
    wanted = os.environ.get("MU_NATIVE", "1") != "0"
    # AVX2 without VNNI: with VNNI (AVX-512 or AVX-VNNI) oneDNN's kernels multiply 4x faster per uop
    suited = "avx2" in flags and "fma" in flags and not flags & {"avx512_vnni", "avx_vnni", "avx512f"}
    compiler = os.environ.get("CC") or "cc"
    if not (wanted and suited and platform.system() == "Linux" and shutil.which(compiler)):
        return None
    path = _build(compiler, flags)
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:  # an unreadable or foreign file in the cache
        warnings.warn(f"mu: native kernels not loaded ({e}); the int8 prefill uses oneDNN", stacklevel=2)
        return None
    for name, args in _SIGNATURES.items():
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = None
    return lib


def int8_available() -> bool:
    """True when the native int8 prefill GEMM runs on this machine (built and loaded now if need be)."""
    return library() is not None


def _ceil(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _aligned(numel: int, dtype: torch.dtype, align: int = 64) -> Tensor:
    """An uninitialised 1-D tensor whose data starts on an `align`-byte boundary."""
    size = torch.empty(0, dtype=dtype).element_size()
    raw = torch.empty(numel + align // size, dtype=dtype)
    start = (-raw.data_ptr() % align) // size
    return raw[start:start + numel]


def pack_weights(q: Tensor) -> Tensor:
    """7-bit weight codes (out, in) int8 in the GEMM's panel layout (64-byte aligned, zero padded)."""
    n, k = q.shape
    q = q.contiguous()
    out = _aligned(_ceil(n, N_MULTIPLE) * _ceil(k, K_MULTIPLE), torch.int8)
    library().mu_pack_weights(q.data_ptr(), n, k, _ceil(n, N_MULTIPLE), _ceil(k, K_MULTIPLE), out.data_ptr())
    return out


def _scale_zero(lo: float, hi: float) -> tuple[float, int]:
    """One scale and zero point mapping lo..hi (lo <= 0 <= hi) onto 0..ACTIVATION_MAX."""
    scale = (hi - lo) / ACTIVATION_MAX
    if not (scale > 0 and scale < float("inf")):  # all zeros (or non-finite input: garbage in, garbage out)
        return 1.0, 0
    return scale, min(ACTIVATION_MAX, max(0, round(-lo / scale)))


def activation_codes(x: Tensor, value_range: Optional[tuple[float, float]] = None) -> tuple[Tensor, float, int]:
    """7-bit codes of a 2-D fp32 `x` (unit column stride) with one scale and zero point over min(x, 0)..max(x, 0)
    (or `value_range`, when the producer already knows it): (codes (rows padded, in padded) uint8, scale, zero)."""
    lib = library()
    rows, cols = x.shape
    nt = torch.get_num_threads()
    if value_range is None:
        r = torch.empty(2)
        lib.mu_range(x.data_ptr(), rows, cols, x.stride(0), r.data_ptr(), nt)
        value_range = tuple(r.tolist())
    scale, zero = _scale_zero(*value_range)
    k_pad = _ceil(cols, K_MULTIPLE)
    codes = torch.empty(_ceil(rows, M_MULTIPLE), k_pad, dtype=torch.uint8)  # the padded row is read, never stored
    lib.mu_quantize_u7(x.data_ptr(), rows, cols, x.stride(0), 1.0 / scale, float(zero), codes.data_ptr(), k_pad, nt)
    return codes, scale, zero


def gemm(codes: Tensor, rows: int, packed: Tensor, mult: Tensor, off: Tensor,
         gelu: bool = False) -> tuple[Tensor, Optional[tuple[float, float]]]:
    """(rows, n_pad) fp32 = (codes . weights) * mult + off (per output channel, `mult` and `off` of n_pad), then
    tanh-GELU if `gelu`, whose output range (with 0) comes back for the next product's codes."""
    n_pad = mult.numel()
    out = torch.empty(rows, n_pad)
    r = torch.empty(2) if gelu else None
    library().mu_gemm_u7s7(codes.data_ptr(), rows, codes.shape[1], packed.data_ptr(), n_pad, mult.data_ptr(),
                           off.data_ptr(), out.data_ptr(), n_pad, int(gelu), None if r is None else r.data_ptr(),
                           torch.get_num_threads())
    return out, None if r is None else tuple(r.tolist())


class Layer(ctypes.Structure):
    """One layer's constant GEMV arguments (native.c's `mu_layer`), holding the tensors it points into."""

    _fields_ = [("wp", _P), ("k", _I64), ("k_pad", _I64), ("n_pad", _I64), ("wscale", _P), ("bias", _P), ("wsum", _P)]


def layer(packed: Tensor, in_features: int, scale: Tensor, bias: Tensor, weight_sums: Tensor) -> Layer:
    """The GEMV's arguments for weights packed by `pack_weights` and per-channel `scale`, `bias` and dequantized row
    sums `weight_sums` (fp32, contiguous, n_pad each)."""
    tensors = (packed, scale.contiguous(), bias.contiguous(), weight_sums.contiguous())
    args = Layer(packed.data_ptr(), in_features, _ceil(in_features, K_MULTIPLE), scale.numel(), tensors[1].data_ptr(),
                 tensors[2].data_ptr(), tensors[3].data_ptr())
    args.tensors = tensors  # alive as long as the pointers are
    return args


def gemv(x: Tensor, args: Layer) -> Tensor:
    """(..., n_pad) fp32 = x . weights for a few rows of contiguous fp32 `x` (a decode): each row's own 8-bit codes,
    then the per-channel scales, bias and the activation zero point's share (`layer`'s)."""
    out = torch.empty(*x.shape[:-1], args.n_pad)
    library().mu_gemv_layer(ctypes.byref(args), x.data_ptr(), x.numel() // args.k, out.data_ptr(),
                            torch.get_num_threads())
    return out
