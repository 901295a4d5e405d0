"""Training FLOPs: 6 x (parameters a token passes through) x tokens, per stack.

The usual estimate (Kaplan et al. 2020) is 6·N·D: 2 FLOPs per parameter per token forward, 4
backward. An encoder-decoder's tokens do not all pass through the same parameters, so each
parameter is counted for the tokens it actually processes:

    per encoder token   encoder blocks + ln_e
                        + every decoder layer's cross-attention K/V projections
                          (they read the encoder output once per encoder token)
    per decoder token   decoder blocks without those K/V projections + ln_f
                        + lm_head (vocab_size x n_embd)

The tied embedding matrix is counted once, as the output projection (lm_head) on decoder tokens: the
input lookup is a gather, not a matmul. The decoder-only model has only decoder tokens (every input
position). Tokens are real tokens (padding excluded). Attention's score/value products
(~ 2·2·T·qkv_embd per token per layer) are not in 6·N·D, as in Kaplan's and Chinchilla's
parameter counts; with the sequence lengths used here they add roughly 5-25%.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from mu.config import MuConfig


@dataclass(frozen=True)
class FlopsParams:
    encoder: int  # parameters applied once per encoder token
    decoder: int  # parameters applied once per decoder token (lm_head included)
    total: int  # all parameters, the tied embedding counted once

    def as_dict(self) -> dict[str, int]:
        return {"encoder": self.encoder, "decoder": self.decoder, "total": self.total}


def _key(config: MuConfig) -> tuple:
    return tuple(sorted(config.to_dict().items()))


@lru_cache(maxsize=32)
def _flops_params(key: tuple) -> FlopsParams:
    from mu.checkpoint import model_class

    config = MuConfig(**dict(key))
    with torch.device("meta"):
        model = model_class(config)(config)
    enc = dec = 0
    for name, p in model.named_parameters():  # tied lm_head/wte appears once, as transformer.wte.weight
        n = p.numel()
        if name.startswith(("transformer.e.", "transformer.ln_e.")):
            enc += n
        elif ".cross_attn.k_linear." in name or ".cross_attn.v_linear." in name:
            enc += n
        else:  # decoder blocks, ln_f, and the embedding counted as lm_head
            dec += n
    return FlopsParams(encoder=enc, decoder=dec, total=enc + dec)


def flops_params(config: MuConfig) -> FlopsParams:
    """Parameters per encoder token and per decoder token (see the module docstring)."""
    return _flops_params(_key(config))


def training_flops(config: MuConfig, enc_tokens: float, dec_tokens: float) -> float:
    """6 x (encoder-token params x enc_tokens + decoder-token params x dec_tokens).

    For a decoder-only model pass every input token as `dec_tokens` (enc_tokens = 0).
    """
    p = flops_params(config)
    if config.arch == "deconly" and enc_tokens:
        raise ValueError("a decoder-only model has no encoder tokens: count its whole input as dec_tokens")
    return 6.0 * (p.encoder * float(enc_tokens) + p.decoder * float(dec_tokens))
