"""The decoder-only twin of Mu: the same blocks (causal self-attention + MLP), no encoder.

It is the baseline of every comparison, so it shares the encoder-decoder's
kernels, cache and generation loop. Parameter names: transformer.{wte, h.{i}, ln_f}, tied lm_head.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from mu.config import MuConfig
from mu.model.base import ModelOutput, MuModel, lm_loss
from mu.model.cache import KVCache
from mu.model.fast import speed_up_
from mu.model.layers import RMSNorm, SelfAttentionBlock, causal_padding_mask, rope_cos_sin


class MuDecoderOnly(MuModel):
    def __init__(self, config: MuConfig):
        super().__init__()
        if config.arch != "deconly":
            raise ValueError(f"MuDecoderOnly needs arch='deconly', got {config.arch!r}")
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([SelfAttentionBlock(config, i) for i in range(config.n_decoder_layer)]),
            ln_f=RMSNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.init_weights()
        speed_up_(self)  # the CPU inference fast paths (mu.model.fast); parameters unchanged

    def hidden_states(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """Uncached pass, positions 0..T-1 (right padding) -> hidden states (B, T, n_embd) after ln_f."""
        valid = input_ids != self.config.pad_token_id if attention_mask is None else attention_mask.bool()
        x = self.transformer.wte(input_ids)
        T = x.shape[1]
        rope = rope_cos_sin(self.config, torch.arange(T, device=x.device), T, x.dtype)
        mask = None if bool(valid.all()) else causal_padding_mask(valid, T)
        for block in self.transformer.h:
            x = block(x, rope, mask, is_causal=mask is None)
        return self.transformer.ln_f(x)

    def forward(self, input_ids: Tensor, targets: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None) -> ModelOutput:
        logits = self.lm_head(self.hidden_states(input_ids, attention_mask))
        loss = lm_loss(logits, targets, self.config.pad_token_id) if targets is not None else None
        return ModelOutput(logits=logits, loss=loss)

    # -- cached generation ---------------------------------------------------------------------

    def prefill(self, input_ids: Tensor, attention_mask: Optional[Tensor], cache: KVCache,
                start_ids: Optional[Tensor] = None) -> Tensor:
        """Run the (left-padded) prompt through the stack, filling the cache; logits of the last position.

        Each row's RoPE positions start at its first real token, so a left-padded row matches the
        same prompt run alone.
        """
        B, T = input_ids.shape
        valid = input_ids != self.config.pad_token_id if attention_mask is None else attention_mask.bool()
        cache.append_valid(valid)
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        x = self.transformer.wte(input_ids)
        rope = rope_cos_sin(self.config, positions, T, x.dtype)
        all_valid = bool(valid.all())
        mask = None if all_valid else causal_padding_mask(valid, T)
        x = self._run_decoder(x, rope, mask, all_valid, cache)
        cache.advance(T)
        cache.positions = valid.sum(-1)
        return self.lm_head(self.transformer.ln_f(x[:, -1]))

    def _run_decoder(self, x, rope, self_mask, is_causal, cache):
        for block in self.transformer.h:
            x = block(x, rope, self_mask, is_causal, cache=cache)
        return x
