"""Analytic FLOPs and bytes of one cached generation, and a FlopCounterMode cross-check.

Conventions (the same for both architectures and for the counter):
- FLOPs are matmul FLOPs, 2 per multiply-add: the q/k/v/out projections, the MLP, the lm_head and
  the two attention products (Q K^T and P V). Norms, RoPE, GELU, softmax and biases are left out;
  at these sizes they are well under 1% of the total.
- Attention counts only the (query, key) pairs the kernel computes: a causal prefill of L tokens
  has L (L + 1) / 2 pairs, a decode step at context c has c.
- A generation of N new tokens is what `mu.generation.generate` runs: `prefill` (which returns the
  logits of the first new token), then N - 1 `decode_step`s.

Encoder-decoder (n_e encoder, n_d decoder layers), input length L:
    prefill = n_e [L P_sa + 4 q L^2]  +  n_d L 4 d kv  +  decoder_step(pos 0)  + lm_head
    decoder_step(pos i) = n_d [P_sa + P_cross + 4 q (i + 1) + 4 q L]
Decoder-only (n layers):
    prefill = n [L P_sa + 4 q L (L + 1) / 2] + lm_head
    decode_step(pos L + i) = n [P_sa + 4 q (L + i + 1)] + lm_head
with P_sa = 2 (d q + 2 d kv + q d) + 4 d f (projections + MLP per token), P_cross = 2 (d q + q d)
(cross-attention query and output projections; its K/V are projected once, in the prefill),
q = n_head * head_dim, kv = n_kv_head * head_dim, d = n_embd, f = hidden_dim, lm_head = 2 d V.
"""

from __future__ import annotations

import math

from typing import Any, Callable

import torch

from mu.config import MuConfig
from mu.model import quantize  # noqa: F401  (defines the ops mu::gemv and mu::int8_linear that the counter meets)


def _dims(c: MuConfig) -> tuple[int, int, int, int, int]:
    return c.n_embd, c.qkv_embd, c.n_kv_head * c.head_dim, c.hidden_dim, c.vocab_size


def mu_param_count(c: MuConfig) -> int:
    """Parameters of a mu model (tied embedding counted once), from its config."""
    d, q, kv, f, V = _dims(c)
    attn = d * q + q + 2 * (d * kv + kv) + q * d + d  # q, k, v, out with biases
    mlp = d * f + f + f * d + d
    if c.arch == "encdec":
        return V * d + c.n_encoder_layer * (attn + mlp + 2 * d) + c.n_decoder_layer * (2 * attn + mlp + 3 * d) + 2 * d
    return V * d + c.n_decoder_layer * (attn + mlp + 2 * d) + d


def per_token_flops(c: MuConfig) -> dict[str, int]:
    d, q, kv, f, V = _dims(c)
    return {
        "self_block": 2 * (d * q + 2 * d * kv + q * d) + 4 * d * f,  # projections + MLP
        "cross_q_out": 2 * (d * q + q * d),
        "cross_kv": 4 * d * kv,  # per encoder token per decoder layer, once
        "lm_head": 2 * d * V,
        "attn_pair": 4 * q,  # per (query, key) pair, all heads: QK^T + PV
    }


def generation_flops(c: MuConfig, input_length: int, new_tokens: int, batch: int = 1) -> dict[str, int]:
    """Matmul FLOPs of one greedy generation: {"prefill", "decode", "total"} for `batch` sequences."""
    p = per_token_flops(c)
    L, N = input_length, new_tokens
    if c.arch == "encdec":
        n_e, n_d = c.n_encoder_layer, c.n_decoder_layer

        def step(i: int) -> int:  # decoder position i (0 is the start token), self keys i + 1, cross keys L
            return n_d * (p["self_block"] + p["cross_q_out"] + p["attn_pair"] * (i + 1 + L)) + p["lm_head"]

        prefill = n_e * (L * p["self_block"] + p["attn_pair"] * L * L) + n_d * L * p["cross_kv"] + step(0)
        decode = sum(step(i) for i in range(1, N))
    else:
        n = c.n_decoder_layer
        prefill = n * (L * p["self_block"] + p["attn_pair"] * L * (L + 1) // 2) + p["lm_head"]
        decode = sum(n * (p["self_block"] + p["attn_pair"] * (L + i + 1)) + p["lm_head"] for i in range(N - 1))
    return {"prefill": batch * prefill, "decode": batch * decode, "total": batch * (prefill + decode)}


def kv_cache_bytes(c: MuConfig, input_length: int, new_tokens: int, batch: int, element_size: int) -> int:
    """Bytes of the KV cache `generate` allocates: self-attention buffers (+ cross-attention K/V)."""
    kv = c.n_kv_head * c.head_dim
    if c.arch == "encdec":
        positions = (1 + new_tokens) + input_length  # decoder self K/V + cross K/V of the encoder output
    else:
        positions = input_length + new_tokens
    return 2 * c.n_decoder_layer * batch * kv * positions * element_size


def kv_read_bytes_per_step(n_layer: int, kv_width: int, self_len: float, cross_len: int, batch: int,
                           element_size: int) -> float:
    """Bytes of K and V one decode step reads: every cached layer's self K/V (+ cross K/V)."""
    return 2.0 * n_layer * batch * kv_width * (self_len + cross_len) * element_size


def mu_kv_read_bytes(c: MuConfig, input_length: int, new_tokens: int, batch: int, element_size: int) -> float:
    """Mean KV bytes read per decode step over the N - 1 steps of a generation."""
    kv = c.n_kv_head * c.head_dim
    if c.arch == "encdec":  # steps at decoder positions 1..N-1 see i + 1 self keys, and all L encoder keys
        return kv_read_bytes_per_step(c.n_decoder_layer, kv, (new_tokens + 2) / 2, input_length, batch, element_size)
    # steps at positions L..L+N-2 see L + i + 1 keys
    return kv_read_bytes_per_step(c.n_decoder_layer, kv, input_length + new_tokens / 2, 0, batch, element_size)


# ---------------------------------------------------------------------------------------------
# Counting with torch.utils.flop_counter


def _causal_pairs(s_q: int, s_k: int) -> int:
    """(query, key) pairs of a causal mask aligned top-left (torch's `is_causal`): query i sees keys 0..i."""
    full = min(s_q, s_k)
    return full * (full + 1) // 2 + max(0, s_q - s_k) * s_k


def _cpu_sdpa_flops(query, key, value, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of `aten._scaled_dot_product_flash_attention_for_cpu` (shapes (B, H, S, D)); causal pairs only."""
    b, h, s_q, d = query
    s_k, d_v = key[2], value[3]
    pairs = _causal_pairs(s_q, s_k) if is_causal else s_q * s_k
    return 2 * b * h * pairs * d + 2 * b * h * pairs * d_v


def _linear_flops(x, weight, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of `mkldnn._linear_pointwise` (the prefill's fp32 products on a CPU) and `mu::gemv` (mu's float GEMV):
    x (..., in), weight (out, in)."""
    return 2 * math.prod(x[:-1]) * weight[0] * weight[1]


def _int8_linear_flops(x, handle, out_features, out_shape=None, **kwargs) -> int:
    """FLOPs of `mu::int8_linear` (x (..., in), out_features outputs)."""
    return 2 * math.prod(x) * out_features


def cpu_flop_mapping() -> dict[Any, Callable]:
    """Formulas FlopCounterMode lacks for the CPU kernels mu runs (torch 2.13 counts CPU SDPA as 0 FLOPs and knows
    neither oneDNN's linear op nor mu's own ops, which mu's layers call as ops under a dispatch mode,
    `mu.model.fast.as_op`): pass as `custom_mapping`.

    CUDA kernels (flash / efficient / cuDNN) are counted by torch's own formulas, which count
    causal attention as full; prefill attention at L=1024 is ~4% of the total, so the cross-check
    stays within a few percent there too.
    """
    return {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
            torch.ops.mkldnn._linear_pointwise: _linear_flops, torch.ops.mu.gemv: _linear_flops,
            torch.ops.mu.int8_linear: _int8_linear_flops}


def flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False, custom_mapping=cpu_flop_mapping())
