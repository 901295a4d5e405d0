"""A deliberately naive re-statement of the paper's model semantics, written from the spec in issue #2.

It computes attention with explicit matmuls, K/V heads tiled or interleaved by `repeat`,
masks filled with the dtype's minimum and RoPE tables rebuilt for every call — the way the
paper's released code does — so the fast model can be checked against it tensor for tensor.
It reads the same state dict as `mu` (the paper's names).
"""

import math

import torch
import torch.nn.functional as F


def rms(x, w, eps=1e-6):
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope_tables(cfg, L, centred):
    dim, base = cfg.head_dim, float(cfg.rope_theta)
    if cfg.rope_factor > 1:
        eff = max(L, cfg.block_size)
        base = base * ((cfg.rope_factor * eff / cfg.block_size) - (cfg.rope_factor - 1)) ** (dim / (dim - 2))
    inv = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
    pos = torch.arange(L, dtype=torch.float)
    if centred:
        pos = pos - (L - 1) // 2
    f = torch.outer(pos, inv)
    e = torch.cat([f, f], -1)
    return e.cos()[None, None], e.sin()[None, None]


def rot(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], -1)


def attention(sd, p, cfg, xq, xkv, key_mask, causal, rope, centred=False):
    B, T, _ = xq.shape
    S = xkv.shape[1]
    H, KV, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    q = F.linear(xq, sd[p + "q_linear.weight"], sd[p + "q_linear.bias"]).view(B, T, H, D).transpose(1, 2)
    k = F.linear(xkv, sd[p + "k_linear.weight"], sd[p + "k_linear.bias"]).view(B, S, KV, D).transpose(1, 2)
    v = F.linear(xkv, sd[p + "v_linear.weight"], sd[p + "v_linear.bias"]).view(B, S, KV, D).transpose(1, 2)
    if rope:
        cos, sin = rope_tables(cfg, T, centred)
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
    g = H // KV
    if cfg.is_interleaved:
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    else:
        k, v = torch.cat([k] * g, 1), torch.cat([v] * g, 1)
    att = q @ k.transpose(-1, -2)
    m = key_mask[:, None, None, :]
    if causal:
        m = m & torch.tril(torch.ones(T, S, dtype=torch.bool))
    att = att.masked_fill(~m, torch.finfo(att.dtype).min)
    w = torch.softmax(att / math.sqrt(D), -1)
    o = (w @ v).transpose(1, 2).reshape(B, T, H * D)
    return F.linear(o, sd[p + "out_linear.weight"], sd[p + "out_linear.bias"])


def mlp(sd, p, x):
    h = F.linear(x, sd[p + "fc1.weight"], sd[p + "fc1.bias"])
    h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    return F.linear(h, sd[p + "fc2.weight"], sd[p + "fc2.bias"])


def encdec_logits(sd, cfg, enc_ids, dec_ids):
    pad = cfg.pad_token_id
    emask, dmask = enc_ids != pad, dec_ids != pad
    x = F.embedding(enc_ids, sd["transformer.wte.weight"])
    for i in range(cfg.n_encoder_layer):
        p = f"transformer.e.{i}."
        h = rms(x, sd[p + "ln1.weight"])
        x = x + attention(sd, p + "attn.", cfg, h, h, emask, False, True, centred=True)
        x = x + mlp(sd, p + "mlp.", rms(x, sd[p + "ln2.weight"]))
    enc = rms(x, sd["transformer.ln_e.weight"])
    y = F.embedding(dec_ids, sd["transformer.wte.weight"])
    for i in range(cfg.n_decoder_layer):
        p = f"transformer.h.{i}."
        h = rms(y, sd[p + "ln1.weight"])
        y = y + attention(sd, p + "causal_attn.", cfg, h, h, dmask, True, True)
        y = y + attention(sd, p + "cross_attn.", cfg, rms(y, sd[p + "ln2.weight"]), enc, emask, False, False)
        y = y + mlp(sd, p + "mlp.", rms(y, sd[p + "ln3.weight"]))
    return F.linear(rms(y, sd["transformer.ln_f.weight"]), sd["lm_head.weight"])


def deconly_logits(sd, cfg, ids):
    mask = ids != cfg.pad_token_id
    x = F.embedding(ids, sd["transformer.wte.weight"])
    for i in range(cfg.n_decoder_layer):
        p = f"transformer.h.{i}."
        h = rms(x, sd[p + "ln1.weight"])
        x = x + attention(sd, p + "attn.", cfg, h, h, mask, True, True)
        x = x + mlp(sd, p + "mlp.", rms(x, sd[p + "ln2.weight"]))
    return F.linear(rms(x, sd["transformer.ln_f.weight"]), sd["lm_head.weight"])
