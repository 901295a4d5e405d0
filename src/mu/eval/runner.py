"""Evaluate a model on a task: batched cached greedy generation for both architectures, then the metrics.

    metrics, predictions = evaluate_model(model, tokenizer, "squad_v2", examples)

Sources are tokenised exactly as in training (`mu.data.tasks.encode_source`: no special tokens, an
over-long prompt loses the end of its last field but keeps its closing "###Answer" marker), sorted by
length so each batch pads little, and decoded with `model.generate` until EOS:

    encoder-decoder  encoder input = source ids; output = decoder ids after the start token
    decoder-only     prompt = source ids (left-padded by `generate`); output = ids after the prompt width
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from mu.data.tasks import Example, encode_source, get_task
from mu.errors import MuError
from mu.generation import new_tokens
from mu.eval.metrics import compute_metrics

# Generation budgets per task, in tokens (a byte-level tokenizer may need more: pass max_new_tokens).
MAX_NEW_TOKENS = {"squad_v2": 48, "xsum": 96, "code2text": 64, "seq2seq": 128}


def _decode(tokenizer, ids: list[int], eos: Optional[int], pad: int) -> str:
    if eos is not None and eos in ids:
        ids = ids[:ids.index(eos)]
    ids = [i for i in ids if i != pad]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def default_max_source_len(model, max_new_tokens: int) -> int:
    """The model's trained context (`block_size`); a decoder-only prompt leaves room for the new tokens."""
    block = model.config.block_size
    return block if model.config.arch == "encdec" else max(1, block - max_new_tokens)


@torch.inference_mode()
def generate_predictions(model, tokenizer, task: str, examples: Sequence[Example], batch_size: int = 16,
                         max_new_tokens: Optional[int] = None, max_source_len: Optional[int] = None,
                         device: Optional[torch.device | str] = None, progress: bool = True,
                         num_beams: int = 1) -> dict[str, str]:
    """{example id: generated text} with greedy (or beam) cached decoding, batched by source length."""
    spec = get_task(task)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise MuError("no tokenizer: pass one, or use a model directory saved with its tokenizer")
    if batch_size < 1:
        raise MuError(f"batch_size must be >= 1, got {batch_size}")
    if device is not None:
        model.to(device)
    max_new_tokens = max_new_tokens or MAX_NEW_TOKENS[spec.name]
    max_source_len = max_source_len or default_max_source_len(model, max_new_tokens)
    eos, pad = tokenizer.eos_token_id, model.config.pad_token_id
    if eos is None:
        raise MuError("the tokenizer has no EOS token; evaluation stops each answer at EOS")
    encoded, truncated = [], 0
    for ex in examples:
        ids, cut = encode_source(tokenizer, ex.source, max_source_len, spec)
        truncated += cut
        encoded.append(ids)
    if truncated:
        import warnings

        warnings.warn(f"{truncated} of {len(examples)} sources were longer than {max_source_len} tokens and were "
                      f"truncated (the end of the last field was cut)", stacklevel=2)
    order = sorted(range(len(examples)), key=lambda i: -len(encoded[i]))  # longest first: OOM shows at once
    predictions: dict[str, str] = {}
    from tqdm.auto import tqdm

    bar = tqdm(total=len(examples), desc=f"eval {spec.name}", unit="ex", disable=not progress, dynamic_ncols=True)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in rows)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.bool)
            for r, i in enumerate(rows):  # right padding; generate() left-aligns decoder-only prompts itself
                input_ids[r, :len(encoded[i])] = torch.tensor(encoded[i], dtype=torch.long)
                mask[r, :len(encoded[i])] = True
            out = model.generate(input_ids.to(model.device), attention_mask=mask.to(model.device),
                                 max_new_tokens=max_new_tokens, eos_token_id=eos, num_beams=num_beams)
            new = new_tokens(model, out, width)
            for r, i in enumerate(rows):
                predictions[examples[i].id] = _decode(tokenizer, new[r].tolist(), eos, pad)
            bar.update(len(rows))
    finally:
        bar.close()
        model.train(was_training)
    return {ex.id: predictions[ex.id] for ex in examples}  # in the examples' order


def evaluate_model(model, tokenizer, task: str, examples: Sequence[Example], batch_size: int = 16,
                   max_new_tokens: Optional[int] = None, max_source_len: Optional[int] = None,
                   device: Optional[torch.device | str] = None, progress: bool = True,
                   num_beams: int = 1) -> tuple[dict[str, float], dict[str, str]]:
    """Generate for every example and score: -> (metrics, {id: prediction}). See `compute_metrics` for keys."""
    if not examples:
        raise MuError("no examples to evaluate")
    predictions = generate_predictions(model, tokenizer, task, examples, batch_size, max_new_tokens,
                                       max_source_len, device, progress, num_beams)
    return compute_metrics(task, examples, predictions), predictions
