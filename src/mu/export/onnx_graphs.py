"""The computations `mu export onnx` traces: one `nn.Module` per ONNX graph, over a model's own parameters.

    encoder-decoder   EncoderGraph      input_ids | inputs_embeds, attention_mask
                                        -> cross_key.{i}, cross_value.{i}   (every decoder layer's, computed once)
                      DecoderStepGraph  input_ids, position_ids, attention_mask, encoder_attention_mask,
                                        past_key.{i}, past_value.{i}, cross_key.{i}, cross_value.{i}
                                        -> logits (last position), present_key.{i}, present_value.{i}
    decoder-only      DecoderStepGraph  the same without the encoder inputs: prompt and steps, one graph
    vision-language   VisionGraph       pixel_values -> image_features   (tower + projector)
                      EmbedGraph        input_ids -> inputs_embeds       (to splice the images in)

Every graph is a pure function of its inputs (no cache object, no Python branch on data), so the
batch, prompt, cache and step lengths stay dynamic. The masks mu's PyTorch path builds lazily are
explicit here: `attention_mask` says which self-attention keys (past + new) are real tokens, and
the graph adds the causal rule, exactly as `decode_step` / `prefill` do:

- a query sees the valid keys up to its own position, and always itself;
- encoder and cross-attention see the valid encoder positions (all of them if a row has none).

The layers are the model's (`RMSNorm`, the `Attention` projections and head grouping, `apply_rope`);
the fast paths of eager inference (`split_linear`, fused projections, SDPA) are left out, since they
depend on thread counts and autograd state that a traced graph must not capture. Attention is
written as matmul + softmax over the KV groups, so grouped-query attention needs no repeated K/V.
`tests/test_onnx.py` checks every graph's outputs against the PyTorch model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mu.config import MuConfig
from mu.model.layers import Attention, apply_rope, rope_inv_freq


def rope(config: MuConfig, positions: Tensor, seq_len) -> tuple[Tensor, Tensor]:
    """cos/sin (B|1, T, 1, head_dim) at integer `positions` (B, T) or (T,), in fp32.

    `seq_len` (a traced length) is what the NTK-dynamic scaling sees (`rope_inv_freq`); it only
    matters when `rope_factor > 1`, and then the base is computed in the graph.
    """
    if config.rope_factor > 1.0:
        dim, factor, block = config.head_dim, config.rope_factor, config.block_size
        length = torch.full((), seq_len, dtype=torch.float64, device=positions.device).clamp(min=float(block))
        base = config.rope_theta * ((factor * length / block) - (factor - 1)) ** (dim / (dim - 2))
        exponents = torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim
        inv_freq = (1.0 / base ** exponents).to(torch.float32)
    else:
        inv_freq = rope_inv_freq(config, config.block_size, device=positions.device)
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # (..., T, head_dim / 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    if emb.dim() == 2:
        emb = emb.unsqueeze(0)
    return emb.cos().unsqueeze(2), emb.sin().unsqueeze(2)


def attention(attn: Attention, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """q (B, T, n_head, hd); k, v (B, n_kv_head, S, hd); mask bool (B, 1, T|1, S) -> output projection (B, T, n_embd).

    The query heads are grouped by the KV head they read (`Attention._grouped`), so each KV head's
    keys broadcast over its group instead of being repeated.
    """
    qg = attn._grouped(q)  # (B, n_kv_head, groups, T, hd)
    scores = torch.matmul(qg, k.unsqueeze(2).transpose(-1, -2)) * (attn.head_dim ** -0.5)  # (B, KV, G, T, S)
    scores = scores.masked_fill(~mask.unsqueeze(2), torch.finfo(scores.dtype).min)
    o = torch.matmul(scores.softmax(-1), v.unsqueeze(2))  # (B, KV, G, T, hd)
    return attn.out_linear(attn._ungrouped(o))


def self_qkv(attn: Attention, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q (B, T, n_head, hd) and k, v (B, n_kv_head, T, hd) of self-attention, q and k rotated."""
    B, T, _ = x.shape
    q = attn.q_linear(x).view(B, T, attn.n_head, attn.head_dim)
    k = attn.k_linear(x).view(B, T, attn.n_kv_head, attn.head_dim)
    v = attn.v_linear(x).view(B, T, attn.n_kv_head, attn.head_dim)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin).transpose(1, 2), v.transpose(1, 2)


def cross_kv(attn: Attention, enc_out: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-attention K/V of the encoder output, (B, n_kv_head, S, hd) each."""
    B, S, _ = enc_out.shape
    k = attn.k_linear(enc_out).view(B, S, attn.n_kv_head, attn.head_dim)
    v = attn.v_linear(enc_out).view(B, S, attn.n_kv_head, attn.head_dim)
    return k.transpose(1, 2), v.transpose(1, 2)


def mlp(block: nn.Module, x: Tensor) -> Tensor:
    return block.mlp.fc2(F.gelu(block.mlp.fc1(x), approximate="tanh"))


def padding_mask(valid: Tensor) -> Tensor:
    """(B, S) valid keys -> (B, 1, 1, S); a row with no valid key sees all (as `key_padding_mask`)."""
    valid = valid | ~valid.any(-1, keepdim=True)
    return valid[:, None, None, :]


def step_mask(valid: Tensor, new: int | Tensor) -> Tensor:
    """Self-attention mask (B, 1, T, P+T) of T new queries over `valid` keys (B, P+T), as `causal_padding_mask`."""
    L = valid.shape[1]
    k_pos = torch.arange(L, device=valid.device)
    q_pos = k_pos[L - new:].unsqueeze(-1)  # (T, 1): the new tokens are the last T keys
    causal = k_pos <= q_pos  # (T, P+T)
    return (causal & valid[:, None, None, :]) | (k_pos == q_pos)


class EncoderGraph(nn.Module):
    """The encoder, plus every decoder layer's cross-attention K/V of its output (onnxruntime-genai's
    Whisper layout: the decoder step never sees the encoder output, only these)."""

    def __init__(self, model: nn.Module, embeds_input: bool = False):
        super().__init__()
        self.model = model
        self.config = model.config
        self.embeds_input = embeds_input  # a VLM feeds inputs_embeds (text and image features spliced)

    def forward(self, inputs: Tensor, attention_mask: Tensor) -> tuple[Tensor, ...]:
        t = self.model.transformer
        x = inputs if self.embeds_input else t.wte(inputs)  # (B, S, n_embd)
        valid = attention_mask.bool()
        S = x.shape[1]
        positions = torch.arange(S, device=x.device) - (S - 1) // 2  # the paper's centred encoder positions
        cos, sin = rope(self.config, positions, S)
        mask = padding_mask(valid)
        for block in t.e:
            q, k, v = self_qkv(block.attn, block.ln1(x), cos, sin)
            x = x + attention(block.attn, q, k, v, mask)
            x = x + mlp(block, block.ln2(x))
        enc_out = t.ln_e(x)
        return tuple(kv for block in t.h for kv in cross_kv(block.cross_attn, enc_out))


class DecoderStepGraph(nn.Module):
    """T new tokens through the decoder with a self-attention cache of P positions -> logits of the last
    new token (B, vocab_size) and the caches grown to P + T. The decoder-only twin's prompt is one such
    step (P = 0, T = prompt length), as is the encoder-decoder's start token."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config
        self.encdec = model.config.arch == "encdec"

    def forward(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor, *caches: Tensor
                ) -> tuple[Tensor, ...]:
        t = self.model.transformer
        n = len(t.h)
        past = caches[:2 * n]
        if self.encdec:
            cross_mask = padding_mask(caches[2 * n].bool())
            cross = caches[2 * n + 1:]
        x = t.wte(input_ids)  # (B, T, n_embd)
        T = input_ids.shape[1]
        valid = attention_mask.bool()  # (B, P + T)
        cos, sin = rope(self.config, position_ids, valid.shape[1])
        mask = step_mask(valid, T)
        present = []
        for i, block in enumerate(t.h):
            attn = block.causal_attn if self.encdec else block.attn
            q, k, v = self_qkv(attn, block.ln1(x), cos, sin)
            k = torch.cat([past[2 * i], k], dim=2)  # (B, n_kv_head, P + T, hd)
            v = torch.cat([past[2 * i + 1], v], dim=2)
            present += [k, v]
            x = x + attention(attn, q, k, v, mask)
            if self.encdec:
                h = block.ln2(x)
                B = h.shape[0]
                q = block.cross_attn.q_linear(h).view(B, T, attn.n_head, attn.head_dim)
                x = x + attention(block.cross_attn, q, cross[2 * i], cross[2 * i + 1], cross_mask)
                x = x + mlp(block, block.ln3(x))
            else:
                x = x + mlp(block, block.ln2(x))
        logits = F.linear(t.ln_f(x[:, -1]), self.model.lm_head.weight)  # (B, vocab_size)
        return (logits, *present)


class VisionGraph(nn.Module):
    """A VLM's vision tower + projector: views (N, 3, S, S) -> image features (N, tokens_per_view, n_embd)."""

    def __init__(self, vlm: nn.Module):
        super().__init__()
        self.vlm = vlm

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.vlm.projector(self.vlm.tower(pixel_values))


class EmbedGraph(nn.Module):
    """A VLM's token embedding: input_ids (B, S) -> (B, S, n_embd), for splicing image features in."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.wte = model.transformer.wte

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.wte(input_ids)
