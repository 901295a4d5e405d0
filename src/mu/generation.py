"""Cached generation shared by both architectures: prefill, then decode one token at a time.

    logits = model.prefill(prompt)            # encoder-decoder: encode once + cross K/V once
    loop:  token = pick(logits)               # greedy / temperature, top-k, top-p sampling
           logits = model.decode_step(token)  # one position through the decoder, KV cache grows

Beam search is the same loop over batch * num_beams rows, with the cache reordered
after each step. Encoder-decoder outputs start with the decoder start token (as in the
paper's code); decoder-only outputs are the (left-padded) prompt followed by the new tokens.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mu.errors import MuError
from mu.model.cache import KVCache
from mu.model.fast import huge_pages_
from mu.utils import round_up

DEFAULT_BOS_ID = 1  # the paper's decoder start token (Phi-3.5's BOS)

# How `mu generate` spells each argument of `check_generation_args` in its messages.
CLI_NAMES = {"max_new_tokens": "--max-new-tokens", "do_sample": "--sample", "temperature": "--temperature",
             "top_k": "--top-k", "top_p": "--top-p", "num_beams": "--num-beams", "length_penalty": "--length-penalty",
             "streaming": "--stream"}


def check_generation_args(max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0,
                          top_k: Optional[int] = None, top_p: Optional[float] = None, num_beams: int = 1,
                          length_penalty: float = 1.0, streaming: bool = False,
                          names: Optional[dict[str, str]] = None) -> None:
    """Raise a one-line MuError for any generation argument `generate` cannot honour.

    The one check of these values: `generate` calls it, and so do the CLI verbs (before loading a model)
    and servers (a MuError is a 400 answer). `names` maps argument names to what the user typed
    (e.g. `CLI_NAMES`); messages use the Python names otherwise. temperature is checked only when
    sampling (greedy and beam search ignore it); top_k and top_p are checked whenever given.
    """
    names = names or {}

    def bad(arg: str, value: Any, expected: str) -> MuError:
        return MuError(f"{names.get(arg, arg)} {value!r}: expected {expected}")

    def is_int(v: Any) -> bool:
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    def is_number(v: Any) -> bool:
        return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)

    if not (is_int(max_new_tokens) and max_new_tokens >= 1):
        raise bad("max_new_tokens", max_new_tokens, "a whole number >= 1")
    if not (is_int(num_beams) and num_beams >= 1):
        raise bad("num_beams", num_beams, "a whole number >= 1 (1 = no beam search)")
    if do_sample and not (is_number(temperature) and temperature > 0):
        raise bad("temperature", temperature, "a number > 0 when sampling (for greedy decoding leave sampling off)")
    if top_k is not None and not (is_int(top_k) and top_k >= 1):
        raise bad("top_k", top_k, "a whole number >= 1 (leave it unset for no top-k filter)")
    if top_p is not None and not (is_number(top_p) and 0 < top_p <= 1):
        raise bad("top_p", top_p, "a number in (0, 1] (1 = no nucleus filter)")
    if not is_number(length_penalty):
        raise bad("length_penalty", length_penalty, "a finite number")
    if num_beams > 1 and do_sample:
        raise MuError(f"{names.get('do_sample', 'do_sample')} with {names.get('num_beams', 'num_beams')} "
                      f"{num_beams}: beam search does not sample; use one or the other")
    if num_beams > 1 and streaming:
        raise MuError(f"{names.get('streaming', 'streaming')} with {names.get('num_beams', 'num_beams')} "
                      f"{num_beams}: beam search cannot stream (its best sequence is known only at the end)")


def sample_logits(logits: Tensor, do_sample: bool = False, temperature: float = 1.0, top_k: Optional[int] = None,
                  top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> Tensor:
    """Pick the next token (B,) from logits (B, V): argmax, or a sample after temperature/top-k/top-p."""
    logits = logits.float()  # (bf16's argmax: 0.13 ms over a 32k vocabulary in PyTorch, 0.06 ms after the cast)
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits / max(temperature, 1e-5)
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_pad(input_ids: Tensor, attention_mask: Tensor, pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Move each row's real tokens to the right end so every row's last position is a real token."""
    if bool(attention_mask[:, -1].all()):
        return input_ids, attention_mask
    lengths = attention_mask.sum(-1)
    T = input_ids.shape[1]
    out = torch.full_like(input_ids, pad_token_id)
    mask = torch.zeros_like(attention_mask)
    for i in range(input_ids.shape[0]):
        real = input_ids[i][attention_mask[i].bool()]
        out[i, T - len(real):] = real
        mask[i, T - int(lengths[i]):] = 1
    return out, mask


def _special_id(model, name: str, given: Optional[int], default: Optional[int]) -> Optional[int]:
    if given is not None:
        return given
    tok = getattr(model, "tokenizer", None)
    value = getattr(tok, name, None) if tok is not None else None
    return value if value is not None else default


def _as_batch(input_ids: Any, device, vocab_size: int) -> Tensor:
    if not isinstance(input_ids, Tensor):
        input_ids = torch.tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise MuError(f"input_ids must be a non-empty (batch, length) array of token ids, got shape "
                      f"{tuple(input_ids.shape)}")
    lo, hi = int(input_ids.min()), int(input_ids.max())  # before the copy to `device` (no sync for CPU input)
    if lo < 0 or hi >= vocab_size:
        raise MuError(f"input_ids hold token id {lo if lo < 0 else hi}, outside the model's vocabulary (vocab_size "
                      f"{vocab_size}): is the tokenizer the model's own?")
    return input_ids.to(device=device, dtype=torch.long)


@torch.inference_mode()
def generate(model, input_ids: Tensor | Sequence[int], max_new_tokens: int = 64, do_sample: bool = False,
             temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
             num_beams: int = 1, eos_token_id: Optional[int] = None, bos_token_id: Optional[int] = None,
             attention_mask: Optional[Tensor] = None, streamer: Any = None,
             generator: Optional[torch.Generator] = None, length_penalty: float = 1.0, compile: bool = False,
             cuda_graph: bool = False, **model_kwargs: Any) -> Tensor:
    """Generate up to `max_new_tokens` tokens per row with a KV cache.

    eos_token_id=None never stops early (the attached tokenizer's EOS is *not* used implicitly,
    so benchmarks generate exactly max_new_tokens). Finished rows are filled with the pad id.
    `streamer` gets `put(tokens)` with each step's new tokens (B,) and `end()` at the end
    (Hugging Face's TextStreamer works for batch 1). `model_kwargs` go to `model.prefill`
    (e.g. `inputs_embeds` from a vision-language model).

    `compile=True`: the decode steps get fixed shapes and run `torch.compile`d; on a GPU the compiled step is also
    replayed as a CUDA graph. `cuda_graph=True` (a GPU only): the eager step replayed as a CUDA graph, with no
    compile to wait for (docs/generation.md).
    """
    check_generation_args(max_new_tokens, do_sample, temperature, top_k, top_p, num_beams, length_penalty,
                          streamer is not None)
    pad = model.config.pad_token_id
    input_ids = _as_batch(input_ids, model.device, model.config.vocab_size)
    if cuda_graph and model.device.type != "cuda":
        raise MuError(f"cuda_graph=True replays the decode step on a GPU: this model is on {model.device}")
    if isinstance(model, torch.nn.Module) and model.device.type == "cpu":  # (not an ONNX Runtime session's model)
        huge_pages_(model)
    run = prepare(model, input_ids, max_new_tokens, attention_mask, bos_token_id, compile)
    was_training = model.training
    # eval() and train() walk the modules setting each flag (~1.5 ms each at 330m): only where one is set (an ONNX
    # Runtime session's model has no modules)
    switch = not isinstance(model, torch.nn.Module) or any(m.training for m in model.modules())
    if switch:
        model.eval()
    try:
        logits = model.prefill(run.input_ids, run.attention_mask, run.cache, run.start, **model_kwargs)
        if compile or cuda_graph:  # the prompt went through the usual path; the steps now have fixed shapes
            run.cache.static, run.cache.compiled = True, compile
        if num_beams > 1:
            new = beam_search(model, logits, run.cache, num_beams, max_new_tokens, eos_token_id, pad, length_penalty)
        else:
            new = _sample_loop(model, logits, run.cache, max_new_tokens, eos_token_id, pad, streamer,
                               dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                                    generator=generator))
    finally:
        if switch:
            model.train(was_training)
    return torch.cat([run.prefix, new], dim=1)


@dataclass
class Prepared:
    """What `model.prefill` takes for one `generate` call, and what the output starts with."""

    input_ids: Tensor  # (B, S) the prompt; decoder-only: left-padded so every row ends with a real token
    attention_mask: Tensor  # (B, S) bool, True at real tokens
    cache: KVCache  # room for the prompt (decoder-only) or the start token (encoder-decoder) + the new tokens
    start: Optional[Tensor]  # (B, 1) the decoder start token (encoder-decoder), else None
    prefix: Tensor  # the start token (encoder-decoder) or the prompt (decoder-only): `generate`'s output head


def prepare(model, input_ids: Tensor, max_new_tokens: int, attention_mask: Optional[Tensor] = None,
            bos_token_id: Optional[int] = None, compile: bool = False) -> Prepared:
    """`generate`'s set-up, shared with the benchmark: mask, left padding, decoder start token, cache size."""
    pad = model.config.pad_token_id
    if attention_mask is None:
        attention_mask = input_ids != pad
    attention_mask = attention_mask.to(input_ids.device).bool()
    B = input_ids.shape[0]
    if model.config.arch == "encdec":
        bos = _special_id(model, "bos_token_id", bos_token_id, DEFAULT_BOS_ID)
        start = torch.full((B, 1), bos, dtype=torch.long, device=input_ids.device)
        cache = model.new_cache(B, _cache_len(1 + max_new_tokens, compile))
        return Prepared(input_ids, attention_mask, cache, start, start)
    input_ids, attention_mask = left_pad(input_ids, attention_mask, pad)
    cache = model.new_cache(B, _cache_len(input_ids.shape[1] + max_new_tokens, compile))
    return Prepared(input_ids, attention_mask, cache, None, input_ids)


def new_tokens(model, output: Tensor, prompt: Tensor | int) -> Tensor:
    """The tokens `generate` added, (B, N): `output` (B, ...) without its head, which is the decoder start token
    (encoder-decoder) or the `prompt` (decoder-only; the prompt tensor given to `generate`, or its width)."""
    width = 1 if model.config.arch == "encdec" else (prompt if isinstance(prompt, int) else prompt.shape[-1])
    return output[:, width:]


def _cache_len(n: int, compile: bool) -> int:
    """Cache slots for n positions; a compiled (fixed-shape) cache rounds up so shapes repeat across calls."""
    return round_up(n, 64) if compile else n


def greedy_step(model, tokens: Tensor, cache) -> tuple[Tensor, Tensor]:
    """A decode step's logits (B, V) and greedy pick (B,): the model's `greedy_step` where it has one (mu's models: the
    native step computes the pick in its call), else the argmax of `decode_step`'s logits (an ONNX Runtime model)."""
    step = getattr(model, "greedy_step", None)
    if step is not None:
        return step(tokens, cache)
    logits = model.decode_step(tokens, cache)
    return logits, sample_logits(logits)


def _sample_loop(model, logits: Tensor, cache, max_new_tokens: int, eos: Optional[int], pad: int, streamer,
                 sampling: dict) -> Tensor:
    B = logits.shape[0]
    finished = torch.zeros(B, dtype=torch.bool, device=logits.device)
    out = []
    token = sample_logits(logits, **sampling)
    # greedy, one sequence: the rest in one native call where the model has one (`greedy_tokens`)
    native = getattr(model, "greedy_tokens", None) if B == 1 and not sampling["do_sample"] else None
    for step in range(max_new_tokens):
        if eos is not None:
            token = token.masked_fill(finished, pad)
            finished |= token == eos
        out.append(token)
        if streamer is not None:
            streamer.put(token.cpu())
        if step == max_new_tokens - 1 or (eos is not None and bool(finished.all())):
            break
        if native is not None:
            put = None if streamer is None else streamer.put  # (each token a (1,) tensor, as above)
            rest = native(token[:, None], cache, max_new_tokens - 1 - step, eos, put)
            if rest is not None:
                out.extend(rest.to(token.device).split(1))
                break
            native = None
        if sampling["do_sample"]:
            token = sample_logits(model.decode_step(token[:, None], cache), **sampling)
        else:
            token = greedy_step(model, token[:, None], cache)[1]
    if streamer is not None:
        streamer.end()
    return torch.stack(out, dim=1)


def beam_search(model, logits: Tensor, cache, num_beams: int, max_new_tokens: int, eos: Optional[int], pad: int,
                length_penalty: float = 1.0) -> Tensor:
    """Beam search from prefilled `logits` (B, V) and `cache` (B rows); returns the best new tokens (B, N).

    A beam that emits EOS becomes a finished hypothesis scored sum(log p) / length**length_penalty;
    a row stops once it has `num_beams` finished hypotheses (early stopping), so one beam is greedy.
    """
    B, V = logits.shape
    K = num_beams
    device = logits.device
    cache.reorder(torch.arange(B, device=device).repeat_interleave(K))
    logp = F.log_softmax(logits.float(), -1).repeat_interleave(K, 0)  # (B*K, V)
    beam_scores = torch.zeros(B, K, device=device)
    beam_scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first
    seqs = torch.empty(B * K, 0, dtype=torch.long, device=device)
    finished: list[list[tuple[float, Tensor]]] = [[] for _ in range(B)]
    done = [False] * B
    for step in range(max_new_tokens):
        scores = (beam_scores.view(-1, 1) + logp).view(B, K * V)
        top_scores, top_idx = scores.topk(2 * K, dim=-1)
        next_beam = (torch.arange(B) * K).repeat_interleave(K).view(B, K)  # default: the row's first beam
        next_token = torch.full((B, K), pad, dtype=torch.long)
        next_score = torch.full((B, K), float("-inf"))
        for b in range(B):
            kept = 0
            for score, idx in zip(top_scores[b].tolist(), top_idx[b].tolist()):
                if done[b] or kept == K:
                    break
                src, tok = divmod(idx, V)
                if eos is not None and tok == eos:
                    hyp = torch.cat([seqs[b * K + src], seqs.new_tensor([tok])])
                    finished[b].append((score / (step + 1) ** length_penalty, hyp))
                    if len(finished[b]) >= K:
                        done[b] = True
                    continue
                next_beam[b, kept], next_token[b, kept], next_score[b, kept] = b * K + src, tok, score
                kept += 1
            if done[b]:  # keep the row's beams alive but inert until the batch finishes
                next_beam[b] = b * K
        rows = next_beam.view(-1).to(device)
        seqs = torch.cat([seqs.index_select(0, rows), next_token.view(-1, 1).to(device)], dim=1)
        beam_scores = next_score.to(device)
        if all(done) or step == max_new_tokens - 1:
            break
        cache.reorder(rows)
        logp = F.log_softmax(model.decode_step(next_token.view(-1, 1).to(device), cache).float(), -1)
    best = []
    for b in range(B):
        if not done[b]:
            for k in range(K):
                if beam_scores[b, k] > float("-inf"):
                    finished[b].append((beam_scores[b, k].item() / seqs.shape[1] ** length_penalty, seqs[b * K + k]))
        best.append(max(finished[b], key=lambda h: h[0])[1])
    width = max(len(s) for s in best)
    out = torch.full((B, width), pad, dtype=torch.long, device=device)
    for b, s in enumerate(best):
        out[b, :len(s)] = s
    return out
