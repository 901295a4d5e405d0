"""Reduced-precision linear layers for CPU inference: small modules and swap functions (gpt-fast style).

    model = mu.load_model("runs/x/final")
    model.quantize_("int8")          # = quantize_(model, "int8"); in place, inference only
    model.generate(ids, max_new_tokens=128)

Every `nn.Linear` of the transformer blocks, the fused q/k/v and cross-attention k/v projections
(`Attention.set_fused`, one GEMM each) and the (untied) `lm_head` are swapped for one of these modules.
The token embedding stays in the model dtype (a lookup reads one row). A quantized model has no
trainable linear weights and cannot be saved: save before quantizing.

Modes (`QUANT_MODES`); prefill (many rows) and decode (a few rows, `DECODE_MAX_ROWS`) may run
different kernels over the same stored weights:

- "int8" (`Int8Linear`): int8 weights, one symmetric scale per output channel (7-bit codes, |q| <= 63, so
  AVX2's int16 pair sums cannot saturate), activations quantized on the fly; int32 accumulation. On x86 CPUs
  with AVX2 but no VNNI every product runs mu's own kernels (`_NativeInt8`, `mu.model.native`, compiled at first
  use; one copy of the codes): below `NATIVE_MIN_ROWS` rows (a decode) a GEMV with each row's own 8-bit
  activation codes, from there (a prefill) a GEMM with each row's own 7-bit activation codes, ~1.2x the libraries'
  int8 GEMMs, with the MLP's GELU in its output stage (`_fused_mlp`). Elsewhere (VNNI or AVX-512 CPUs, no C
  compiler, `MU_NATIVE=0`) both phases run fbgemm's int8 GEMM through aten's tensor-only
  `fbgemm_linear_int8_weight_fp32_activation` (`_FbgemmInt8`: 8-bit activation codes with one scale and zero
  point per call, the per-channel scales applied to its output), or where that op is missing
  `quantized::linear_dynamic` (`_DynamicInt8`: 7-bit activation codes, 8-bit weights), the kernel behind
  `torch.ao` dynamic quantisation, whose calls cost ~25 us more each (docs/efficiency.md); the products that
  only ever prefill (the encoder's, the cross-attention's k/v of the encoder output) then also hold the same
  codes in oneDNN's layout and run oneDNN's int8 matmul (`_OnednnInt8`; its activation codes from mu's native
  pass where it is built, `native.u8_codes`) from `ONEDNN_MIN_ROWS` rows on (faster than fbgemm at a 512-token
  prompt, slower for short ones; one byte more per encoder weight held). ~1-2% relative error per layer output on
  random weights in every case. A one-sequence decode's decoder blocks and lm_head run mu's native decoder step
  instead (`mu.model.fast.NativeDecoder`, `Int8Linear.step_weights`): on CPUs with AVX-512 VNNI, VNNI dot products
  over the same 7-bit codes, kept row-major for it by the layers it reads (`Int8Linear(keep_codes=True)`; the same
  8-bit activation codes as fbgemm's); on AVX2 CPUs without VNNI, over the packed codes of `_NativeInt8` with its
  GEMV's arithmetic (nothing more held); in both, the cross-attention reads bf16 copies of the encoder's K/V (half
  the bytes; the modules keep fp32). Where fbgemm is unavailable (non-x86 builds) it dequantizes the same int8
  weights into a float matmul instead: same numbers to rounding, no speed-up.
- "int8wo" (`Int8WeightOnlyLinear`, weight-only int8): 8-bit per-channel codes; decode runs
  `torch._weight_int8pack_mm` (bf16 activations, never quantized), prefill runs "int8"'s kernels over
  its own codes of the same weights (the weight-only kernel is a GEMV kernel: 4x slower than fp32 at 512 rows).
- "int4" (`Int4Linear`, group-wise weight-only int4, asymmetric, `group_size` 64 by default): decode runs
  `torch._weight_int4pack_mm_for_cpu` (bf16 activations, 0.5 byte per weight + bf16 scale and zero
  per group); prefill runs "int8"'s kernels over the dequantized int4 weights (re-rounded to
  int8 per channel, so 1.5 bytes per weight are held in memory).

Which is fastest depends on the CPU (docs/efficiency.md has the measurements): on the AVX2 development
machine dynamic int8 wins both phases (the weight-only kernels decode ~2-3x slower), so
`--dtype auto` (`mu.model.quantize.auto_format`) picks "int8" on x86 CPUs.
"""

from __future__ import annotations

import copy
import itertools
import math
import sys
import warnings
import weakref
from functools import partial
from typing import Callable, Iterable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mu.errors import MuError
from mu.model import native
from mu.model.fast import as_op, cpu_op

DECODE_MAX_ROWS = 8  # at most this many input rows: a decode product (matrix-vector in effect)

_linear_dynamic = torch.ops.quantized.linear_dynamic.default if hasattr(torch.ops.quantized, "linear_dynamic") else None
# fbgemm's int8 GEMM behind tensor-only arguments (aten's `fbgemm_linear_int8_weight_fp32_activation`)
_linear_int8 = getattr(torch, "fbgemm_linear_int8_weight_fp32_activation", None)
FBGEMM_WEIGHT_MAX = 63  # 7-bit weight codes for `_linear_int8`: its activations use all 8 bits (see `_FbgemmInt8`)
ONEDNN_MIN_ROWS = 256  # a prefill-only layer runs oneDNN's int8 matmul from this many input rows on (`_OnednnInt8`)
NATIVE_MIN_ROWS = 32  # mu's native int8 kernels (`_NativeInt8`): the GEMM from this many rows, the GEMV below


def _fbgemm_engine() -> bool:
    return bool({"fbgemm", "x86"} & set(torch.backends.quantized.supported_engines))


def _fbgemm_available() -> bool:
    """True when fbgemm's int8 GEMM is reachable (tensor-only op, or the dynamic-quantization op)."""
    return _fbgemm_engine() and (_linear_int8 is not None or _linear_dynamic is not None)


def int4_available() -> bool:
    """True when this torch build has the CPU int4 weight-only kernels."""
    return (hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")
            and hasattr(torch, "_weight_int4pack_mm_for_cpu"))


def int8_weight_only_available() -> bool:
    return hasattr(torch, "_weight_int8pack_mm")


def _per_channel_int8(weight: Tensor, qmax: int = 127) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel codes in -qmax..qmax: (codes (out, in) int8, scales (out,) fp32)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / qmax
    return torch.round(w / scale[:, None]).clamp(-qmax, qmax).to(torch.int8), scale


def _row_sums(q: Tensor, scale: Tensor) -> Tensor:
    """The dequantized weights' row sums of int8 codes `q` (out, in) with per-channel `scale`: what an activation
    zero point contributes to each output, per unit of zero point x activation scale."""
    return q.sum(1, dtype=torch.int32) * scale


def _check_inference(x: Tensor) -> None:
    if x.requires_grad and torch.is_grad_enabled():
        raise MuError("this model is quantized (inference only); train the float model, quantize after")


# A compiled decode step (`generate(compile=True)`) reaches fbgemm through one opaque op, `mu::int8_linear`, which
# finds the layer's packed weights by an integer handle (fbgemm's packed weights are no ordinary tensor or are a
# TorchScript object, which `torch.compile` cannot take as an argument). Entries leave with their GEMM object.
_PACKED: dict[int, object] = {}
_handles = itertools.count()


# The op is defined once per process (`cpu_op`): after a second import of this module, the kernel looks the handle
# up in whichever copy of the module `sys.modules` holds now.
def _int8_linear_kernel(x: Tensor, handle: int, out_features: int) -> Tensor:
    return sys.modules[__name__]._PACKED[handle](x.contiguous()).contiguous()  # the strides the fake kernel gives


def _int8_linear_fake(x: Tensor, handle: int, out_features: int) -> Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


_int8_linear_op = cpu_op("int8_linear(Tensor x, int handle, int out_features) -> Tensor", _int8_linear_kernel,
                         _int8_linear_fake)


class _Int8Gemm:
    """An int8 kernel over one layer's int8 codes (fbgemm's, oneDNN's or mu's own); `raw(x)` (fp32 x) is the product,
    times `Int8Linear.scale` when `scale_outside`. `_PACKED` holds `raw` (a function of the packed weights, not of
    this object, which would then never be freed)."""

    scale_outside = False
    raw: Callable[[Tensor], Tensor]

    def _register(self, raw: Callable[[Tensor], Tensor]) -> None:
        self.raw = raw
        self.handle = next(_handles)
        _PACKED[self.handle] = raw
        weakref.finalize(self, _PACKED.pop, self.handle, None)


def _bind_int8(codes: Tensor, packed: Tensor, col_offsets: Tensor, bias: Tensor) -> Callable[[Tensor], Tensor]:
    return lambda x: _linear_int8(x, codes, packed, col_offsets, 1.0, 0, bias)


class _FbgemmInt8(_Int8Gemm):
    """`_linear_int8`: u8 activation codes chosen per call (the input's min..max over 0..255), s8 weights packed
    once, int32 accumulation, float output. All its arguments are tensors, so a call from Python costs a few
    microseconds; `quantized::linear_dynamic` takes fbgemm's packed weights as a TorchScript object, and each call's
    argument check looks up `__torch_function__` on it, which raises (and catches) a C++ exception: ~25 us of a
    40 us product at one row (docs/efficiency.md).

    The op takes one weight scale for the whole matrix: it gets 1.0, and the per-channel scales multiply its output
    (the bias is passed divided by them). AVX2's u8 x s8 multiply-add sums pairs of products in int16, which
    saturates for 8-bit activation codes times 8-bit weights (2 x 255 x 127 > 32767), so the weights use 7-bit
    codes (|q| <= 63: 2 x 255 x 63 < 32767).
    """

    scale_outside = True

    def __init__(self, q: Tensor, scale: Tensor, bias: Optional[Tensor]):
        self.codes = q.new_empty(1).expand(q.shape)  # the op reads only the shape of its `weight`
        self.col_offsets = q.sum(1, dtype=torch.int32)
        self.bias = torch.zeros_like(scale) if bias is None else bias.float() / scale
        with warnings.catch_warnings():  # the aten ops are marked deprecated (they warn once per process, here)
            warnings.simplefilter("ignore")
            self.packed = torch.fbgemm_pack_quantized_matrix(q.contiguous())
            self._register(_bind_int8(self.codes, self.packed, self.col_offsets, self.bias))
            self.raw(scale.new_zeros(1, q.shape[1]))

    def __deepcopy__(self, memo: dict) -> "_FbgemmInt8":
        """Copies share it: the weights are read-only, and the packed tensor's storage is an fbgemm object, not
        bytes that copying could duplicate."""
        return self


def _onednn_available() -> bool:
    return hasattr(torch.ops.onednn, "qlinear_pointwise") and torch.backends.mkldnn.is_available()


def _u8_codes(x: Tensor) -> tuple[Tensor, float, int]:
    """8-bit activation codes of `x` with one scale and zero point (the range min(x, 0)..max(x, 0) over 0..255, as
    fbgemm chooses them): (codes as a plain uint8 tensor, scale, zero point). mu's native pass where it is built
    (`native.u8_codes`: the same codes; 5-7x PyTorch's ops on inputs in cache, 16.7 vs 18.2 ms over a 330m
    prefill's inputs, which come from memory: docs/efficiency.md round 16), else PyTorch's ops."""
    if native.u8_codes_available():
        return native.u8_codes(x)
    lo, hi = (v.item() for v in torch.aminmax(x))
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255
    if not (math.isfinite(scale) and scale > 0):  # all zeros (or a non-finite input: garbage in, garbage out)
        scale, lo = 1.0, 0.0
    zero = min(255, max(0, round(-lo / scale)))
    q = torch.quantize_per_tensor(x, scale, zero, torch.quint8)
    # the same bytes as a plain uint8 tensor (`int_repr()` would copy them)
    return torch.empty(0, dtype=torch.uint8).set_(q.untyped_storage(), 0, q.shape, q.stride()), scale, zero


class _OnednnInt8(_Int8Gemm):
    """oneDNN's int8 matmul (`onednn::qlinear_pointwise`) for the prefill's many-row products where mu's own kernel
    (`_NativeInt8`) does not run (CPUs with VNNI or without AVX2, no C compiler, `MU_NATIVE=0`): the same 7-bit
    weight codes and per-channel scales as `_FbgemmInt8`, packed once in oneDNN's layout (a second copy of the
    codes), and the same 8-bit activation codes per call (`_u8_codes`; so the same integer products), scales
    and bias applied inside. At 512 rows it is 8-20% faster than fbgemm's GEMM on the AVX2 development machine
    (fc2 12.8 vs 15.8 ms, two threads), but slower below ~256 rows (docs/efficiency.md), hence
    `ONEDNN_MIN_ROWS`.

    No activation zero point makes oneDNN's GEMM faster at the same integer products (docs/efficiency.md, round
    6): the kernel gets zero point 0, and the zero point's share, zero point x scale x the row sums of the
    dequantized weights, is taken off the bias per call (one subtraction over the outputs). (Round 6 also padded
    a wide first product with 16 zero output channels, so that its output rows were not 4 KiB apart: a faster
    GEMM alone, but the next product's codes then copied the strided view, and whole AVX-512 prefills ran 1.04x
    faster without it: round 13.)
    """

    def __init__(self, q: Tensor, scale: Tensor, bias: Optional[Tensor]):
        self.out_features = q.shape[0]
        self.bias = scale.new_zeros(q.shape[0]) if bias is None else bias
        self.packed = torch.ops.onednn.qlinear_prepack(q.contiguous(), None)
        self.scale, self.zeros = scale, torch.zeros(q.shape[0], dtype=torch.long)
        self.weight_sums = _row_sums(q, scale)
        with warnings.catch_warnings():  # quantized-tensor constructors are deprecated (they warn once, here)
            warnings.simplefilter("ignore")
            # bound to the tensors, not to this object: `_PACKED` must not keep it alive
            self._register(partial(_onednn_product, self.packed, self.scale, self.zeros, self.bias, self.weight_sums))
            self.raw(scale.new_zeros(1, q.shape[1]))

    def __deepcopy__(self, memo: dict) -> "_OnednnInt8":
        """Copies share it (read-only weights)."""
        return self


class _NativeWeights(NamedTuple):
    packed: Tensor  # 7-bit codes in the kernels' panels
    scale: Tensor  # per output channel, padded to the panels (as the next two)
    bias: Tensor
    weight_sums: Tensor  # the dequantized weights' row sums (the activation zero point's share comes off the bias)
    out_features: int
    gemv: native.Layer  # the GEMV's arguments (pointers into the tensors above)


class _NativeInt8(_Int8Gemm):
    """mu's own int8 kernels (`mu.model.native`) on x86 CPUs with AVX2 but no VNNI, for every product of an int8
    layer: 7-bit weight codes packed once in the kernels' panels (the only copy), scales and bias applied in their
    output stage. Below `NATIVE_MIN_ROWS` rows (a decode) the GEMV: each row's own 8-bit activation codes, the
    weights streamed once (a little faster than fbgemm's per product, docs/efficiency.md round 9). From
    `NATIVE_MIN_ROWS` rows (a prefill) the GEMM: 7-bit activation codes (one scale and zero point per row),
    whose int16 sums of four products make it ~1.2x oneDNN's and fbgemm's int8 GEMMs. `product(x, gelu=True)`
    also applies the MLP's tanh-GELU in the GEMM's output stage and returns its range, from which the next
    product's codes follow without a pass over the wide activation for them (`_fused_mlp`)."""

    def __init__(self, q: Tensor, scale: Tensor, bias: Optional[Tensor]):
        self.out_features, self.in_features = q.shape
        pad = -self.out_features % native.N_MULTIPLE  # zero channels: the kernel writes whole panels
        packed, scale_pad = native.pack_weights(q), F.pad(scale.float(), (0, pad))
        bias_pad = F.pad(scale.new_zeros(self.out_features) if bias is None else bias.float(), (0, pad))
        sums = F.pad(_row_sums(q, scale), (0, pad))
        self.weights = _NativeWeights(packed, scale_pad, bias_pad, sums, self.out_features,
                                      native.layer(packed, self.in_features, scale_pad, bias_pad, sums))
        self._register(partial(_native_product, self.weights))  # the weights, not this object: see `_Int8Gemm`

    def product(self, x: Tensor, gelu: bool = False, row_ranges: Optional[Tensor] = None
                ) -> tuple[Tensor, Optional[Tensor]]:
        """The GEMM over 2-D fp32 `x`: (rows, padded outputs) and, with `gelu`, the GELU's output range per row;
        `row_ranges`: x's, when known."""
        return _native_gemm(self.weights, x, gelu, row_ranges)

    def __deepcopy__(self, memo: dict) -> "_NativeInt8":
        """Copies share it (read-only weights)."""
        return self


def _native_gemm(w: _NativeWeights, x: Tensor, gelu: bool = False,
                 row_ranges: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    codes, sx, zx = native.activation_codes(x, row_ranges)
    return native.gemm(codes, sx, zx, w.packed, w.scale, w.bias, w.weight_sums, gelu)


def _native_product(w: _NativeWeights, x: Tensor) -> Tensor:
    if x.numel() >= NATIVE_MIN_ROWS * x.shape[-1]:
        y, _ = _native_gemm(w, x.reshape(-1, x.shape[-1]))
        return y[:, :w.out_features].view(*x.shape[:-1], w.out_features)
    y = native.gemv(x.contiguous(), w.gemv)  # a decode: as few Python steps as possible
    return y if y.shape[-1] == w.out_features else y[..., :w.out_features]


def _fused_mlp(mlp: nn.Module, x: Tensor) -> Optional[Tensor]:
    """An int8 MLP's prefill with the tanh-GELU in the first product's output stage (`MLP.fused_forward`): where
    both products are mu's native ones (whose GELU also gives each row's range for the second product's activation
    codes), or oneDNN's (a post-op; 8 vs 1 GELU passes over the wide activation: a 512-token `330m` fc1 with its
    GELU 8.0 -> 7.0 ms on an AVX-512 CPU, docs/efficiency.md round 10). None (declined) otherwise."""
    fc1, fc2 = mlp.fc1, mlp.fc2
    if x.dtype != torch.float32 or as_op() or mlp.training:  # (training: the plain path applies dropout)
        return None
    rows = _rows(x)
    if rows >= NATIVE_MIN_ROWS and all(isinstance(getattr(fc, "_gemm", None), _NativeInt8) for fc in (fc1, fc2)):
        _check_inference(x)
        h, row_ranges = fc1._gemm.product(x.reshape(-1, x.shape[-1]).contiguous(), gelu=True)
        y, _ = fc2._gemm.product(h[:, :fc1.out_features], row_ranges=row_ranges)
        return y[:, :fc2.out_features].view(*x.shape[:-1], fc2.out_features)
    if rows >= ONEDNN_MIN_ROWS and all(getattr(fc, "_many", None) is not None for fc in (fc1, fc2)):
        _check_inference(x)
        return fc2._many.raw(fc1._many.raw(x.contiguous(), gelu=True))
    return None


def _onednn_product(packed: Tensor, scale: Tensor, zeros: Tensor, bias: Tensor, weight_sums: Tensor, x: Tensor,
                    gelu: bool = False) -> Tensor:
    """`gelu`: oneDNN's tanh-GELU applied in the matmul's output stage (a post-op)."""
    x2 = x.reshape(-1, x.shape[-1])
    codes, x_scale, x_zero = _u8_codes(x2)
    bias = torch.add(bias, weight_sums, alpha=-x_zero * x_scale) if x_zero else bias
    post = ("gelu", [], "tanh") if gelu else ("none", [], "")
    y = torch.ops.onednn.qlinear_pointwise(codes, x_scale, 0, packed, scale, zeros, bias, 1.0, 0, torch.float32, *post)
    return y.view(*x.shape[:-1], y.shape[-1])


def _bind_dynamic(packed: object) -> Callable[[Tensor], Tensor]:
    return lambda x: _linear_dynamic(x, packed, True)  # reduce_range=True: 7-bit activations


class _DynamicInt8(_Int8Gemm):
    """`quantized::linear_dynamic` (where `_linear_int8` is missing): 7-bit activation codes per call
    (`reduce_range`, for the same int16 saturation), 8-bit per-channel weights, scales and bias inside."""

    def __init__(self, q: Tensor, scale: Tensor, bias: Optional[Tensor]):
        with warnings.catch_warnings():  # quantized-tensor constructors are deprecated, the kernel is not
            warnings.simplefilter("ignore")
            zeros = torch.zeros_like(scale, dtype=torch.long)
            qw = torch._make_per_channel_quantized_tensor(q, scale.double(), zeros, 0)
            self.packed = torch.ops.quantized.linear_prepack(qw, bias)
        self._register(_bind_dynamic(self.packed))

    def __deepcopy__(self, memo: dict) -> "_DynamicInt8":
        """A copy with its own handle (a copied model outlives the original's entry in `_PACKED`)."""
        new = copy.copy(self)
        new.packed = copy.deepcopy(self.packed, memo)
        new._register(_bind_dynamic(new.packed))
        return new


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 (per-output-channel symmetric scales); inference only."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor] = None, prefill: bool = False,
                 keep_codes: bool = False):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        b = None if bias is None else bias.detach().float().clone()
        self.register_buffer("bias", b, persistent=False)
        cpu = weight.device.type == "cpu"
        fbgemm = _fbgemm_available() and cpu
        self._many: Optional[_OnednnInt8] = None
        if native.int8_available() and cpu:  # mu's own kernels for every number of rows (one copy of the codes)
            q, scale = _per_channel_int8(weight, native.WEIGHT_MAX)
            self._gemm: Optional[_Int8Gemm] = _NativeInt8(q, scale, b)
        elif fbgemm and _linear_int8 is not None:
            q, scale = _per_channel_int8(weight, FBGEMM_WEIGHT_MAX)
            self._gemm = _FbgemmInt8(q, scale, b)
        else:
            q, scale = _per_channel_int8(weight)
            self._gemm = _DynamicInt8(q, scale, b) if fbgemm and _linear_dynamic is not None else None
        # `prefill`: a layer that only prefills (an encoder's, the cross-attention's k/v) also gets oneDNN's matmul
        # for many rows, over a second copy of 7-bit codes (1 byte more per weight held)
        if prefill and self._gemm is not None and not isinstance(self._gemm, _NativeInt8) and _onednn_available():
            same = isinstance(self._gemm, _FbgemmInt8)  # its codes are already 7-bit
            q7, scale7 = (q, scale) if same else _per_channel_int8(weight, FBGEMM_WEIGHT_MAX)
            self._many = _OnednnInt8(q7, scale7, b)
        self.register_buffer("scale", scale, persistent=False)
        if self._gemm is None:
            self.register_buffer("weight_int8", q, persistent=False)
        # `keep_codes` (a decoder block's layer where mu's native decoder step runs int8, `quantize_`): the codes
        # row-major as they are, and the dequantized weights' row sums, for that step (1 byte more per weight held)
        keep = keep_codes and isinstance(self._gemm, _FbgemmInt8) and native.step_int8_layout() == "rows"
        self.register_buffer("codes", q.contiguous() if keep else None, persistent=False)
        self.register_buffer("weight_sums", _row_sums(q, scale) if keep else None, persistent=False)

    @classmethod
    def from_linears(cls, linears: Iterable[nn.Linear], **kw) -> "Int8Linear":
        """One quantized linear computing the concatenated outputs of `linears` (same input)."""
        linears = list(linears)
        bias = None if linears[0].bias is None else torch.cat([m.bias for m in linears])
        return cls(torch.cat([m.weight for m in linears]), bias, **kw)

    @property
    def backend(self) -> str:
        if isinstance(self._gemm, _NativeInt8):
            return f"native (GEMV below {NATIVE_MIN_ROWS} rows, GEMM from {NATIVE_MIN_ROWS})"
        name = {_FbgemmInt8: "fbgemm", _DynamicInt8: "fbgemm-dynamic"}.get(type(self._gemm), "dequant")
        return name if self._many is None else f"{name} + onednn (from {ONEDNN_MIN_ROWS} rows)"

    def forward(self, x: Tensor) -> Tensor:
        _check_inference(x)
        g = self._gemm
        if g is None:
            y = F.linear(x, self.weight_int8.to(x.dtype)) * self.scale.to(x.dtype)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        if self._many is not None and _rows(x) >= ONEDNN_MIN_ROWS:  # a prefill (scales and bias inside)
            if as_op():
                return _int8_linear_op(x.float(), self._many.handle, self.out_features).to(x.dtype)
            return self._many.raw(x.float().contiguous()).to(x.dtype)
        if as_op():  # traced, or watched by a dispatch mode: one opaque op (the FLOP counter knows its formula)
            y = _int8_linear_op(x.float(), g.handle, self.out_features)
            return (y * self.scale if g.scale_outside else y).to(x.dtype)
        if x.dtype == torch.float32 and x.is_contiguous():  # the decode hot path: one or two calls into C/C++
            return g.raw(x).mul_(self.scale) if g.scale_outside else g.raw(x)
        y = g.raw(x.float().contiguous())
        return (y.mul_(self.scale) if g.scale_outside else y).to(x.dtype)

    def step_weights(self) -> Optional[tuple[Tensor, Tensor, Tensor, Optional[Tensor]]]:
        """What mu's native decoder step (`mu.model.fast.NativeDecoder`) reads of this layer: (codes, per-channel
        scales, the dequantized weights' row sums, bias or None), the row-major codes kept for it where it runs on
        VNNI (`keep_codes`), or on AVX2 CPUs the packed codes of mu's own kernels (scales, sums and bias padded to
        their panels: the same numbers as the layer's GEMV); None where it does not run this layer."""
        layout = native.step_int8_layout()  # (the library's: codes kept under another build are not read)
        if self.codes is not None and layout == "rows":
            return self.codes, self.scale, self.weight_sums, self.bias
        if isinstance(self._gemm, _NativeInt8) and layout == "panels":
            w = self._gemm.weights
            return w.packed, w.scale, w.weight_sums, w.bias
        return None

    def weight_bytes(self) -> int:
        """Bytes of weights (and scales, bias) one product reads."""
        return self.out_features * self.in_features + 4 * self.out_features * (2 if self.bias is not None else 1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend}"


def int8_kernels() -> str:
    """Which kernels `quantize_(model, "int8")` gives this machine, for reports beside speed figures."""
    if native.int8_available():
        return "native (mu's AVX2 GEMV and GEMM)"
    return "fbgemm (oneDNN for the encoder's prefill)"


def _rows(x: Tensor) -> int:
    return x.numel() // x.shape[-1] if x.numel() else 0


class Int8WeightOnlyLinear(Int8Linear):
    """Int8 weights, float activations for decode (`torch._weight_int8pack_mm`, bf16 in and out); the
    prefill (more than `DECODE_MAX_ROWS` rows) runs "int8"'s kernels over the same int8 codes."""

    act_dtype = torch.bfloat16  # the kernel's fast path on x86 (fp32 activations take a ~10x slower one)

    def __init__(self, weight: Tensor, bias: Optional[Tensor] = None):
        super().__init__(weight, bias)  # the prefill's kernel (its own codes)
        q, scale = _per_channel_int8(weight)  # decode's 8-bit codes
        self.register_buffer("weight_int8", q, persistent=False)
        self.register_buffer("scale_act", scale.to(self.act_dtype), persistent=False)
        self.register_buffer("bias_act", None if self.bias is None else self.bias.to(self.act_dtype),
                             persistent=False)

    @property
    def backend(self) -> str:
        return f"int8pack (decode) + {super().backend} (prefill)"

    def step_weights(self) -> None:
        """None: its decode is the weight-only kernel's, which the native decoder step does not run."""
        return None

    def forward(self, x: Tensor) -> Tensor:
        _check_inference(x)
        if 0 < _rows(x) <= DECODE_MAX_ROWS and x.device.type == "cpu":
            y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).to(self.act_dtype), self.weight_int8,
                                          self.scale_act)
            if self.bias_act is not None:
                y = y + self.bias_act
            return y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        return super().forward(x)


def _int4_groups(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric group-wise 4-bit codes of `weight` (out, in): codes (out, in) int32 in 0..15, scales and
    zeros (out, in/group), with w ~= (code - 8) * scale + zero (torch's int4pack convention)."""
    n, k = weight.shape
    w = weight.detach().float().reshape(n, k // group_size, group_size)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    codes = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).reshape(n, k)
    return codes, scale, lo + 8 * scale


class Int4Linear(nn.Module):
    """Group-wise int4 weights: decode through `torch._weight_int4pack_mm_for_cpu` (bf16 activations);
    prefill through "int8"'s kernels over the dequantized int4 weights."""

    act_dtype = torch.bfloat16

    def __init__(self, weight: Tensor, bias: Optional[Tensor] = None, group_size: int = 64):
        super().__init__()
        n, k = weight.shape
        self.out_features, self.in_features = n, k
        group = next((g for g in (group_size, 64, 32) if g <= group_size and k % g == 0), None)
        if group is None:
            raise MuError(f"int4: in_features {k} is not a multiple of 32 (group-wise int4 needs whole groups)")
        self.group_size = group
        codes, scale, zero = _int4_groups(weight, group)
        dequant = ((codes.reshape(n, k // group, group) - 8) * scale[..., None] + zero[..., None]).reshape(n, k)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone(), persistent=False)
        self._prefill = Int8Linear(dequant, self.bias)
        if int4_available() and n % 16 == 0 and weight.device.type == "cpu":
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1),
                                 persistent=False)
            sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous()  # (in/group, out, 2)
            self.register_buffer("scales_zeros", sz.to(self.act_dtype), persistent=False)
            self.register_buffer("bias_act", None if bias is None else self.bias.to(self.act_dtype),
                                 persistent=False)
        else:  # no kernel (or out_features not a multiple of 16): the dequantized weights in bf16
            self.register_buffer("packed", None, persistent=False)
            self.register_buffer("weight_act", dequant.to(self.act_dtype), persistent=False)

    @property
    def backend(self) -> str:
        decode = "int4pack" if self.packed is not None else "dequant"
        return f"{decode} (decode) + {self._prefill.backend} (prefill)"

    def forward(self, x: Tensor) -> Tensor:
        _check_inference(x)
        if not (0 < _rows(x) <= DECODE_MAX_ROWS and x.device.type == "cpu"):
            return self._prefill(x)
        xa = x.reshape(-1, x.shape[-1]).to(self.act_dtype)
        if self.packed is None:
            y = F.linear(xa, self.weight_act, None if self.bias is None else self.bias.to(self.act_dtype))
        else:
            y = torch._weight_int4pack_mm_for_cpu(xa, self.packed, self.group_size, self.scales_zeros)
            if self.bias_act is not None:
                y = y + self.bias_act
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def weight_bytes(self) -> int:
        groups = self.out_features * self.in_features // self.group_size
        bias = 4 * self.out_features if self.bias is not None else 0
        return self.out_features * self.in_features // 2 + 4 * groups + bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"backend={self.backend}")


def _int8_weight_only(weight: Tensor, bias: Optional[Tensor] = None) -> nn.Module:
    if not int8_weight_only_available():
        raise MuError("int8wo needs torch._weight_int8pack_mm (torch >= 2.3); use 'int8'")
    return Int8WeightOnlyLinear(weight, bias)


def _int4(weight: Tensor, bias: Optional[Tensor] = None) -> nn.Module:
    return Int4Linear(weight, bias)


# mode -> factory(weight, bias) -> module
QUANT_MODES: dict[str, Callable[..., nn.Module]] = {"int8": Int8Linear, "int8wo": _int8_weight_only, "int4": _int4}


def quantize_(model: nn.Module, mode: str = "int8", include_encoder: bool = True) -> nn.Module:
    """Swap every linear of the transformer blocks and the lm_head for the `mode` module, in place.

    `include_encoder=False` keeps the encoder in its float dtype (an exact prefill; only the
    decoder and lm_head, whose weight reads bound the decode steps, are quantized).
    """
    from mu.model.fast import is_plain_linear, step_linears
    from mu.model.layers import MLP, Attention, DecoderBlock

    if mode not in QUANT_MODES:
        raise MuError(f"quantize_: unknown mode {mode!r}; expected one of {sorted(QUANT_MODES)}")
    if getattr(model, "quantization", None):
        raise MuError(f"model is already quantized ({model.quantization})")
    odd = sorted({type(m).__name__ for m in model.modules() if isinstance(m, Attention)
                  for n in ("q_linear", "k_linear", "v_linear", "out_linear") if not is_plain_linear(getattr(m, n))})
    if odd:
        raise MuError(f"quantize_: attention projections must be plain nn.Linear layers, found {odd} "
                      "(merge LoRA adapters first, e.g. peft's merge_and_unload())")
    make = QUANT_MODES[mode]
    # "int8" where mu's native decoder step runs int8: with AVX-512 VNNI the layers it reads also keep row-major codes
    # (on AVX2 CPUs it reads the packed codes of mu's own kernels: nothing more is kept)
    make_step = partial(Int8Linear, keep_codes=True) if mode == "int8" and native.decoder_step_available("int8") \
        else make
    # "int8": the products that only ever prefill (an encoder's, the cross-attention's k/v of the encoder output)
    # also get oneDNN's int8 matmul for many rows (`Int8Linear(prefill=True)`)
    make_prefill = partial(Int8Linear, prefill=True) if mode == "int8" else make
    blocks = list(model.decoder_blocks())
    encoder = list(model.transformer.e) if include_encoder and "e" in model.transformer else []
    with torch.no_grad():
        for block in blocks + encoder:
            for name, attn in block.named_children():
                if not isinstance(attn, Attention):
                    continue
                # the fused projection each attention runs without autograd: cross-attention
                # projects k/v of the encoder output, self-attention q/k/v of its own input
                fused = "kv" if isinstance(block, DecoderBlock) and name == "cross_attn" else "qkv"
                parts = [getattr(attn, n) for n in attn.FUSED[fused]]
                fn = make_prefill if block in encoder or fused == "kv" else make
                attn.set_fused(fused, fn(torch.cat([p.weight for p in parts]), torch.cat([p.bias for p in parts])))
            unfused = {id(getattr(m, n)) for m in block.modules() if isinstance(m, Attention)
                       for n in m.FUSED["qkv"]}  # run only with autograd on, which a quantized model refuses
            # the layers `NativeDecoder` reads (a decoder block's, but the cross-attention's k/v; and the lm_head)
            stepped = {id(m) for m in step_linears(block) if m is not None} if block not in encoder else set()
            for parent in block.modules():
                for child_name, child in list(parent.named_children()):
                    if is_plain_linear(child):
                        fn = (make_prefill if block in encoder and id(child) not in unfused
                              else make_step if id(child) in stepped else make)
                        setattr(parent, child_name, fn(child.weight, child.bias).train(child.training))
            if mode == "int8" and isinstance(getattr(block, "mlp", None), MLP):
                block.mlp.fused_forward = _fused_mlp  # declines unless both products run mu's or oneDNN's GEMM
        # (unties it: the embedding lookup keeps its floats)
        model.lm_head = make_step(model.lm_head.weight).train(model.lm_head.training)
    model.quantization = mode
    return model


def quantize_int8_(model: nn.Module, include_encoder: bool = True) -> nn.Module:
    """`quantize_(model, "int8")`: dynamic int8 in both phases (which kernels: see the module docstring)."""
    return quantize_(model, "int8", include_encoder)


def quantize_int8_weight_only_(model: nn.Module, include_encoder: bool = True) -> nn.Module:
    """`quantize_(model, "int8wo")`: weight-only int8 for decode, dynamic int8 for the prefill."""
    return quantize_(model, "int8wo", include_encoder)


def quantize_int4_(model: nn.Module, include_encoder: bool = True) -> nn.Module:
    """`quantize_(model, "int4")`: group-wise int4 for decode, dynamic int8 for the prefill."""
    return quantize_(model, "int4", include_encoder)


# ---------------------------------------------------------------------------------------------
# Inference formats: float dtypes, quantization modes, and "auto"

FLOAT_FORMATS = ("fp32", "float32", "bf16", "bfloat16", "fp16", "float16")


def auto_format(device: torch.device | str | None = None) -> str:
    """The fastest inference format this machine supports, by a rule measured in docs/efficiency.md.

    CPU with fbgemm (x86): "int8" (dynamic int8 in both phases): the fastest first token and decode measured
    on AVX2 (fp32, bf16, int8wo and int4 are all slower there) and on AVX-512 with bf16 (docs/efficiency.md
    round 10, 330m: int8 0.41-0.50 s / 119-133 tokens/s compiled against bf16 0.70-0.86 s / 73-77 and fp32
    1.2-1.3 s / 38-51). CPU without fbgemm: "fp32" (int8
    would dequantize into a float matmul). Accelerators: "bf16" where supported, else "fp32".
    """
    device = torch.device(device or "cpu")
    if device.type == "cpu":
        return "int8" if _fbgemm_available() else "fp32"
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def split_format(name, device: torch.device | str | None = None) -> tuple[object, Optional[str]]:
    """An inference format -> (the float dtype to load the weights in, the quantization mode or None).

    "auto" becomes `auto_format(device)`; a quantization mode ("int8", "int8wo", "int4") loads fp32 weights
    and quantizes them; anything else (a float dtype name, a torch.dtype, None) is returned unchanged.
    """
    if name == "auto":
        name = auto_format(device)
    if isinstance(name, str) and name in QUANT_MODES:
        return "fp32", name
    return name, None


def format_names() -> list[str]:
    """Every value `--dtype` accepts, for messages."""
    return ["auto", "fp32", "bf16", "fp16", *QUANT_MODES]


def check_format(name) -> None:
    """A one-line MuError unless `name` is None, a torch.dtype or one of `format_names()`."""
    if name is None or isinstance(name, torch.dtype) or name in FLOAT_FORMATS or name == "auto" or name in QUANT_MODES:
        return
    raise MuError(f"unknown dtype {name!r}; expected one of {format_names()}")
