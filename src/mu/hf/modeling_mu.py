"""Hugging Face `transformers` classes for Mu models: `MuForConditionalGeneration` (encoder-decoder) and
`MuForCausalLM` (the decoder-only twin).

Standalone (imports only torch and `transformers`): `mu export hf` copies this file, `configuration_mu.py`
and `pipeline_mu.py` next to the weights, so the directory loads with `trust_remote_code=True` where mu
is not installed. Module and parameter names are mu's (`transformer.{wte, e.{i}, ln_e, h.{i}, ln_f}`,
tied `lm_head`), so the `model.safetensors` that mu's `save_pretrained` writes loads as it is, and this
model's `save_pretrained` writes a directory mu loads.

The computation restates mu's (mu/model/layers.py; docs/architecture.md), which follows the paper's
code: fp32 RMSNorm, rotate-half RoPE (centred positions in the encoder, NTK-dynamic scaling when
`rope_factor > 1`), grouped-query attention with biased projections, no RoPE in cross-attention, tanh-GELU
MLP, pad tokens masked as keys everywhere. mu's tests check logits and greedy tokens against mu's model.

Caches are transformers' own (`DynamicCache`, `EncoderDecoderCache`): cross-attention K/V are projected
once and reused, as in mu. During `generate`, `prepare_inputs_for_generation` adds mu's masking rule
(a generated pad token is not attended to) and each row's RoPE positions (from its first real token).
Tested with transformers 5.24 (`cache=` keyword; the older `past_key_values=` is accepted too).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutputWithPast, Seq2SeqLMOutput

from .configuration_mu import MuHFConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_cos_sin(config: MuHFConfig, positions, seq_len: int, dtype):
    """cos/sin (B|1, T, 1, head_dim) for integer positions (B, T) or (T,); NTK base from `seq_len`."""
    dim, base, factor = config.head_dim, float(config.rope_theta), config.rope_factor
    if factor > 1.0:
        length = max(seq_len, config.block_size)
        base = base * ((factor * length / config.block_size) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=positions.device).float() / dim))
    freqs = positions.float().unsqueeze(-1) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    if emb.dim() == 2:
        emb = emb.unsqueeze(0)
    return emb.cos().to(dtype).unsqueeze(2), emb.sin().to(dtype).unsqueeze(2)


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    """Grouped-query attention: query head h reads KV head h % n_kv_head (or h // groups, interleaved)."""

    def __init__(self, config: MuHFConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.groups = config.n_head // config.n_kv_head
        self.interleaved = config.is_interleaved
        self.dropout = config.dropout
        self.q_linear = nn.Linear(config.n_embd, self.n_head * self.head_dim)
        self.k_linear = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.v_linear = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.out_linear = nn.Linear(config.qkv_embd, config.n_embd)

    def q(self, x):
        return self.q_linear(x).view(*x.shape[:2], self.n_head, self.head_dim)  # (B, T, n_head, hd)

    def kv(self, x):
        """(B, S, n_embd) -> k, v (B, n_kv_head, S, hd)."""
        shape = (*x.shape[:2], self.n_kv_head, self.head_dim)
        return self.k_linear(x).view(shape).transpose(1, 2), self.v_linear(x).view(shape).transpose(1, 2)

    def attend(self, q, k, v, mask):
        """q (B, T, n_head, hd), k/v (B, n_kv_head, S, hd), mask bool (B, 1, T|1, S) -> (B, T, n_embd)."""
        B, T = q.shape[:2]
        KV, G, hd = self.n_kv_head, self.groups, self.head_dim
        if self.interleaved:  # head h = j * groups + g
            qg = q.view(B, T, KV, G, hd).permute(0, 2, 3, 1, 4)
        else:  # head h = g * n_kv_head + j
            qg = q.view(B, T, G, KV, hd).permute(0, 3, 2, 1, 4)
        qg = qg.reshape(B, KV, G * T, hd)
        mask = mask.unsqueeze(2).expand(B, 1, G, T, mask.shape[-1]).reshape(B, 1, G * T, -1)
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, KV, G*T, hd)
        o = o.view(B, KV, G, T, hd)
        o = o.permute(0, 3, 1, 2, 4) if self.interleaved else o.permute(0, 3, 2, 1, 4)
        return self.out_linear(o.reshape(B, T, self.n_head * hd))


class MLP(nn.Module):
    def __init__(self, config: MuHFConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.n_embd, config.hidden_dim)
        self.fc2 = nn.Linear(config.hidden_dim, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.fc2(F.gelu(self.fc1(x), approximate="tanh")))


class SelfAttentionBlock(nn.Module):
    """Encoder block (bidirectional) and decoder-only block (causal): self-attention + MLP, pre-norm."""

    def __init__(self, config: MuHFConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.ln1 = RMSNorm(config.n_embd)
        self.attn = Attention(config)
        self.ln2 = RMSNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, rope, mask, cache=None):
        h = self.ln1(x)
        q = apply_rope(self.attn.q(h), *rope)
        k, v = self.attn.kv(h)
        k = apply_rope(k.transpose(1, 2), *rope).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        x = x + self.attn.attend(q, k, v, mask)
        return x + self.mlp(self.ln2(x))


class DecoderBlock(nn.Module):
    """Causal self-attention (RoPE), cross-attention to the encoder (no RoPE), MLP, pre-norm."""

    def __init__(self, config: MuHFConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.ln1 = RMSNorm(config.n_embd)
        self.causal_attn = Attention(config)
        self.ln2 = RMSNorm(config.n_embd)
        self.cross_attn = Attention(config)
        self.ln3 = RMSNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, rope, self_mask, enc_out, cross_mask, cache=None):
        h = self.ln1(x)
        q = apply_rope(self.causal_attn.q(h), *rope)
        k, v = self.causal_attn.kv(h)
        k = apply_rope(k.transpose(1, 2), *rope).transpose(1, 2)
        if cache is not None:
            k, v = cache.self_attention_cache.update(k, v, self.layer_idx)
        x = x + self.causal_attn.attend(q, k, v, self_mask)
        if cache is not None and cache.is_updated.get(self.layer_idx):  # cross K/V projected at the first step
            layer = cache.cross_attention_cache.layers[self.layer_idx]
            k, v = layer.keys, layer.values
        else:
            k, v = self.cross_attn.kv(enc_out)
            if cache is not None:
                k, v = cache.cross_attention_cache.update(k, v, self.layer_idx)
                cache.is_updated[self.layer_idx] = True
        x = x + self.cross_attn.attend(self.cross_attn.q(self.ln2(x)), k, v, cross_mask)
        return x + self.mlp(self.ln3(x))


def key_padding_mask(valid):
    """(B, S) valid keys -> (B, 1, 1, S); a row with no valid key sees all of them (as mu)."""
    valid = valid | ~valid.any(-1, keepdim=True)
    return valid[:, None, None, :]


def causal_padding_mask(valid, q_len: int):
    """Queries = the last `q_len` of the keys (B, L) -> (B, 1, q_len, L): valid keys up to itself, and itself."""
    L = valid.shape[-1]
    k_pos = torch.arange(L, device=valid.device)
    q_pos = k_pos[L - q_len:, None]
    return ((k_pos <= q_pos) & valid[:, None, None, :]) | (k_pos == q_pos)


def lm_loss(logits, labels, pad_token_id: int):
    """Cross-entropy ignoring -100 and pad labels (mu's convention)."""
    labels = labels.masked_fill(labels == -100, pad_token_id)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=pad_token_id)


class MuPreTrainedModel(PreTrainedModel):
    config_class = MuHFConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}
    _no_split_modules = ["SelfAttentionBlock", "DecoderBlock"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        """The paper's initialisation: N(0, 0.02) weights, zero biases, unit norms."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def _generation_defaults(self):
        """Copy the config's token ids into the generation config where unset (transformers 5 no longer
        does that for ids kept on the config): decoder start 1, pad 0, EOS when the config has one."""
        gc = getattr(self, "generation_config", None)
        for key in ("decoder_start_token_id", "bos_token_id", "pad_token_id", "eos_token_id"):
            if gc is not None and getattr(gc, key, None) is None and getattr(self.config, key, None) is not None:
                setattr(gc, key, getattr(self.config, key))

    def adjust_generation_fn(self, *args, **kwargs):
        """After `from_pretrained` read the generation config (a mu directory has none: it comes from config.json)."""
        super().adjust_generation_fn(*args, **kwargs)
        self._generation_defaults()

    def _check_arch(self, arch: str, auto_class: str):
        if self.config.arch != arch:
            other = "AutoModelForSeq2SeqLM" if self.config.arch == "encdec" else "AutoModelForCausalLM"
            raise ValueError(f"this Mu model has arch={self.config.arch!r}: load it with {other}, not {auto_class}")


class _Encoder:
    """What `generate` calls as `get_encoder()`: the encoder stack of `MuForConditionalGeneration`
    (a view, so the parameters keep their one name under `transformer`)."""

    main_input_name = "input_ids"

    def __init__(self, model):
        self.model = model

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        return BaseModelOutput(last_hidden_state=self.model.encode(input_ids, attention_mask, inputs_embeds))

    __call__ = forward


class MuForConditionalGeneration(MuPreTrainedModel, GenerationMixin):
    """The Mu encoder-decoder (`arch="encdec"`) for `AutoModelForSeq2SeqLM`."""

    def __init__(self, config: MuHFConfig):
        super().__init__(config)
        self._check_arch("encdec", "AutoModelForSeq2SeqLM")
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            e=nn.ModuleList([SelfAttentionBlock(config, i) for i in range(config.n_encoder_layer)]),
            ln_e=RMSNorm(config.n_embd),
            h=nn.ModuleList([DecoderBlock(config, i) for i in range(config.n_decoder_layer)]),
            ln_f=RMSNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()
        self._generation_defaults()

    def get_encoder(self, modality=None):
        return _Encoder(self)

    def encode(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        """(B, S) ids or (B, S, n_embd) embeddings -> encoder output (B, S, n_embd)."""
        x = self.transformer.wte(input_ids) if inputs_embeds is None else inputs_embeds
        valid = self._encoder_valid(input_ids, attention_mask, x)
        S = x.shape[1]
        positions = torch.arange(S, device=x.device) - (S - 1) // 2  # the paper's centred positions
        rope = rope_cos_sin(self.config, positions, S, x.dtype)
        mask = key_padding_mask(valid)
        for block in self.transformer.e:
            x = block(x, rope, mask)
        return self.transformer.ln_e(x)

    def _encoder_valid(self, input_ids, attention_mask, x):
        if attention_mask is not None:
            return attention_mask.bool()
        if input_ids is not None:
            return input_ids != self.config.pad_token_id
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                encoder_outputs=None, cache=None, inputs_embeds=None, labels=None, use_cache=None,
                return_dict=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        config = self.config
        if encoder_outputs is None:
            enc_out = self.encode(input_ids, attention_mask, inputs_embeds)
        else:
            enc_out = (encoder_outputs[0] if isinstance(encoder_outputs, (tuple, list))
                       else encoder_outputs.last_hidden_state)
        cross_mask = key_padding_mask(self._encoder_valid(input_ids, attention_mask, enc_out))
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("pass decoder_input_ids or labels")
            decoder_input_ids = self._shift_right(labels)
        use_cache = use_cache if use_cache is not None else (config.use_cache and not self.training)
        if use_cache and cache is None:
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        past = cache.get_seq_length() if cache is not None else 0
        B, T = decoder_input_ids.shape
        new_valid = decoder_input_ids != config.pad_token_id
        if decoder_attention_mask is None:
            valid = torch.cat([torch.ones(B, past, dtype=torch.bool, device=new_valid.device), new_valid], 1)
        elif decoder_attention_mask.shape[1] == past + T:
            valid = decoder_attention_mask.bool()
        else:
            valid = torch.cat([torch.ones(B, past, dtype=torch.bool, device=new_valid.device),
                               decoder_attention_mask.bool()], 1)
        x = self.transformer.wte(decoder_input_ids)
        positions = torch.arange(past, past + T, device=x.device)
        rope = rope_cos_sin(config, positions, past + T, x.dtype)
        self_mask = causal_padding_mask(valid, T)
        for block in self.transformer.h:
            x = block(x, rope, self_mask, enc_out, cross_mask, cache if use_cache else None)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = lm_loss(logits, labels, config.pad_token_id) if labels is not None else None
        return Seq2SeqLMOutput(loss=loss, logits=logits, cache=cache if use_cache else None,
                               encoder_last_hidden_state=enc_out)

    def _shift_right(self, labels):
        """Decoder inputs for `labels`: the start token, then the labels but the last (-100 -> pad)."""
        start = torch.full_like(labels[:, :1], self.config.decoder_start_token_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)

    def prepare_inputs_for_generation(self, input_ids, *args, **kwargs):
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        # mu's rule: a pad token (e.g. after a row finished) is never attended to; input_ids is the whole
        # decoder sequence so far
        inputs["decoder_attention_mask"] = (input_ids != self.config.pad_token_id).long()
        return inputs


class MuForCausalLM(MuPreTrainedModel, GenerationMixin):
    """The decoder-only twin (`arch="deconly"`) for `AutoModelForCausalLM`."""

    def __init__(self, config: MuHFConfig):
        super().__init__(config)
        self._check_arch("deconly", "AutoModelForCausalLM")
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([SelfAttentionBlock(config, i) for i in range(config.n_decoder_layer)]),
            ln_f=RMSNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()
        self._generation_defaults()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, return_dict=None, past_key_values=None, **kwargs):
        """attention_mask (B, past + T): which keys are real tokens (default: the new ids that are not pad);
        labels are the inputs (shifted inside, as transformers' causal LMs do)."""
        cache = cache if cache is not None else past_key_values
        config = self.config
        x = self.transformer.wte(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        use_cache = use_cache if use_cache is not None else (config.use_cache and not self.training)
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None and attention_mask.shape[1] == past + T:
            valid = attention_mask.bool()
        else:
            new = (input_ids != config.pad_token_id if attention_mask is None and input_ids is not None
                   else attention_mask.bool() if attention_mask is not None
                   else torch.ones(B, T, dtype=torch.bool, device=x.device))
            valid = torch.cat([torch.ones(B, past, dtype=torch.bool, device=x.device), new], 1)
        if position_ids is None:  # each row counts from its first real token (left padding)
            position_ids = (valid.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        rope = rope_cos_sin(config, position_ids, past + T, x.dtype)
        mask = causal_padding_mask(valid, T)
        for block in self.transformer.h:
            x = block(x, rope, mask, cache if use_cache else None)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if labels is not None:
            loss = lm_loss(logits[:, :-1], labels[:, 1:], config.pad_token_id)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)

    def prepare_inputs_for_generation(self, input_ids, *args, **kwargs):
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        mask = inputs.get("attention_mask")
        if mask is not None and mask.dim() == 2 and mask.shape[1] == input_ids.shape[1]:
            T = inputs["input_ids"].shape[1]
            # positions follow the given mask; keys also drop generated pad tokens (mu's rule)
            inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            inputs["attention_mask"] = mask * (input_ids != self.config.pad_token_id)
        return inputs
