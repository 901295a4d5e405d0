"""Mu: the encoder-decoder of "Return of the Encoder" (2/3 encoder, 1/3 decoder layers).

Module and parameter names match the paper's released checkpoints:
transformer.{wte, e.{i}, ln_e, h.{i}, ln_f} and a tied lm_head.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from mu.config import MuConfig
from mu.model.base import ModelOutput, MuModel, lm_loss
from mu.model.cache import KVCache
from mu.model.fast import speed_up_
from mu.model.layers import (DecoderBlock, RMSNorm, SelfAttentionBlock, causal_padding_mask, encoder_positions,
                             key_padding_mask, rope_cos_sin)


class MuEncoderDecoder(MuModel):
    def __init__(self, config: MuConfig):
        super().__init__()
        if config.arch != "encdec":
            raise ValueError(f"MuEncoderDecoder needs arch='encdec', got {config.arch!r}")
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            e=nn.ModuleList([SelfAttentionBlock(config, i) for i in range(config.n_encoder_layer)]),
            ln_e=RMSNorm(config.n_embd),
            h=nn.ModuleList([DecoderBlock(config, i) for i in range(config.n_decoder_layer)]),
            ln_f=RMSNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.init_weights()
        speed_up_(self)  # the CPU inference fast paths (mu.model.fast); parameters unchanged

    def encode(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
               inputs_embeds: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """input_ids (B, S) -> encoder output (B, S, n_embd) and valid positions (B, S).

        `inputs_embeds` (B, S, n_embd) replaces the token embeddings (e.g. image features spliced
        in by a vision-language model); then `attention_mask` is required unless all positions are valid.
        """
        if inputs_embeds is None:
            x = self.transformer.wte(input_ids)  # (B, S, n_embd)
            valid = input_ids != self.config.pad_token_id if attention_mask is None else attention_mask.bool()
        else:
            x = inputs_embeds
            valid = (torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if attention_mask is None
                     else attention_mask.bool())
        S = x.shape[1]
        rope = rope_cos_sin(self.config, encoder_positions(S, x.device), S, x.dtype)
        mask = None if bool(valid.all()) else key_padding_mask(valid)
        for block in self.transformer.e:
            x = block(x, rope, mask)
        return self.transformer.ln_e(x), valid

    def decode(self, decoder_input_ids: Tensor, enc_out: Tensor, enc_valid: Tensor,
               decoder_attention_mask: Optional[Tensor] = None) -> Tensor:
        """Uncached decoder pass over the whole target prefix -> hidden states (B, T, n_embd) after ln_f."""
        pad = self.config.pad_token_id
        valid = decoder_input_ids != pad if decoder_attention_mask is None else decoder_attention_mask.bool()
        x = self.transformer.wte(decoder_input_ids)
        T = x.shape[1]
        rope = rope_cos_sin(self.config, torch.arange(T, device=x.device), T, x.dtype)
        self_mask = None if bool(valid.all()) else causal_padding_mask(valid, T)
        cross_mask = None if bool(enc_valid.all()) else key_padding_mask(enc_valid)
        for block in self.transformer.h:
            x = block(x, rope, block.cross_kv(enc_out), self_mask, cross_mask, is_causal=self_mask is None)
        return self.transformer.ln_f(x)

    def forward(self, encoder_input_ids: Tensor, decoder_input_ids: Tensor, targets: Optional[Tensor] = None,
                encoder_attention_mask: Optional[Tensor] = None,
                decoder_attention_mask: Optional[Tensor] = None) -> ModelOutput:
        """Teacher-forced pass. The decoder may have a whole multiple k of the encoder's B rows: each source is
        encoded once and serves decoder rows i, i + B, ..., i + (k - 1)B (e.g. gold and sampled targets of the
        same prompts in on-policy distillation)."""
        B, rows = encoder_input_ids.shape[0], decoder_input_ids.shape[0]
        if rows != B and (B == 0 or rows % B):
            raise ValueError(f"batch size mismatch: {rows} decoder rows for {B} encoder rows (expected a whole "
                             "multiple)")
        enc_out, enc_valid = self.encode(encoder_input_ids, encoder_attention_mask)
        if rows != B:
            enc_out, enc_valid = enc_out.repeat(rows // B, 1, 1), enc_valid.repeat(rows // B, 1)
        logits = self.lm_head(self.decode(decoder_input_ids, enc_out, enc_valid, decoder_attention_mask))
        loss = lm_loss(logits, targets, self.config.pad_token_id) if targets is not None else None
        return ModelOutput(logits=logits, loss=loss)

    # -- cached generation ---------------------------------------------------------------------

    def prefill(self, input_ids: Tensor, attention_mask: Optional[Tensor], cache: KVCache,
                start_ids: Tensor, inputs_embeds: Optional[Tensor] = None) -> Tensor:
        """Encode once, project every decoder layer's cross-attention K/V once, feed the start token(s)."""
        enc_out, valid = self.encode(input_ids, attention_mask, inputs_embeds)
        # contiguous once here, so every step's attention reads them densely
        cache.set_cross([tuple(t.contiguous() for t in block.cross_kv(enc_out)) for block in self.transformer.h],
                        valid)
        return self.decode_step(start_ids, cache)

    def _run_decoder(self, x, rope, self_mask, is_causal, cache):
        for block, cross_kv in zip(self.transformer.h, cache.cross_kv):
            x = block(x, rope, cross_kv, self_mask, cache.cross_mask, is_causal, cache=cache)
        return x
