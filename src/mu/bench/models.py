"""The models a benchmark runs, each behind one small interface: prefill, decode step, expand, copy.

`MuRunner` drives mu's own generation path (`model.new_cache` -> `model.prefill` -> greedy steps,
`mu.generation.greedy_step`, for one sequence `greedy_tokens`): the loop `mu.generation.generate` runs, so both
architectures go through the same kernels and the same cache. `HFRunner` drives a Hugging Face
`T5ForConditionalGeneration` or `LlamaForCausalLM` of the same size through its forward and its own
cache classes (what `generate()` does inside, minus the logits processors).

A runner's state after prefill can be copied and expanded to B identical rows (`KVCache.reorder`,
`Cache.batch_repeat_interleave`), which is how decode throughput at batch B is measured after a
single batch-1 prefill on CPUs (see `BenchConfig.prefill_batch`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from mu.bench.flops import mu_param_count
from mu.config import MuConfig
from mu.errors import MuError

MU_ARCHS = ("encdec", "deconly")
HF_ARCHS = ("hf-t5", "hf-llama")


@dataclass
class ModelSpec:
    """What to build: `arch` is encdec | deconly | hf-t5 | hf-llama; from a preset or a model directory."""

    arch: str
    preset: Optional[str] = "330m"
    model_dir: Optional[str] = None
    mu_config: Optional[dict] = None  # the MuConfig an HF model is sized after (filled by the runner)

    def to_dict(self) -> dict:
        return dict(arch=self.arch, preset=self.preset, model_dir=self.model_dir, mu_config=self.mu_config)


def decode_weight_bytes(model) -> int:
    """Bytes of weights one decode step of a mu model reads: its decoder blocks (without the cross-attention
    K/V projections, run once per request), ln_f and lm_head, each in its stored format (a quantized
    module counts its codes and scales through `weight_bytes()`; tied weights count once)."""
    skip = set()
    if model.config.arch == "encdec":
        for block in model.transformer.h:
            skip |= {id(block.cross_attn.k_linear), id(block.cross_attn.v_linear)}
    total, params = 0, []
    for mod in (*model.decoder_blocks().modules(), *model.transformer.ln_f.modules(), *model.lm_head.modules()):
        if id(mod) in skip:
            continue
        if hasattr(mod, "weight_bytes"):
            total += mod.weight_bytes()
            skip |= {id(m) for m in mod.modules()}  # e.g. an int4 layer's int8 prefill copy: not read by decode
        else:
            params += list(mod.parameters(recurse=False))
    return total + _param_bytes(params)


def _param_bytes(params) -> int:
    seen, total = set(), 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


class MuRunner:
    def __init__(self, model, device: torch.device, compile: bool = False):
        from mu.generation import DEFAULT_BOS_ID

        self.model = model.eval()
        self.config: MuConfig = model.config
        self.device = device
        self.bos = DEFAULT_BOS_ID
        self.pad = self.config.pad_token_id
        self.vocab_size = self.config.vocab_size
        self.compile = compile  # timed steps (`steps`) as generate(compile=True) runs them; `step` stays eager

    def describe(self) -> dict:
        m = self.model
        return {"family": "mu", "arch": self.config.arch, "params": m.num_parameters(),
                "weight_bytes": _param_bytes(m.parameters()), "decode_weight_bytes": self.decode_weight_bytes(),
                "config": self.config.to_dict()}

    def decode_weight_bytes(self) -> int:
        """Weights one decode step reads: the decoder stack (minus cross-attention K/V projections), ln_f, lm_head."""
        return decode_weight_bytes(self.model)

    def prefill(self, input_ids: Tensor, new_tokens: int) -> tuple[Any, Tensor]:
        from mu.generation import prepare, sample_logits

        # generate's own set-up (a compiled run's cache rounded up, as generate's)
        run = prepare(self.model, input_ids, new_tokens, bos_token_id=self.bos, compile=self.compile)
        logits = self.model.prefill(run.input_ids, run.attention_mask, run.cache, run.start)
        return run.cache, sample_logits(logits)

    def step(self, cache, token: Tensor) -> Tensor:
        from mu.generation import greedy_step

        return greedy_step(self.model, token[:, None], cache)[1]

    def steps(self, cache, token: Tensor, n: int) -> Tensor:
        """`n` steps; for one sequence in one native call where `generate` makes one (`greedy_tokens`), compiled
        ones with the cache's shapes fixed (a GPU records the first as a CUDA graph and replays it)."""
        if self.compile:
            cache.static = cache.compiled = True
        got = self.model.greedy_tokens(token[:, None], cache, n) if token.shape[0] == 1 else None
        if got is None:
            for _ in range(n):
                token = self.step(cache, token)
            return token
        return got[-1:]

    def expand(self, cache, batch: int) -> None:
        cache.reorder(torch.zeros(batch, dtype=torch.long, device=self.device))

    def copy(self, cache):
        return copy.deepcopy(cache)

    def cache_nbytes(self, cache) -> int:
        return cache.nbytes()


class HFRunner:
    """A Hugging Face model of the same size as a mu model, timed through the same prefill/step loop."""

    def __init__(self, model, arch: str, device: torch.device):
        self.model = model.eval()
        self.arch = arch
        self.device = device
        self.config = model.config
        self.pad = 0
        self.vocab_size = self.config.vocab_size

    def describe(self) -> dict:
        return {"family": "hf", "arch": self.arch, "class": type(self.model).__name__,
                "params": sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values()),
                "weight_bytes": _param_bytes(self.model.parameters()),
                "decode_weight_bytes": self.decode_weight_bytes(),
                "config": {k: v for k, v in self.config.to_dict().items() if isinstance(v, (int, float, str, bool))}}

    def decode_weight_bytes(self) -> int:
        m = self.model
        if self.arch == "hf-t5":
            skip = set()
            for block in m.decoder.block:
                cross = block.layer[1].EncDecAttention
                skip |= {id(p) for p in (*cross.k.parameters(), *cross.v.parameters())}
            params = [*m.decoder.block.parameters(), *m.decoder.final_layer_norm.parameters(),
                      *m.lm_head.parameters()]
            return _param_bytes(p for p in params if id(p) not in skip)
        return _param_bytes([*m.model.layers.parameters(), *m.model.norm.parameters(), *m.lm_head.parameters()])

    def _cache_kw(self) -> str:
        """transformers 5 calls the cache argument `cache` (`past_key_values` is deprecated); 4.x has only that."""
        import inspect

        return "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def prefill(self, input_ids: Tensor, new_tokens: int) -> tuple[Any, Tensor]:
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        kw = self._cache_kw()
        mask = torch.ones_like(input_ids)
        if self.arch == "hf-t5":
            enc = self.model.get_encoder()(input_ids=input_ids, attention_mask=mask)
            cache = EncoderDecoderCache(DynamicCache(config=self.config), DynamicCache(config=self.config))
            start = torch.full((input_ids.shape[0], 1), self.config.decoder_start_token_id, dtype=torch.long,
                               device=input_ids.device)
            out = self.model(encoder_outputs=enc, attention_mask=mask, decoder_input_ids=start, use_cache=True,
                             **{kw: cache})
            state = {"cache": cache, "enc": enc, "mask": mask, "kw": kw}
        else:
            cache = DynamicCache(config=self.config)
            out = self.model(input_ids=input_ids, attention_mask=mask, use_cache=True, logits_to_keep=1,
                             **{kw: cache})
            state = {"cache": cache, "kw": kw}
        return state, out.logits[:, -1].argmax(-1)

    def steps(self, state, token: Tensor, n: int) -> Tensor:
        for _ in range(n):
            token = self.step(state, token)
        return token

    def step(self, state, token: Tensor) -> Tensor:
        cache = {state["kw"]: state["cache"]}  # updated in place by the model
        if self.arch == "hf-t5":
            out = self.model(encoder_outputs=state["enc"], attention_mask=state["mask"],
                             decoder_input_ids=token[:, None], use_cache=True, **cache)
        else:
            out = self.model(input_ids=token[:, None], use_cache=True, **cache)
        return out.logits[:, -1].argmax(-1)

    def expand(self, state, batch: int) -> None:
        state["cache"].batch_repeat_interleave(batch)
        if "enc" in state:
            state["enc"].last_hidden_state = state["enc"].last_hidden_state.repeat_interleave(batch, 0)
            state["mask"] = state["mask"].repeat_interleave(batch, 0)

    def copy(self, state):
        return copy.deepcopy(state)

    def cache_nbytes(self, state) -> int:
        def nbytes(cache) -> int:
            total = 0
            for layer in getattr(cache, "layers", []):
                for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                    if isinstance(t, Tensor):
                        total += t.nbytes
            return total

        cache = state["cache"]
        if hasattr(cache, "self_attention_cache"):
            return nbytes(cache.self_attention_cache) + nbytes(cache.cross_attention_cache)
        return nbytes(cache)


# ---------------------------------------------------------------------------------------------
# Building


def mu_config_for(spec: ModelSpec) -> MuConfig:
    """The MuConfig of a spec (for an HF spec: the mu model it is sized after)."""
    if spec.mu_config is not None:
        return MuConfig.from_dict(spec.mu_config)
    arch = spec.arch if spec.arch in MU_ARCHS else ("encdec" if spec.arch == "hf-t5" else "deconly")
    return MuConfig.from_name(spec.preset, arch)


def build_runner(spec: ModelSpec, dtype, device: torch.device, compile: bool = False):
    """A runner for `spec` in `dtype`: a torch.dtype or a format name (fp32, bf16, fp16, int8, int8wo, int4,
    auto). A quantization format builds fp32 weights and quantizes a mu model (`mu.model.quantize`);
    Hugging Face models stay in fp32 then. `compile`: a mu model's decode steps run as `generate(compile=True)`
    runs them."""
    from mu.checkpoint import parse_dtype
    from mu.model.quantize import split_format

    dtype, mode = split_format(dtype, device)
    dtype = parse_dtype(dtype)
    if spec.arch in MU_ARCHS:
        model = build_mu_model(spec, dtype, device)
        return MuRunner(model.quantize_(mode) if mode else model, device, compile)
    if spec.arch in HF_ARCHS:
        return HFRunner(build_hf_model(spec.arch, mu_config_for(spec), dtype, device), spec.arch, device)
    raise MuError(f"unknown arch {spec.arch!r}; expected one of {MU_ARCHS + HF_ARCHS}")


def build_mu_model(spec: ModelSpec, dtype: torch.dtype, device: torch.device):
    """Random weights created and initialised directly on `device` in `dtype` (no fp32 copy on the way,
    so the memory baseline is the weights), or a trained model from `spec.model_dir`.

    (Building on the meta device then `to_empty` + `init_weights()` would work too, but `normal_` on
    meta tensors imports torch._dynamo, seconds per memory worker.)
    """
    import mu

    if spec.model_dir is not None:
        return mu.load_model(spec.model_dir, device=device, dtype=dtype).eval()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = mu.build_model(spec.preset, arch=spec.arch)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def _round_to(x: float, multiple: int) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


def hf_t5_config(c: MuConfig):
    """T5 (v1.0 layout: ReLU MLP, relative position bias, no GQA) with mu's width, heads and depths.

    T5 has full multi-head K/V (no GQA) and no biases, so its d_ff is chosen to match mu's
    parameter count (3840 for the 330m preset) rather than copying hidden_dim.
    """
    from transformers import T5Config

    d, q, h = c.n_embd, c.qkv_embd, c.n_head
    n_e, n_d = c.n_encoder_layer, c.n_decoder_layer
    fixed = c.vocab_size * d + n_e * (4 * d * q + 2 * d) + n_d * (8 * d * q + 3 * d) + 2 * d + 2 * 32 * h
    d_ff = _round_to((mu_param_count(c) - fixed) / (2 * d * (n_e + n_d)), 16)
    return T5Config(vocab_size=c.vocab_size, d_model=d, d_kv=c.head_dim, d_ff=d_ff, num_layers=n_e,
                    num_decoder_layers=n_d, num_heads=h, feed_forward_proj="relu", dropout_rate=0.0,
                    tie_word_embeddings=True, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def hf_llama_config(c: MuConfig):
    """Llama (SwiGLU MLP, RoPE, GQA, no biases) with the decoder-only twin's width, heads and depth;
    intermediate_size matches the twin's parameter count (2736 for 330m, ~2/3 of hidden_dim)."""
    from transformers import LlamaConfig

    d, q, kv, n = c.n_embd, c.qkv_embd, c.n_kv_head * c.head_dim, c.n_decoder_layer
    fixed = c.vocab_size * d + n * (2 * d * q + 2 * d * kv + 2 * d) + d
    inter = _round_to((mu_param_count(c) - fixed) / (3 * d * n), 16)
    # transformers checks hidden_size % num_attention_heads even when head_dim is given (mu's 330m has
    # 6 heads of 64 in a 1024 stream): build with d // head_dim heads, then set the real counts (the
    # layer shapes follow head_dim, which is explicit).
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=d, intermediate_size=inter, num_hidden_layers=n,
                      num_attention_heads=d // c.head_dim, num_key_value_heads=d // c.head_dim,
                      head_dim=c.head_dim, tie_word_embeddings=True, max_position_embeddings=max(c.block_size, 32768),
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg.num_attention_heads, cfg.num_key_value_heads = c.n_head, c.n_kv_head
    return cfg


def build_hf_model(arch: str, mu_config: MuConfig, dtype: torch.dtype, device: torch.device):
    import transformers
    from transformers import LlamaForCausalLM, T5ForConditionalGeneration

    transformers.logging.set_verbosity_error()
    if arch == "hf-t5":
        cls, cfg = T5ForConditionalGeneration, hf_t5_config(mu_config)
    else:
        cls, cfg = LlamaForCausalLM, hf_llama_config(mu_config)
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = cls._from_config(cfg, dtype=dtype)
    return model.eval()
