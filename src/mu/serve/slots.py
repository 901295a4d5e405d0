"""A slot-based KV cache for continuous batching: rows join and leave between decode steps.

`KVCache` keeps every row aligned (one shared length; left padding), which suits one `generate`
call. A server adds and drops rows while others are mid-answer, so `SlotCache` gives each row (slot)
its own length and RoPE position, and is read by the unchanged `decode_step` of either architecture:

    logits, src = model.prefill(...) on a fresh KVCache    # new requests, batched among themselves
    slot = cache.admit(src, row)                           # copy that row's K/V (and cross K/V) in
    logits = model.decode_step(tokens, cache)              # one token for every active row
    moved = cache.release(slot)                            # a finished row leaves; the last row moves in

Layout: buffers of `max_batch` rows; the active rows are always slots 0..n-1, so every step reads a
prefix of the batch axis (a view, no gather). Row b's self-attention K/V sit in columns
0..lengths[b]-1 and its next token is written at column lengths[b] (a per-row scatter); a step
attends over columns 0..max(lengths), with `valid` masking the columns a row has not filled (or
that held padding in its prefill). The encoder-decoder's cross-attention K/V are kept per row in
the same way (columns 0..S_b-1, `cross_valid` masking the rest). Buffers grow (by doubling) when a
row needs more columns than they hold.

Used by `decode_step` exactly as a `KVCache` is: `append_valid` (before the layers; per-row column),
`update` (per layer), `advance` and `positions += 1` (after the layers), and the attributes
`length` (the longest active row, so `length + 1` is the step's key window), `valid`, `positions`,
`cross_kv`, `cross_mask`, `rope`, `max_len`, `all_valid`, `static`. Only single-token steps are
supported (a row's prompt goes through `prefill` on its own cache first).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mu.model.cache import KVCache


class SlotCache(KVCache):
    def __init__(self, n_layer: int, max_batch: int, n_kv_head: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str | None = None, cross: bool = False, max_len: int = 64,
                 cross_len: int = 64):
        super().__init__(n_layer, max_batch, n_kv_head, head_dim, max_len, dtype, device)
        self.max_batch = max_batch
        self.n = 0  # active rows: slots 0..n-1
        self._valid_all = self.valid  # (max_batch, max_len); `valid` is the active rows' view
        self._positions_all = self.positions  # (max_batch,)
        self._lengths = torch.zeros(max_batch, dtype=torch.long, device=device)  # filled columns per slot
        self._lengths_py = [0] * max_batch  # the same, on the host (no device sync to find the longest)
        self.cross = cross
        if cross:
            shape = (n_layer, max_batch, n_kv_head, cross_len, head_dim)
            self._cross_k = torch.zeros(shape, dtype=dtype, device=device)
            self._cross_v = torch.zeros(shape, dtype=dtype, device=device)
            self._cross_valid_all = torch.zeros(max_batch, cross_len, dtype=torch.bool, device=device)
            self._cross_width = [0] * max_batch  # encoder columns per slot
        self._refresh()

    # -- membership -------------------------------------------------------------------------------

    @property
    def free(self) -> int:
        return self.max_batch - self.n

    def admit(self, src: KVCache, row: int) -> int:
        """Copy row `row` of a prefilled `src` (self K/V, valid slots, position, cross K/V) into a free slot."""
        if self.n == self.max_batch:
            raise RuntimeError(f"no free slot (max_batch {self.max_batch})")
        slot, L = self.n, src.length
        self._ensure_len(L + 1)
        self.k[:, slot, :, :L] = src.k[:, row, :, :L]
        self.v[:, slot, :, :L] = src.v[:, row, :, :L]
        self._valid_all[slot] = False
        self._valid_all[slot, :L] = src.valid[row, :L]
        self._positions_all[slot] = src.positions[row]
        self._lengths[slot] = L
        self._lengths_py[slot] = L
        if self.cross:
            S = src.cross_valid.shape[1]
            self._ensure_cross(S)
            for layer, (k, v) in enumerate(src.cross_kv):
                self._cross_k[layer, slot, :, :S] = k[row]
                self._cross_v[layer, slot, :, :S] = v[row]
            self._cross_valid_all[slot] = False
            self._cross_valid_all[slot, :S] = src.cross_valid[row]
            self._cross_width[slot] = S
        self.n += 1
        self._refresh()
        return slot

    def release(self, slot: int) -> Optional[int]:
        """Free `slot`; the last active row moves into it. Returns the slot that moved (now `slot`), or None."""
        if not 0 <= slot < self.n:
            raise IndexError(f"slot {slot} is not active (active rows 0..{self.n - 1})")
        last = self.n - 1
        moved = None
        if slot != last:
            width = self._lengths_py[last]
            self.k[:, slot, :, :width] = self.k[:, last, :, :width]
            self.v[:, slot, :, :width] = self.v[:, last, :, :width]
            self._valid_all[slot] = self._valid_all[last]
            self._positions_all[slot] = self._positions_all[last]
            self._lengths[slot] = self._lengths[last]
            self._lengths_py[slot] = width
            if self.cross:
                S = self._cross_width[last]
                self._cross_k[:, slot, :, :S] = self._cross_k[:, last, :, :S]
                self._cross_v[:, slot, :, :S] = self._cross_v[:, last, :, :S]
                self._cross_valid_all[slot] = self._cross_valid_all[last]
                self._cross_width[slot] = S
            moved = last
        self._valid_all[last] = False
        self._lengths[last] = 0
        self._lengths_py[last] = 0
        if self.cross:
            self._cross_valid_all[last] = False
            self._cross_width[last] = 0
        self.n -= 1
        self._refresh()
        return moved

    def clear(self) -> None:
        """Drop every row (after a failed step, whose cache state cannot be trusted)."""
        while self.n:
            self.release(self.n - 1)

    def _refresh(self) -> None:
        """Point the attributes `decode_step` reads at the active rows."""
        n = self.n
        self.valid = self._valid_all[:n]
        self.positions = self._positions_all[:n]
        self.length = max(self._lengths_py[:n], default=0)
        self.all_valid = False  # rows differ in length: every step needs the key mask
        self._rows = torch.arange(n, device=self.k.device)
        if self.cross:
            S = max(self._cross_width[:n], default=0)
            self.set_cross([(self._cross_k[layer, :n, :, :S], self._cross_v[layer, :n, :, :S])
                            for layer in range(self._cross_k.shape[0])], self._cross_valid_all[:n, :S])

    # -- growth -------------------------------------------------------------------------------------

    def _ensure_len(self, needed: int) -> None:
        if needed <= self.max_len:
            return
        new = max(needed, 2 * self.max_len)
        grow = new - self.max_len
        self.k = torch.nn.functional.pad(self.k, (0, 0, 0, grow))
        self.v = torch.nn.functional.pad(self.v, (0, 0, 0, grow))
        self._split_layers()
        self._valid_all = torch.nn.functional.pad(self._valid_all, (0, grow))
        self.max_len = new
        self.rope = None  # the RoPE table covers max_len positions: rebuilt on the next step
        self._refresh()

    def _ensure_cross(self, needed: int) -> None:
        width = self._cross_k.shape[3]
        if needed <= width:
            return
        grow = max(needed, 2 * width) - width
        self._cross_k = torch.nn.functional.pad(self._cross_k, (0, 0, 0, grow))
        self._cross_v = torch.nn.functional.pad(self._cross_v, (0, 0, 0, grow))
        self._cross_valid_all = torch.nn.functional.pad(self._cross_valid_all, (0, grow))
        self._refresh()

    # -- what decode_step calls -----------------------------------------------------------------

    def append_valid(self, valid: Tensor) -> None:
        """Mark each active row's next column (its own length) with whether the new token is real."""
        if valid.shape != (self.n, 1):
            raise ValueError(f"a slot cache takes one token for each of its {self.n} active rows, got "
                             f"{tuple(valid.shape)}")
        self._ensure_len(self.length + 1)
        self._valid_all[self._rows, self._lengths[:self.n]] = valid[:, 0]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write one new K/V per row (n, 1, n_kv_head, hd) at the row's own column; return the key window."""
        cols = self._lengths[:self.n]
        k_layer, v_layer = self.k_layers[layer], self.v_layers[layer]  # (max_batch, n_kv_head, max_len, hd)
        k_layer[self._rows, :, cols] = k[:, 0]
        v_layer[self._rows, :, cols] = v[:, 0]
        end = self.length + 1
        return k_layer[:self.n, :, :end], v_layer[:self.n, :, :end]

    def advance(self, n: int) -> None:
        if n != 1:
            raise ValueError(f"a slot cache advances one column per step, got {n}")
        self._lengths[:self.n] += 1
        for b in range(self.n):
            self._lengths_py[b] += 1
        self.length += 1

    def reorder(self, index: Tensor) -> None:
        raise NotImplementedError("a slot cache does not reorder rows (beam search runs on a KVCache)")

    def nbytes(self) -> int:
        total = self.k.nbytes + self.v.nbytes
        if self.cross:
            total += self._cross_k.nbytes + self._cross_v.nbytes
        return total
