"""mu's native CPU kernels (`native.c`), compiled on first use with the system's C compiler, loaded with ctypes:

- int8 products on AVX2 CPUs without VNNI (`int8_available()`): a GEMV for a few rows (a decode), a GEMM for many
  (a prefill) with the MLP's tanh-GELU fusable into its output stage, and their activation codes;
- fp32 and bf16 products of a few rows on CPUs with AVX-512 (bf16: AVX-512-BF16) (`gemv_available(dtype)`,
  `gemv_float`): a float model's decode, over its own weights;
- a whole decode step of one sequence (`decoder_step_available(kind)`, `decoder_step`, called by
  `mu.model.fast.NativeDecoder`): from the token's id, every decoder block's norms, GEMVs, RoPE, cache write,
  attentions and MLP, then the final norm, the vocabulary projection and the greedy pick, in one OpenMP region; a
  sequence's greedy steps in one call (`greedy_tokens`); written once for AVX-512's 16 lanes and AVX2's 8.
  fp32 on CPUs with AVX-512 or AVX2 and FMA, bf16 with AVX-512-BF16, and an int8 model's (each product's input with
  its own 8-bit codes) with AVX-512 VNNI (VNNI dot products over the row-major 7-bit weight codes of
  `mu.model.quantize.Int8Linear`) or on AVX2 CPUs where the int8 kernels above run (over their packed codes, in
  their GEMV's arithmetic; `step_int8_layout`).

    import torch
    from mu.model import native

    if native.int8_available():
        q = torch.randint(-63, 64, (64, 32), dtype=torch.int8)   # 7-bit weight codes (out, in)
        scale, bias = torch.full((64,), 0.01), torch.zeros(64)   # per output channel (64: a multiple of 16)
        sums = q.sum(1, dtype=torch.int32) * scale              # the dequantized weights' row sums
        packed = native.pack_weights(q)                         # once per layer
        x = torch.randn(40, 32)
        codes, sx, zx = native.activation_codes(x)              # each row's 7-bit codes
        y, _ = native.gemm(codes, sx, zx, packed, scale, bias, sums)          # (40, 64): a prefill
        y1 = native.gemv(x[:1], native.layer(packed, 32, scale, bias, sums))  # (1, 64): a decode
    if native.gemv_available(torch.bfloat16):
        w, b = torch.randn(48, 40, dtype=torch.bfloat16), torch.randn(48, dtype=torch.bfloat16)
        y2 = native.gemv_float(torch.randn(2, 40, dtype=torch.bfloat16), w, b)  # (2, 48) bf16

On such CPUs (AVX2's u8 x s8 multiply-add sums pairs in int16) the GEMM's 7-bit activation codes let it add two
pair sums in int16 before widening them: 3 multiply uops per 64 multiply-adds instead of 4, ~1.2x the int8 GEMMs
of oneDNN and fbgemm at a 512-token prefill (docs/efficiency.md, round 9); the GEMV streams the weights once per
call with a few microseconds of fixed cost. CPUs with VNNI (AVX-512 or AVX-VNNI) keep fbgemm's and oneDNN's VNNI
kernels, which these would not beat. The float GEMVs read each thread's share of the weights as one sequential
stream: on an AVX-512 CPU 1.15-1.45x the fp32 rate of `mu.model.fast.split_linear`'s batched product, and ~2x
PyTorch's bf16 matmul for one row (round 10).

The library is built once per source, compiler and CPU into `$MU_CACHE_DIR` (default `~/.cache/mu`), with
`-march=native` and OpenMP (the process's OpenMP runtime: torch's). Without a C compiler, with `MU_NATIVE=0`, or
where the build fails, nothing native is used: int8 layers run fbgemm's and oneDNN's kernels, bf16 ones PyTorch's.
`MU_NATIVE_AVX2=1` (`AVX2_ENV`) builds it without AVX-512 and VNNI and makes every choice as on an AVX2 CPU without
them, so that the kernels of such CPUs are tested, and compared, on any x86 CPU with AVX2 and FMA.
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
from typing import Callable, Optional

import torch
from torch import Tensor

from mu.atomic import atomic_file
from mu.utils import cpu_flags, round_up

SOURCE = Path(__file__).with_name("native.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
K_MULTIPLE, N_MULTIPLE, M_MULTIPLE = 8, 16, 2  # native.c's padding of the inner dimension, the outputs and the rows
ACTIVATION_MAX = 127  # 7-bit activation codes (see native.c)
WEIGHT_MAX = 63  # 7-bit weight codes

_P, _I64, _F32, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
_SIGNATURES = {
    "mu_pack_weights": [_P, _I64, _I64, _I64, _I64, _P],
    "mu_codes_u7": [_P, _I64, _I64, _I64, _P, _P, _I64, _P, _P, _INT],
    "mu_gemm_u7s7": [_P, _I64, _I64, _P, _I64, _P, _P, _P, _P, _P, _P, _I64, _INT, _P, _P, _INT],
    "mu_gemv_layer": [_P, _P, _I64, _P, _INT],
}
# built only for CPUs with AVX-512 (bf16: AVX-512-BF16); name -> (argument types, result type)
_OPTIONAL = {
    **{name: ([_P, _I64, _I64, _P, _I64, _P, _P, _INT], None) for name in ("mu_gemv_f32", "mu_gemv_bf16")},
    **{name: ([_P, _P, _I64, _INT, _I64, _I64, _P, _P, _P, _P, _INT], _I64)
       for name in ("mu_decoder_steps_f32", "mu_decoder_steps_bf16", "mu_decoder_steps_i8")},
    "mu_step_lanes": ([], _INT),
    "mu_codes_u8": ([_P, _I64, _P, _P, _P, _INT], None),
}
_GEMV = {torch.float32: "mu_gemv_f32", torch.bfloat16: "mu_gemv_bf16"}
_STEP = {torch.float32: "mu_decoder_steps_f32", torch.bfloat16: "mu_decoder_steps_bf16", "int8": "mu_decoder_steps_i8"}
GEMV_ROWS = 8  # native.c's rows per pass of the GEMV
# with VNNI (AVX-512's or AVX-VNNI), or on AVX-512 CPUs, oneDNN's and fbgemm's int8 kernels multiply 4x faster per uop
_NOT_FOR_INT8 = frozenset({"avx512_vnni", "avx_vnni", "avx512f"})
# "1": build the library and choose its kernels as for a CPU with AVX2 and FMA only (no AVX-512, no VNNI), so the
# kernels of such CPUs run (tests) and compare (benchmarks) on any x86 CPU
AVX2_ENV = "MU_NATIVE_AVX2"


def _as_avx2() -> bool:
    return os.environ.get(AVX2_ENV) == "1"


def _cpu_flags() -> frozenset[str]:
    """The CPU's flags as the library's choices see them (`AVX2_ENV`: without AVX-512's, VNNI's and AMX's)."""
    flags = cpu_flags()
    if _as_avx2():
        flags = frozenset(f for f in flags if not f.startswith(("avx512", "amx")) and f != "avx_vnni")
    return flags


def _cache_dir() -> Path:
    return Path(os.environ.get("MU_CACHE_DIR") or Path.home() / ".cache" / "mu") / "native"


def _build(compiler: str, flags: frozenset[str]) -> Optional[Path]:
    """The compiled library for this source, compiler and CPU (built now if missing), or None if the build fails."""
    source = SOURCE.read_bytes()
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    options = [*FLAGS, *(("-mno-avx512f", "-mno-avxvnni") if _as_avx2() else ())]
    key = hashlib.sha256(b"\0".join([source, " ".join(options).encode(), version.encode(),
                                     " ".join(sorted(flags)).encode(), platform.machine().encode()])).hexdigest()[:16]
    path = _cache_dir() / f"mu_native-{key}.so"
    if path.exists():
        return path
    try:
        with atomic_file(path) as tmp:
            done = subprocess.run([compiler, *options, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True,
                                  timeout=300)
            if done.returncode != 0:
                raise RuntimeError((done.stderr.strip().splitlines() or ["the compiler failed"])[-1])
    except Exception as e:  # no compiler, a read-only cache, a failed build: the library's kernels run instead
        warnings.warn(f"mu: native kernels not built ({e}); PyTorch's kernels run instead", stacklevel=3)
        return None
    return path


@lru_cache(maxsize=None)
def library() -> Optional[ctypes.CDLL]:
    """The loaded native library, or None where this CPU, the environment or the toolchain rules it out."""
    flags = _cpu_flags()
    wanted = os.environ.get("MU_NATIVE", "1") != "0"
    # where a kernel of it runs: the int8 ones (AVX2 without VNNI) or the float GEMVs (AVX-512)
    suited = "avx2" in flags and "fma" in flags and ("avx512f" in flags or not flags & _NOT_FOR_INT8)
    compiler = os.environ.get("CC") or "cc"
    if not (wanted and suited and platform.system() == "Linux" and shutil.which(compiler)):
        return None
    path = _build(compiler, flags)
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:  # an unreadable or foreign file in the cache
        warnings.warn(f"mu: native kernels not loaded ({e}); PyTorch's kernels run instead", stacklevel=2)
        return None
    signatures = [*((n, (a, None)) for n, a in _SIGNATURES.items()), *_OPTIONAL.items()]
    for name, (args, result) in signatures:
        if hasattr(lib, name):
            getattr(lib, name).argtypes = args
            getattr(lib, name).restype = result
    return lib


def int8_available() -> bool:
    """True when mu's native int8 kernels run on this machine (built and loaded now if need be): AVX2 CPUs without
    VNNI and without AVX-512 (`_NOT_FOR_INT8`)."""
    return not _cpu_flags() & _NOT_FOR_INT8 and library() is not None


def gemv_available(dtype: torch.dtype) -> bool:
    """True when the native GEMV for `dtype` (fp32: AVX-512; bf16: AVX-512-BF16) runs on this machine."""
    lib = library()
    return dtype in _GEMV and lib is not None and hasattr(lib, _GEMV[dtype])


def decoder_step_available(kind: torch.dtype | str) -> bool:
    """True when `decoder_step` runs for `kind` on this machine: fp32 (AVX-512, or AVX2 with FMA), bf16 (AVX-512-BF16),
    or "int8" (an int8 model's decoder: 7-bit weight codes, fp32 activations; AVX-512 with VNNI, or AVX2 CPUs where
    `int8_available()`: see `step_int8_layout`)."""
    lib = library()
    if kind == "int8" and step_int8_layout() is None:
        return False
    return kind in _STEP and lib is not None and hasattr(lib, _STEP[kind])


def build_isa() -> Optional[str]:
    """The vector ISA the loaded library was built for, "AVX-512" or "AVX2" ("AVX2, forced by MU_NATIVE_AVX2=1" where
    `AVX2_ENV` made it so on a CPU with more), or None (no library): for reports beside speed figures."""
    lib = library()
    if lib is None:
        return None
    if getattr(lib, "mu_step_lanes", lambda: 0)() == 16:
        return "AVX-512"
    return f"AVX2, forced by {AVX2_ENV}=1" if _as_avx2() and "avx512f" in cpu_flags() else "AVX2"


def step_int8_layout() -> Optional[str]:
    """How `decoder_step` reads an int8 model's weight codes here: "rows" (the codes row-major as they are, VNNI dot
    products: an AVX-512 build), "panels" (packed by `pack_weights`, the ones mu's own int8 kernels read: an AVX2
    build, where `int8_available()`), or None (no int8 step)."""
    lib = library()
    if lib is None or not hasattr(lib, _STEP["int8"]):
        return None
    if lib.mu_step_lanes() == 16:
        return "rows"
    return "panels" if int8_available() else None


def _aligned(numel: int, dtype: torch.dtype, align: int = 64) -> Tensor:
    """An uninitialised 1-D tensor whose data starts on an `align`-byte boundary."""
    size = torch.empty(0, dtype=dtype).element_size()
    raw = torch.empty(numel + align // size, dtype=dtype)
    start = (-raw.data_ptr() % align) // size
    return raw[start:start + numel]


def pack_weights(q: Tensor) -> Tensor:
    """7-bit weight codes (out, in) int8 in the kernels' panel layout (64-byte aligned, zero padded)."""
    n, k = q.shape
    q = q.contiguous()
    out = _aligned(round_up(n, N_MULTIPLE) * round_up(k, K_MULTIPLE), torch.int8)
    library().mu_pack_weights(q.data_ptr(), n, k, round_up(n, N_MULTIPLE), round_up(k, K_MULTIPLE), out.data_ptr())
    return out


def activation_codes(x: Tensor, row_ranges: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """7-bit codes of each row of a 2-D fp32 `x` (unit column stride) with the row's own scale and zero point over
    min(x, 0)..max(x, 0) (or `row_ranges`, (rows, 2), when the producer already knows them): (codes (rows padded,
    in padded) uint8, scales (rows,), zero points (rows,) as floats)."""
    rows, cols = x.shape
    k_pad = round_up(cols, K_MULTIPLE)
    codes = torch.empty(round_up(rows, M_MULTIPLE), k_pad, dtype=torch.uint8)  # the padded row is read, never stored
    sx, zx = torch.empty(rows), torch.empty(rows)
    library().mu_codes_u7(x.data_ptr(), rows, cols, x.stride(0), None if row_ranges is None else row_ranges.data_ptr(),
                          codes.data_ptr(), k_pad, sx.data_ptr(), zx.data_ptr(), torch.get_num_threads())
    return codes, sx, zx


def u8_codes_available() -> bool:
    """True when `u8_codes` runs on this machine (a library built for AVX-512)."""
    lib = library()
    return lib is not None and hasattr(lib, "mu_codes_u8")


def u8_codes(x: Tensor) -> tuple[Tensor, float, int]:
    """8-bit codes of fp32 `x` with one scale and zero point over min(x, 0)..max(x, 0), the codes
    `torch.quantize_per_tensor` makes with them (`mu.model.quantize._u8_codes`, in two passes of the threads over x):
    (codes, a uint8 tensor of x's shape, scale, zero point). Needs `u8_codes_available()`."""
    x = x.contiguous()
    out, scale, zero = torch.empty(x.shape, dtype=torch.uint8), ctypes.c_double(), ctypes.c_int64()
    library().mu_codes_u8(x.data_ptr(), x.numel(), out.data_ptr(), ctypes.byref(scale), ctypes.byref(zero),
                          torch.get_num_threads())
    return out, scale.value, zero.value


def gemm(codes: Tensor, sx: Tensor, zx: Tensor, packed: Tensor, scale: Tensor, bias: Tensor, weight_sums: Tensor,
         gelu: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """(rows, n_pad) fp32 = codes . weights, dequantized with the rows' scales `sx` and zero points `zx` and the
    per-channel `scale`, `bias` and dequantized row sums `weight_sums` (n_pad each); then tanh-GELU if `gelu`, whose
    per-row output ranges ((rows, 2), with 0) come back for the next product's codes."""
    rows, n_pad, nt = sx.numel(), scale.numel(), torch.get_num_threads()
    out = torch.empty(rows, n_pad)
    ranges = torch.empty(rows, 2) if gelu else None
    scratch = torch.empty(nt * rows * 2) if gelu else None
    library().mu_gemm_u7s7(codes.data_ptr(), rows, codes.shape[1], packed.data_ptr(), n_pad, scale.data_ptr(),
                           bias.data_ptr(), weight_sums.data_ptr(), sx.data_ptr(), zx.data_ptr(), out.data_ptr(), n_pad,
                           int(gelu), None if ranges is None else ranges.data_ptr(),
                           None if scratch is None else scratch.data_ptr(), nt)
    return out, ranges


class Layer(ctypes.Structure):
    """One layer's constant GEMV arguments (native.c's `mu_layer`), holding the tensors it points into."""

    _fields_ = [("wp", _P), ("k", _I64), ("k_pad", _I64), ("n_pad", _I64), ("wscale", _P), ("bias", _P), ("wsum", _P)]


def layer(packed: Tensor, in_features: int, scale: Tensor, bias: Tensor, weight_sums: Tensor) -> Layer:
    """The GEMV's arguments for weights packed by `pack_weights` and per-channel `scale`, `bias` and dequantized row
    sums `weight_sums` (fp32, contiguous, n_pad each)."""
    tensors = (packed, scale.contiguous(), bias.contiguous(), weight_sums.contiguous())
    args = Layer(packed.data_ptr(), in_features, round_up(in_features, K_MULTIPLE), scale.numel(),
                 tensors[1].data_ptr(), tensors[2].data_ptr(), tensors[3].data_ptr())
    args.tensors = tensors  # alive as long as the pointers are
    args.call, args.ref = library().mu_gemv_layer, ctypes.byref(args)  # the per-call lookups, done once
    return args


def gemv(x: Tensor, args: Layer) -> Tensor:
    """(..., n_pad) fp32 = x . weights for a few rows of contiguous fp32 `x` (a decode): each row's own 8-bit codes,
    then the per-channel scales, bias and the activation zero point's share (`layer`'s)."""
    out = x.new_empty(*x.shape[:-1], args.n_pad)
    args.call(args.ref, x.data_ptr(), x.numel() // args.k, out.data_ptr(), torch.get_num_threads())
    return out


def gemv_float(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """`F.linear(x, weight, bias)` for a few rows of fp32 or bf16 `x`, a contiguous `weight` (out, in) and `bias` of
    the same dtype: fp32 sums (bf16: rounded once to bf16). Reads `weight` in place; needs `gemv_available(dtype)`."""
    k, n = weight.shape[1], weight.shape[0]
    x = x.contiguous()
    out = x.new_empty(*x.shape[:-1], n)
    getattr(library(), _GEMV[x.dtype])(x.data_ptr(), x.numel() // k, k, weight.data_ptr(), n,
                                       None if bias is None else bias.contiguous().data_ptr(), out.data_ptr(),
                                       torch.get_num_threads())
    return out


class Block(ctypes.Structure):
    """One decoder block's constant arguments (native.c's `mu_block`): the data pointers of its norm weights,
    projections (self-attention q, k, v, out; cross-attention q, out; fc1, fc2) and biases (None: no bias), and its
    shape; for int8 weights (7-bit codes, fp32 biases) each product's per-channel `scale` and `wsum` (the dequantized
    weights' row sums), in the order q, k, v, out, cross q, cross out, fc1, fc2. The caller keeps the tensors
    alive."""

    _fields_ = [(name, _P) for name in ("ln1", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo", "ln2", "cwq", "cbq",
                                        "cwo", "cbo", "ln3", "w1", "b1", "w2", "b2")] + [
        (name, _I64) for name in ("d", "n_head", "n_kv", "hd", "hidden", "interleaved")] + [
        ("eps", _F32), ("scale", _P * 8), ("wsum", _P * 8)]


class Decoder(ctypes.Structure):
    """A decoder's constant arguments for one generation (native.c's `mu_decoder`): its `blocks` (an array of `n`
    `Block`s), the final norm's weight and eps, the vocabulary projection (`head`, vocab x d; an int8 model's: codes
    with per-channel `head_scale` and `head_wsum`), each block's self-attention cache (`kc`, `vc`: arrays of n
    pointers, n_kv_head x max_len x head_dim each), the cross-attention K/V (`ck`, `cv`: n pointers to n_kv_head x S x
    head_dim, bf16 values where `cross_bf16` is set, else fp32; or None: a decoder-only model) and the encoder
    positions they cover (`cross_valid`, S bools, or None: all); what a step reads and writes beside the layers: the
    token embedding (`emb`, `rows` x d in the model's dtype), RoPE's cos and sin tables (max_len x head_dim each), the
    cache's `valid` slots (max_len bools), the sequence's next RoPE `position` (an int64) and the `pad` token's id. The
    caller keeps the tensors and arrays alive."""

    _fields_ = [("blocks", ctypes.POINTER(Block)), ("n", _I64), ("norm", _P), ("head", _P), ("head_scale", _P),
                ("head_wsum", _P), ("vocab", _I64), ("eps", _F32), ("kc", ctypes.POINTER(_P)),
                ("vc", ctypes.POINTER(_P)), ("max_len", _I64), ("ck", ctypes.POINTER(_P)), ("cv", ctypes.POINTER(_P)),
                ("S", _I64), ("cross_bf16", _I64), ("cross_valid", _P), ("emb", _P), ("rows", _I64), ("cos", _P),
                ("sin", _P), ("valid", _P), ("position", _P), ("pad", _I64)]


def decoder_step(decoder: Decoder, token: Tensor, slot: int, masked: bool,
                 dtype: torch.dtype) -> tuple[Tensor, Tensor, bool]:
    """The logits (1, vocab) of one token of one sequence, a decode step of `decoder`'s model (needs
    `decoder_step_available`), and their greedy pick (1,) (the first largest, as `torch.argmax`): `token` holds its id
    (one int64); its embedding row and RoPE at the sequence's position are read from `decoder`'s tables, the position
    advanced, cache slot `slot` marked valid unless the token is the pad, each block writes the token's K/V there and
    attends to slots 0..slot (those valid when `masked` or the token is the pad). Logits in `dtype`, the model's (an
    int8 model's: fp32); also whether the token was the pad."""
    logits, pick = torch.empty(1, decoder.vocab, dtype=dtype), torch.empty(1, dtype=torch.long)
    _, pad = _steps(decoder, token, slot, masked, 1, None, None, logits, pick)
    return logits, pick, pad


ON_TOKEN = ctypes.CFUNCTYPE(_INT, _I64)  # greedy_tokens' callback: a token's index -> nonzero to stop


def greedy_tokens(decoder: Decoder, token: Tensor, slot: int, masked: bool, n: int, eos: Optional[int],
                  dtype: torch.dtype, on_token: Optional[Callable[[Tensor], object]] = None
                  ) -> tuple[Tensor, bool, Optional[BaseException]]:
    """Up to `n` greedy tokens of one sequence after `token` (one int64, at cache slot `slot`) in one call: each
    `decoder_step`'s pick is the next step's token; the last is `eos` where one is given and picked. `on_token` gets
    each token as it is picked, as a (1,) tensor (a streamer's `put`); an exception it raises stops the tokens.
    Returns the tokens (m,), whether a token fed was the pad, and that exception (raise it: it cannot cross the
    call)."""
    out, raised = torch.empty(n, dtype=torch.long), []
    callback = None
    if on_token is not None:
        views = out.split(1)  # (made here, not a tensor per token in the loop)

        def call(i: int) -> int:
            try:
                on_token(views[i])
            except BaseException as e:
                raised.append(e)
                return 1
            return 0

        callback = ON_TOKEN(call)
    got, pad = _steps(decoder, token, slot, masked, n, eos, callback, torch.empty(1, decoder.vocab, dtype=dtype), out)
    return out[:got], pad, raised[0] if raised else None


def _steps(decoder: Decoder, token: Tensor, slot: int, masked: bool, n: int, eos: Optional[int], callback,
           logits: Tensor, out: Tensor) -> tuple[int, bool]:
    """native.c's decoder_steps for `decoder`'s kind: the steps taken (their picks in `out`, the last one's logits in
    `logits`) and whether a token fed was the pad; its errors raised."""
    pads = ctypes.c_int64()
    got = getattr(library(), _STEP["int8" if decoder.head_scale else logits.dtype])(
        ctypes.byref(decoder), token.data_ptr(), slot, masked, n, -1 if eos is None else eos, callback,
        logits.data_ptr(), out.data_ptr(), ctypes.byref(pads), torch.get_num_threads())
    if got == -1:
        raise MemoryError("mu: the native decoder step could not allocate its scratch memory")
    if got == -2:
        raise IndexError(f"token id {int(token)} is outside the embedding's {decoder.rows} rows")
    if got < 0:
        raise IndexError(f"cache slot {slot} or RoPE position outside the cache's {decoder.max_len} positions")
    return got, bool(pads.value)
