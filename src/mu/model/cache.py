"""The generation cache: decoder self-attention K/V that grows, cross-attention K/V computed once.

One `KVCache` serves both architectures. Self-attention K/V live in preallocated
buffers, (n_layer, B, n_kv_head, max_len, head_dim) each, written in place; the
encoder-decoder also keeps one (K, V) pair per decoder layer for cross-attention,
projected once from the encoder output and reused at every step, and the
cross-attention key mask built once with them. RoPE cos/sin for positions
0..max_len-1 are tabulated once per request (`rope`), so a decode step indexes
them instead of recomputing.

A cache can be switched to fixed shapes (`static`, what `generate(compile=True)` uses, as in
gpt-fast): single-token steps then write their K/V at a slot given as a tensor and attend over
all `max_len` slots with `valid` as the mask, so every step has the same shapes and a compiled
decode step never recompiles as the cache fills.
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
        self._split_layers()
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # key may be attended
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)  # next RoPE position per row
        self.length = 0  # slots filled (same for every row; left padding keeps rows aligned)
        self.all_valid = True  # no padding key so far: single-token steps need no self-attention mask
        self.max_len = max_len
        self.cross_kv: Optional[list[tuple[Tensor, Tensor]]] = None  # per decoder layer, (B, n_kv, S, hd)
        self.cross_valid: Optional[Tensor] = None  # (B, S) valid encoder positions
        self.cross_mask: Optional[Tensor] = None  # (B, 1, 1, S) bool, or None when every position is valid
        self.cross_version = 0  # counts set_cross's calls: what was derived from the K/V (a copy) is made again
        self.rope: Optional[tuple[Tensor, Tensor]] = None  # cos, sin for positions 0..max_len-1, (max_len, hd)
        self.static = False  # fixed-shape single-token steps (see the module docstring)
        self.compiled = False  # run those steps through torch.compile (set by generate(compile=True))
        self.slot: Optional[Tensor] = None  # (1,) the slot a static step writes
        self.graph = None  # on a GPU, the static step's CUDA graph (`mu.model.cuda_graph`), recorded at the first such
        # step; False: none for this cache

    def set_cross(self, cross_kv: list[tuple[Tensor, Tensor]], valid: Tensor) -> None:
        """Store the cross-attention K/V of every decoder layer and the encoder positions they cover (also after
        writing into the tensors held: `mu.serve.slots.SlotCache` does, as rows join and leave)."""
        from mu.model.layers import key_padding_mask

        self.cross_version += 1
        self.cross_kv = cross_kv
        self.cross_valid = valid
        self.cross_mask = None if bool(valid.all()) else key_padding_mask(valid)

    def _split_layers(self) -> None:
        """Per-layer views of the buffers, so a step's write/read is one slice (no select per call)."""
        self.k_layers, self.v_layers = self.k.unbind(0), self.v.unbind(0)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write new K/V (B, T, n_kv_head, hd) at the current length; return all K/V so far (B, n_kv, L, hd).

        A static cache writes one position at `slot` and returns the whole buffers (L = max_len).
        """
        if self.static:
            k_layer, v_layer = self.k_layers[layer], self.v_layers[layer]
            k_layer.index_copy_(2, self.slot, k.transpose(1, 2))
            v_layer.index_copy_(2, self.slot, v.transpose(1, 2))
            return k_layer, v_layer
        T = k.shape[1]
        end = self.length + T
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        k_layer, v_layer = self.k_layers[layer], self.v_layers[layer]  # (B, n_kv_head, max_len, hd)
        k_layer[:, :, self.length:end] = k.transpose(1, 2)
        v_layer[:, :, self.length:end] = v.transpose(1, 2)
        return k_layer[:, :, :end], v_layer[:, :, :end]

    def append_valid(self, valid: Tensor) -> None:
        """Record which of the next T slots are real tokens (B, T); called once per step before the layers."""
        self.valid[:, self.length:self.length + valid.shape[1]] = valid
        self.all_valid = self.all_valid and bool(valid.all())

    def advance(self, n: int) -> None:
        """Mark n more slots as filled; called once per step after all layers."""
        self.length += n

    def reorder(self, index: Tensor) -> None:
        """Select/reorder batch rows (beam search, expanding a prefilled row to several beams). The buffers are new,
        so no CUDA graph is recorded over them (one would be recorded again at every beam step)."""
        self.graph = False
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)
        self._split_layers()
        self.valid = self.valid.index_select(0, index)
        self.positions = self.positions.index_select(0, index)
        if self.cross_kv is not None:
            self.cross_kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.cross_kv]
            self.set_cross(self.cross_kv, self.cross_valid.index_select(0, index))

    def nbytes(self) -> int:
        """Bytes held by the cache (self-attention buffers, as allocated, plus cross-attention K/V)."""
        total = self.k.nbytes + self.v.nbytes
        if self.cross_kv is not None:
            total += sum(k.nbytes + v.nbytes for k, v in self.cross_kv)
        return total
