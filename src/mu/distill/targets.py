"""Which sequences the teacher scores, and where its logits line up with the student's.

For one example with source tokens s (length S) and target tokens t (length n, ending in EOS):

    student (encoder-decoder)  encoder: s          decoder input: [BOS] t[0] ... t[n-2]
                               decoder position j predicts t[j]
    teacher (decoder-only)     input:   s t[0] ... t[n-2]   (its own causal format: source, then target)
                               position S-1+j predicts t[j]

so the teacher's logits at positions S-1 .. S-1+n-1 align one-to-one with the student's decoder
positions 0 .. n-1. Rows are right-padded; the teacher gets an explicit attention mask, and the
positions beyond a row's target are masked out of the loss. (A source-less example starts the
teacher's input with BOS, as the trainer's decoder-only collator does.)

Targets are either the gold ones (off-policy) or sampled by the student itself from its cached
generation loop (on-policy: temperature 0.9, top-k 128 in the paper's code).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from mu.data.batching import IGNORE_INDEX


@dataclass
class TeacherInputs:
    input_ids: Tensor  # (B, L) right-padded source + target[:-1]
    attention_mask: Tensor  # (B, L) True = real token
    positions: Tensor  # (B, T) index into L of the logit predicting target j (0 where j is padding)


def teacher_inputs(source_ids: Tensor, source_mask: Tensor, target_ids: Tensor, target_mask: Tensor,
                   pad_token_id: int = 0, bos_token_id: int = 1) -> TeacherInputs:
    """Build the teacher's right-padded inputs from right-padded source (B, S) and target (B, T) tensors.

    source_mask / target_mask (True = real token) say which tokens are real; the values of padded
    positions are ignored (targets may hold -100 there).
    """
    B, T = target_ids.shape
    device = target_ids.device
    src_len = source_mask.long().sum(-1)  # (B,)
    tgt_len = target_mask.long().sum(-1)
    eff_src = src_len.clamp(min=1)  # an empty source becomes [BOS]
    width = int((eff_src + (tgt_len - 1).clamp(min=0)).max())
    input_ids = torch.full((B, width), pad_token_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((B, width), dtype=torch.bool, device=device)
    positions = torch.zeros((B, T), dtype=torch.long, device=device)
    for i in range(B):
        s = source_ids[i][source_mask[i].bool()] if int(src_len[i]) else torch.tensor([bos_token_id], device=device)
        t = target_ids[i][target_mask[i].bool()]
        n = t.numel()
        row = torch.cat([s, t[:max(n - 1, 0)]])
        input_ids[i, :row.numel()] = row
        attention_mask[i, :row.numel()] = True
        positions[i, :n] = torch.arange(s.numel() - 1, s.numel() - 1 + n, device=device)
    return TeacherInputs(input_ids, attention_mask, positions)


def gold_target_mask(targets: Tensor) -> Tensor:
    """Real target positions of a collated batch (padding is IGNORE_INDEX)."""
    return targets != IGNORE_INDEX


@dataclass
class SampledTargets:
    targets: Tensor  # (B, T) sampled target tokens, IGNORE_INDEX after the row's end
    target_mask: Tensor  # (B, T) True = real target token (up to and including the first EOS)
    decoder_input_ids: Tensor  # (B, T) [BOS] + targets[:-1], pad after the row's end
    decoder_attention_mask: Tensor  # (B, T)


@torch.no_grad()
def sample_student_targets(student, encoder_input_ids: Tensor, encoder_attention_mask: Optional[Tensor],
                           max_new_tokens: int, eos_token_id: int, bos_token_id: int = 1, pad_token_id: int = 0,
                           temperature: float = 0.9, top_k: Optional[int] = 128, vocab_limit: Optional[int] = None,
                           unk_token_id: int = 0, generator: Optional[torch.Generator] = None) -> SampledTargets:
    """On-policy targets: the student samples a target for each source with its cached generation loop
    (in eval mode, no gradients). A row ends at its first EOS (kept) or after `max_new_tokens` tokens.
    Ids >= `vocab_limit` (ids the teacher has no logit for, e.g. the student's extra rows) become `unk_token_id`,
    as in the paper's code.
    """
    out = student.generate(encoder_input_ids, attention_mask=encoder_attention_mask, max_new_tokens=max_new_tokens,
                           do_sample=True, temperature=temperature, top_k=top_k, eos_token_id=eos_token_id,
                           bos_token_id=bos_token_id, generator=generator)
    gen = out[:, 1:]  # drop the decoder start token
    B, T = gen.shape
    is_eos = gen == eos_token_id
    first_eos = torch.where(is_eos.any(-1), is_eos.float().argmax(-1), torch.full((B,), T - 1, device=gen.device))
    lengths = first_eos + 1  # (B,) tokens up to and including EOS (or all of them)
    mask = torch.arange(T, device=gen.device)[None, :] < lengths[:, None]
    if vocab_limit is not None:
        gen = gen.masked_fill(gen >= vocab_limit, unk_token_id)
    targets = gen.masked_fill(~mask, IGNORE_INDEX)
    dec = torch.full_like(gen, pad_token_id)
    dec[:, 0] = bos_token_id
    dec[:, 1:] = gen[:, :-1]
    dec_mask = mask.clone()  # decoder position j is real iff target j is
    dec = dec.masked_fill(~dec_mask, pad_token_id)
    return SampledTargets(targets, mask, dec, dec_mask)
