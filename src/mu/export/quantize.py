"""Int8 linear layers for CPU inference: one small module and a swap function (gpt-fast style).

    model = mu.load_model("runs/x/final")
    model.quantize_("int8")          # = quantize_int8_(model); in place, inference only
    model.generate(ids, max_new_tokens=128)

Each `nn.Linear` of the transformer blocks and the (untied) `lm_head` becomes an `Int8Linear`:
weights rounded to int8 with one symmetric scale per output channel; activations quantized on
the fly. On x86 the product runs in fbgemm's dynamically quantized GEMM
(`quantized::linear_dynamic`, the kernel behind `torch.ao` dynamic quantisation): it reads 1 byte
per weight, multiplies u8 x s8 with int32 accumulation and dequantizes. On this AVX2 machine it
is the fastest kernel we measured for both phases (docs/generation.md): ~2x fp32 for the
512-token prefill GEMMs and ~5x fp32 for the batch-1 decode GEMVs, which are bound by weight bytes.
`torch._weight_int8pack_mm` (int8 weight-only) and a dequantize-then-matmul were both slower
than fp32 here. Where fbgemm is unavailable (non-x86 builds), the module dequantizes the same
int8 weights into a float matmul instead: same numbers to rounding, no speed-up.

Numerics: activations use 7-bit unsigned codes with one scale and zero point per call
(`reduce_range`, needed because AVX2's int8 multiply-add saturates int16 with 8-bit codes), so
the error is ~1-2% relative per layer output on random weights; cached and uncached decoding of
a quantized model agree to that tolerance, not bit for bit (tests/test_speed_paths.py).

The token embedding stays in the model dtype (a lookup reads one row); the fused q/k/v and
cross-attention k/v projections (`Attention.set_fused`) are quantized as one GEMM each.
A quantized model has no trainable linear weights and cannot be saved: save before quantizing.
"""

from __future__ import annotations

import warnings
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mu.errors import MuError


_linear_dynamic = torch.ops.quantized.linear_dynamic.default if hasattr(torch.ops.quantized, "linear_dynamic") else None


def _fbgemm_available() -> bool:
    return bool({"fbgemm", "x86"} & set(torch.backends.quantized.supported_engines)) and _linear_dynamic is not None


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 (per-output-channel symmetric scales); inference only."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor] = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # (out,)
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        b = None if bias is None else bias.detach().float().clone()
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("bias", b, persistent=False)
        self._packed = None
        if _fbgemm_available() and weight.device.type == "cpu":
            with warnings.catch_warnings():  # quantized-tensor constructors are deprecated, the kernel is not
                warnings.simplefilter("ignore")
                qw = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
                self._packed = torch.ops.quantized.linear_prepack(qw, b)
        if self._packed is None:
            self.register_buffer("weight_int8", q, persistent=False)

    @classmethod
    def from_linears(cls, linears: Iterable[nn.Linear]) -> "Int8Linear":
        """One int8 linear computing the concatenated outputs of `linears` (same input)."""
        linears = list(linears)
        bias = None if linears[0].bias is None else torch.cat([m.bias for m in linears])
        return cls(torch.cat([m.weight for m in linears]), bias)

    @property
    def backend(self) -> str:
        return "fbgemm" if self._packed is not None else "dequant"

    def forward(self, x: Tensor) -> Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            raise MuError("this model is int8-quantized (inference only); train the float model, quantize after")
        if self._packed is not None:
            if x.dtype == torch.float32 and x.is_contiguous():  # the decode hot path: one call
                return _linear_dynamic(x, self._packed, True)  # reduce_range=True: 7-bit activations
            return _linear_dynamic(x.float().contiguous(), self._packed, True).to(x.dtype)
        y = F.linear(x, self.weight_int8.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend}"


def quantize_int8_(model: nn.Module, include_encoder: bool = True) -> nn.Module:
    """Swap every linear of the transformer blocks and the lm_head for `Int8Linear`, in place.

    `include_encoder=False` keeps the encoder in its float dtype (an exact prefill; only the
    decoder and lm_head, whose weight reads bound the decode steps, go to int8).
    """
    from mu.model.layers import Attention, DecoderBlock

    if getattr(model, "quantization", None):
        raise MuError(f"model is already quantized ({model.quantization})")
    odd = sorted({type(m).__name__ for m in model.modules() if isinstance(m, Attention)
                  for n in ("q_linear", "k_linear", "v_linear", "out_linear") if type(getattr(m, n)) is not nn.Linear})
    if odd:
        raise MuError(f"quantize_: attention projections must be plain nn.Linear layers, found {odd} "
                      "(merge LoRA adapters first, e.g. peft's merge_and_unload())")
    blocks = list(model.decoder_blocks())
    if include_encoder and "e" in model.transformer:
        blocks += list(model.transformer.e)
    with torch.no_grad():
        for block in blocks:
            for name, attn in block.named_children():
                if not isinstance(attn, Attention):
                    continue
                # the fused projection each attention runs without autograd: cross-attention
                # projects k/v of the encoder output, self-attention q/k/v of its own input
                fused = "kv" if isinstance(block, DecoderBlock) and name == "cross_attn" else "qkv"
                attn.set_fused(fused, Int8Linear.from_linears(getattr(attn, n) for n in attn.FUSED[fused]))
            for parent in block.modules():
                for child_name, child in list(parent.named_children()):
                    if type(child) is nn.Linear:
                        setattr(parent, child_name, Int8Linear(child.weight, child.bias))
        model.lm_head = Int8Linear(model.lm_head.weight)  # unties it: the embedding lookup keeps its floats
    model.quantization = "int8"
    return model
