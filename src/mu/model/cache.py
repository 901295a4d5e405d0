"""The generation cache: decoder self-attention K/V that grows, cross-attention K/V computed once.

One `KVCache` serves both architectures. Self-attention K/V live in preallocated
buffers, (n_layer, B, n_kv_head, max_len, head_dim) each, written in place; the
encoder-decoder also keeps one (K, V) pair per decoder layer for cross-attention,
projected once from the encoder output and reused at every step.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


class KVCache:
    def __init__(self, n_layer: int, batch: int, n_kv_head: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        shape = (n_layer, batch, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # key may be attended
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)  # next RoPE position per row
        self.length = 0  # slots filled (same for every row; left padding keeps rows aligned)
        self.max_len = max_len
        self.cross_kv: Optional[list[tuple[Tensor, Tensor]]] = None  # per decoder layer, (B, n_kv, S, hd)
        self.cross_valid: Optional[Tensor] = None  # (B, S) valid encoder positions

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write new K/V (B, T, n_kv_head, hd) at the current length; return all K/V so far (B, n_kv, L, hd)."""
        T = k.shape[1]
        end = self.length + T
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self.k[layer, :, :, self.length:end] = k.transpose(1, 2)
        self.v[layer, :, :, self.length:end] = v.transpose(1, 2)
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def append_valid(self, valid: Tensor) -> None:
        """Record which of the next T slots are real tokens (B, T); called once per step before the layers."""
        self.valid[:, self.length:self.length + valid.shape[1]] = valid

    def advance(self, n: int) -> None:
        """Mark n more slots as filled; called once per step after all layers."""
        self.length += n

    def reorder(self, index: Tensor) -> None:
        """Select/reorder batch rows (beam search, expanding a prefilled row to several beams)."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)
        self.valid = self.valid.index_select(0, index)
        self.positions = self.positions.index_select(0, index)
        if self.cross_kv is not None:
            self.cross_kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.cross_kv]
            self.cross_valid = self.cross_valid.index_select(0, index)

    def nbytes(self) -> int:
        """Bytes held by the cache (self-attention buffers, as allocated, plus cross-attention K/V)."""
        total = self.k.nbytes + self.v.nbytes
        if self.cross_kv is not None:
            total += sum(k.nbytes + v.nbytes for k, v in self.cross_kv)
        return total
