"""What both architectures share: output type, init, cached decode step, save, generate."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mu.config import MuConfig
from mu.model.cache import KVCache
from mu.model.io import save_model
from mu.model.layers import (causal_padding_mask, init_linear_and_embedding, rope_cos_sin, rope_scaled,
                             rope_table)


@dataclass
class ModelOutput:
    logits: Tensor  # (B, T, vocab_size)
    loss: Optional[Tensor] = None  # mean cross-entropy over non-ignored targets


def lm_loss(logits: Tensor, targets: Tensor, pad_token_id: int) -> Tensor:
    """Cross-entropy ignoring `pad_token_id` targets (the paper's convention) and -100 (the HF one)."""
    targets = targets.masked_fill(targets == -100, pad_token_id)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=pad_token_id)


class MuModel(nn.Module):
    """Base of `MuEncoderDecoder` and `MuDecoderOnly`. Subclasses define the stacks."""

    config: MuConfig
    tokenizer: Any = None  # an attached Hugging Face tokenizer, saved alongside the weights
    quantization: Optional[str] = None  # set by `quantize_` (an inference-only transform)
    # inference only: (tokens, cache) -> a decode step's logits and their argmax (the cache advanced), or None to
    # decline; the CPU fast paths set one that runs a step of one sequence as one native call
    # (`mu.model.fast.NativeDecoder`)
    fused_decode: Optional[Callable[..., Optional[tuple[Tensor, Tensor]]]] = None

    # -- construction --------------------------------------------------------------------------

    def tie_weights(self) -> None:
        self.lm_head.weight = self.transformer.wte.weight

    @torch.no_grad()
    def init_weights(self, scheme: str = "paper") -> None:
        """All initialisation in one place (works after building on the meta device + `to_empty`);
        `scheme` "paper" (N(0, 0.02)) or "fan_in" (see `init_linear_and_embedding`)."""
        init_linear_and_embedding(self, scheme)
        self.tie_weights()

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        return n - self.transformer.wte.weight.numel() if exclude_embeddings else n

    @property
    def device(self) -> torch.device:
        return self.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.wte.weight.dtype

    # -- cached decoding (shared by both architectures) ----------------------------------------

    def decoder_blocks(self) -> nn.ModuleList:
        return self.transformer.h

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        c = self.config
        return KVCache(len(self.decoder_blocks()), batch, c.n_kv_head, c.head_dim, max_len, self.dtype, self.device)

    def _run_decoder(self, x: Tensor, rope, self_mask: Optional[Tensor], is_causal: bool, cache: KVCache) -> Tensor:
        raise NotImplementedError

    def decode_step(self, tokens: Tensor, cache: KVCache) -> Tensor:
        """Feed new tokens (B, T) through the decoder stack, reading and extending `cache`.

        Returns the logits at the last position, (B, vocab_size). Pad tokens are masked as keys
        (as in the paper's uncached decoding).
        """
        return self._step(tokens, cache)[0]

    def greedy_step(self, tokens: Tensor, cache: KVCache) -> tuple[Tensor, Tensor]:
        """`decode_step`'s logits (B, vocab_size) and their greedy pick (B,), `argmax`: where the native step runs,
        computed in its call (~0.1 ms of PyTorch's argmax less per token, docs/efficiency.md round 15)."""
        logits, pick = self._step(tokens, cache)
        return logits, logits.float().argmax(-1) if pick is None else pick

    def greedy_tokens(self, tokens: Tensor, cache: KVCache, n: int, eos_token_id: Optional[int] = None,
                      on_token: Optional[Callable[[Tensor], object]] = None) -> Optional[Tensor]:
        """Up to `n` greedy tokens (m,) after `tokens` (1, 1), the cache advanced by m, in one native call where the
        fused step runs (`mu.model.fast.NativeDecoder.greedy_tokens`: no Python between the steps, ~0.15-0.25 ms a
        token less, docs/efficiency.md round 15); the last is `eos_token_id` where given and picked; `on_token`
        gets each token, a (1,) tensor, as it is picked (a streamer's `put`). None where it does not run (the caller
        steps instead)."""
        run = getattr(self.fused_decode, "greedy_tokens", None)
        return None if run is None else run(tokens, cache, n, eos_token_id, on_token)

    def _step(self, tokens: Tensor, cache: KVCache) -> tuple[Tensor, Optional[Tensor]]:
        """A decode step's logits, and their argmax where the fused step computed it (else None)."""
        step = None if self.fused_decode is None else self.fused_decode(tokens, cache)
        if step is not None:
            return step
        if cache.static:
            return self._static_step(tokens, cache), None
        B, T = tokens.shape
        valid = tokens != self.config.pad_token_id
        cache.append_valid(valid)
        end = cache.length + T
        positions = cache.positions[:, None]  # (B, 1)
        if T > 1:
            positions = positions + torch.arange(T, device=tokens.device)  # (B, T)
        rope = self._step_rope(cache, positions, end)
        keys_valid = cache.valid[:, :end]
        if T == 1:  # the new token sees every valid key so far
            self_mask = None if cache.all_valid else keys_valid[:, None, None, :]
        else:
            self_mask = causal_padding_mask(keys_valid, T, offset=cache.length)
        logits = self._decode_core(self.transformer.wte(tokens), *rope, self_mask, cache)
        cache.advance(T)
        cache.positions += T
        return logits, None

    def _static_step(self, tokens: Tensor, cache: KVCache) -> Tensor:
        """`decode_step` for one token per row with the shapes of every step equal (see `KVCache.static`); on a GPU
        the step is recorded as a CUDA graph and replayed (`mu.model.cuda_graph`)."""
        B, T = tokens.shape
        if T != 1:
            raise ValueError(f"a static cache takes one token per row per step, got {T}")
        end = cache.length + 1
        if end > cache.max_len:
            raise RuntimeError(f"KV cache overflow: {end} positions > max_len {cache.max_len}")
        graphed = tokens.is_cuda and cache.graph is not False
        if graphed and not rope_scaled(self.config, cache.max_len):  # (RoPE's table is the same at every step)
            from mu.model.cuda_graph import graph_step

            logits = graph_step(self, tokens, cache)
        else:
            cache.slot = torch.full((1,), cache.length, dtype=torch.long, device=tokens.device)
            logits = self._static_body(tokens, cache, end)
        cache.advance(1)
        return logits

    def _static_body(self, tokens: Tensor, cache: KVCache, end: int) -> Tensor:
        """A static step's device work, at `cache.slot`: what a CUDA graph records. `end` (> the step's position)
        only decides whether RoPE is NTK-scaled."""
        cache.valid.index_copy_(1, cache.slot, tokens != self.config.pad_token_id)
        cos, sin = self._step_rope(cache, cache.positions[:, None], end)
        core = self._decode_core
        if cache.compiled:
            from mu.model.fast import compile_decode_

            core = compile_decode_(self)
        logits = core(self.transformer.wte(tokens), cos, sin, cache.valid[:, None, None, :], cache)
        cache.positions += 1
        return logits

    def _decode_core(self, x: Tensor, cos: Tensor, sin: Tensor, self_mask: Tensor, cache: KVCache) -> Tensor:
        """The layers, final norm and lm_head of a step; of a static one, what `generate(compile=True)` compiles."""
        x = self._run_decoder(x, (cos, sin), self_mask, False, cache)
        return self.lm_head(self.transformer.ln_f(x[:, -1]))

    def _step_rope(self, cache: KVCache, positions: Tensor, end: int) -> tuple[Tensor, Tensor]:
        """cos/sin (B, T, 1, hd) at `positions` (B, T): indexed from the cache's table unless NTK scaling is on."""
        if rope_scaled(self.config, end):  # the base depends on the length: recompute, as the paper does
            return rope_cos_sin(self.config, positions, end, self.dtype)
        cos, sin = self.rope_table(cache)
        return cos[positions].unsqueeze(2), sin[positions].unsqueeze(2)

    def rope_table(self, cache: KVCache) -> tuple[Tensor, Tensor]:
        """cos/sin for the cache's positions 0..max_len-1, (max_len, hd) each: made once per cache (see `rope_table`
        in `mu.model.layers` for when a step may index it)."""
        if cache.rope is None:
            cache.rope = rope_table(self.config, cache.max_len, self.dtype, cache.k.device)
        return cache.rope

    # -- inference transforms ------------------------------------------------------------------

    def quantize_(self, mode: str = "int8", include_encoder: bool = True) -> "MuModel":
        """Quantize the linear layers in place for CPU inference; see `mu.model.quantize`.

        mode "int8": int8 weights (per-channel scales) run by fbgemm's dynamic int8 GEMM; "int8wo":
        weight-only int8 for decode (`torch._weight_int8pack_mm`), dynamic int8 for the prefill; "int4":
        group-wise int4 for decode (`torch._weight_int4pack_mm_for_cpu`), dynamic int8 for the prefill.
        `include_encoder=False` leaves the encoder in float (exact prefill). Save before quantizing.
        """
        from mu.model.quantize import quantize_

        return quantize_(self, mode, include_encoder=include_encoder)

    # -- generation ----------------------------------------------------------------------------

    def generate(self, input_ids: Tensor, **kwargs: Any) -> Tensor:
        """Cached generation; see `mu.generation.generate` for the options."""
        from mu.generation import generate

        return generate(self, input_ids, **kwargs)

    # -- saving --------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write `config.json` + `model.safetensors` (+ tokenizer files) atomically into `directory`."""
        return save_model(self, directory)
