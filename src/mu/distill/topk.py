"""Precomputed teacher outputs for off-policy distillation: the top-k logits at every gold target position.

With gold targets the teacher sees the same sequences every epoch, and its forward pass dominates
the cost of KD, so it can be run once. Per target position the cache keeps the k largest logits and
their ids plus the logsumexp of all logits / tau over the common vocabulary, which is enough to
rebuild the teacher's distribution exactly on those k ids and to spread the remaining mass evenly
over the rest (`mu.distill.losses.topk_log_probs`).

Storage: flat arrays over all target tokens (values fp16, ids int32, logsumexp fp32) plus each
example's start and length, in one safetensors file with the settings it was built for; a cache
built for other data, another k, temperature or vocabulary is rebuilt rather than reused. Under
torchrun each rank builds the examples i with i % world == rank and the shards are merged.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from mu.atomic import atomic_file
from mu.distill.targets import teacher_inputs
from mu.errors import MuError


@dataclass
class TopKCache:
    values: Tensor  # (N_tokens, k) fp16 raw teacher logits, largest first
    indices: Tensor  # (N_tokens, k) int32 their token ids
    lse: Tensor  # (N_tokens,) fp32 logsumexp(teacher logits / tau) over the common vocabulary
    starts: Tensor  # (N_examples,) int64 first row of each example (-1: not in this cache/shard)
    lengths: Tensor  # (N_examples,) int64 target length of each example (-1: not in this cache/shard)
    k: int
    temperature: float
    vocab: int
    fingerprint: str  # identifies the data + teacher the cache was built for

    @property
    def n_examples(self) -> int:
        return self.starts.numel()

    def settings(self) -> dict:
        return dict(k=self.k, temperature=self.temperature, vocab=self.vocab, fingerprint=self.fingerprint,
                    n_examples=self.n_examples)

    def lookup(self, index: Tensor, width: int, device: Optional[torch.device] = None
               ) -> tuple[Tensor, Tensor, Tensor]:
        """Batch rows for dataset indices (B,) padded to `width` target positions ->
        values (B, width, k) fp32, indices (B, width, k) int64, lse (B, width) fp32 (zeros at padding)."""
        idx = index.cpu().long()
        if bool((idx < 0).any()) or bool((idx >= self.n_examples).any()):
            raise MuError(f"top-k teacher cache holds {self.n_examples} examples; batch asks for {idx.tolist()}")
        B = idx.numel()
        values = torch.zeros(B, width, self.k)
        ids = torch.zeros(B, width, self.k, dtype=torch.long)
        lse = torch.zeros(B, width)
        for b, i in enumerate(idx.tolist()):
            start, n = int(self.starts[i]), int(self.lengths[i])
            if n < 0:
                raise MuError(f"example {i} is not in the top-k teacher cache (built for other data?)")
            n_use = min(n, width)
            values[b, :n_use] = self.values[start:start + n_use].float()
            ids[b, :n_use] = self.indices[start:start + n_use].long()
            lse[b, :n_use] = self.lse[start:start + n_use]
        return values.to(device), ids.to(device), lse.to(device)

    # -- files ---------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        with atomic_file(path) as tmp:
            save_file({"values": self.values.contiguous(), "indices": self.indices.contiguous(),
                       "lse": self.lse.contiguous(), "starts": self.starts.contiguous(),
                       "lengths": self.lengths.contiguous()}, tmp,
                      metadata={"mu_topk": json.dumps(self.settings())})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TopKCache":
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["mu_topk"])
                t = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
            raise MuError(f"{path}: not a top-k teacher cache ({e})") from None
        return cls(t["values"], t["indices"], t["lse"], t["starts"], t["lengths"], int(meta["k"]),
                   float(meta["temperature"]), int(meta["vocab"]), str(meta["fingerprint"]))

    @classmethod
    def merge(cls, shards: Sequence["TopKCache"]) -> "TopKCache":
        """Combine caches that each hold a disjoint subset of the same examples."""
        first = shards[0]
        starts = torch.full_like(first.starts, -1)
        lengths = torch.full_like(first.lengths, -1)
        offset = 0
        for s in shards:
            if (s.k, s.temperature, s.vocab, s.fingerprint, s.n_examples) != (
                    first.k, first.temperature, first.vocab, first.fingerprint, first.n_examples):
                raise ValueError("top-k cache shards were built with different settings")
            have = s.lengths >= 0
            starts[have] = s.starts[have] + offset
            lengths[have] = s.lengths[have]
            offset += s.values.shape[0]
        return cls(torch.cat([s.values for s in shards]), torch.cat([s.indices for s in shards]),
                   torch.cat([s.lse for s in shards]), starts, lengths, first.k, first.temperature, first.vocab,
                   first.fingerprint)


def fingerprint(features: Sequence[dict], teacher_name: str) -> str:
    """A short hash of the examples' token ids and the teacher's identity."""
    h = hashlib.sha1(teacher_name.encode())
    for f in features:
        h.update(repr((f["source_ids"], f["target_ids"])).encode())
    return h.hexdigest()[:16]


def _pad(rows: list[list[int]], value: int) -> tuple[Tensor, Tensor]:
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = True
    return ids, mask


@torch.no_grad()
def build_topk_cache(teacher, features: Sequence[dict], k: int, temperature: float, vocab: int,
                     batch_size: int = 16, pad_token_id: int = 0, bos_token_id: int = 1, rank: int = 0,
                     world_size: int = 1, fp: Optional[str] = None, progress: bool = False) -> TopKCache:
    """Run the teacher over the gold targets of `features` (those with i % world_size == rank) once."""
    if not 1 <= k <= vocab:
        raise MuError(f"top-k must be between 1 and the common vocabulary size {vocab}, got {k}")
    mine = [i for i in range(len(features)) if i % world_size == rank]
    mine.sort(key=lambda i: -(len(features[i]["source_ids"]) + len(features[i]["target_ids"])))  # less padding
    starts = torch.full((len(features),), -1, dtype=torch.long)
    lengths = torch.full((len(features),), -1, dtype=torch.long)
    values, indices, lses = [], [], []
    row = 0
    batches = [mine[j:j + batch_size] for j in range(0, len(mine), batch_size)]
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="teacher top-k", unit="batch", dynamic_ncols=True)
    for batch in batches:
        src, src_mask = _pad([features[i]["source_ids"] for i in batch], pad_token_id)
        tgt, tgt_mask = _pad([features[i]["target_ids"] for i in batch], pad_token_id)
        ti = teacher_inputs(src, src_mask, tgt, tgt_mask, pad_token_id, bos_token_id)
        logits = teacher.target_logits(ti.input_ids, ti.attention_mask, ti.positions)[..., :vocab]  # (B, T, V)
        lse = torch.logsumexp(logits / temperature, dim=-1)  # (B, T)
        top = torch.topk(logits, k, dim=-1)
        for b, i in enumerate(batch):
            n = len(features[i]["target_ids"])
            values.append(top.values[b, :n].to(torch.float16).cpu())
            indices.append(top.indices[b, :n].to(torch.int32).cpu())
            lses.append(lse[b, :n].cpu())
            starts[i], lengths[i] = row, n
            row += n
    empty = (torch.zeros(0, k, dtype=torch.float16), torch.zeros(0, k, dtype=torch.int32), torch.zeros(0))
    return TopKCache(torch.cat(values) if values else empty[0], torch.cat(indices) if indices else empty[1],
                     torch.cat(lses) if lses else empty[2], starts, lengths, k, float(temperature), vocab,
                     fp or fingerprint(features, getattr(teacher, "name", "teacher")))
