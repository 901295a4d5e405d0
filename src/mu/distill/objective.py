"""The distillation objective as a trainer `loss_fn(model, batch) -> (loss, stats)`.

Per batch (a collated encoder-decoder batch from `mu.data.batching.Collator`):

1. choose the KD targets: the gold ones, or, with probability `on_policy` (lambda, GKD-style; 1.0 is the
   paper's setting), targets the student samples itself (eval mode, cached generation, no gradients);
2. run the student (one forward; with sampled targets and alpha < 1 the gold and sampled decoder
   inputs go through together, as 2B decoder rows over the B prompts encoded once);
3. get the teacher's log-probabilities at the aligned positions: from the top-k cache for gold targets
   when one was built, else a teacher forward on source + target;
4. loss = alpha * tau^2 * D(teacher || student) + (1 - alpha) * CE(gold), padding masked out of both.

In eval mode (the trainer's validation) the targets are always the gold ones and the teacher runs live (the
cache holds training examples only), so the validation loss is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mu.distill.losses import KDLossConfig, combine, kd_divergence, teacher_log_probs, topk_log_probs
from mu.distill.targets import gold_target_mask, sample_student_targets, teacher_inputs
from mu.distill.teacher import Teacher, unwrap
from mu.distill.topk import TopKCache
from mu.model.base import lm_loss


@dataclass
class SamplingConfig:
    temperature: float = 0.9  # the paper's on-policy sampling temperature
    top_k: Optional[int] = 128  # the paper's top-k
    max_new_tokens: int = 256  # the paper's decoder_seq_len


def _pad_to(x: Tensor, width: int, value) -> Tensor:
    return F.pad(x, (0, width - x.shape[1]), value=value) if x.shape[1] < width else x


@dataclass
class DistillObjective:
    teacher: Teacher
    vocab: int  # ids both models score: min(V_student, V_teacher)
    eos_token_id: int
    kd: KDLossConfig = field(default_factory=KDLossConfig)
    on_policy: float = 0.0  # lambda: probability that a batch uses student-sampled targets for KD
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    topk_cache: Optional[TopKCache] = None  # precomputed teacher top-k for the gold targets (by batch["index"])
    bos_token_id: int = 1
    pad_token_id: int = 0
    unk_token_id: int = 0

    def _teacher_logp(self, batch: dict, targets: Tensor, target_mask: Tensor, cached: bool) -> Tensor:
        width = targets.shape[1]
        if cached:
            values, ids, lse = self.topk_cache.lookup(batch["index"], width, device=targets.device)
            return topk_log_probs(values, ids, lse, self.vocab, self.kd.temperature)
        ti = teacher_inputs(batch["encoder_input_ids"], batch["encoder_attention_mask"], targets, target_mask,
                            self.pad_token_id, self.bos_token_id)
        logits = self.teacher.target_logits(ti.input_ids, ti.attention_mask, ti.positions).to(targets.device)
        return teacher_log_probs(logits, self.kd.temperature, self.vocab)

    def __call__(self, model, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        alpha = self.kd.alpha
        enc, enc_mask = batch["encoder_input_ids"], batch["encoder_attention_mask"]
        gold, gold_mask = batch["targets"], gold_target_mask(batch["targets"])
        B = gold.shape[0]
        training = unwrap(model).training  # validation (eval mode): gold targets, live teacher, deterministic
        on = training and alpha > 0.0 and self.on_policy > 0.0 and (
            self.on_policy >= 1.0 or float(torch.rand(())) < self.on_policy)
        if not on:
            logits = model(encoder_input_ids=enc, decoder_input_ids=batch["decoder_input_ids"],
                           encoder_attention_mask=enc_mask,
                           decoder_attention_mask=batch["decoder_attention_mask"]).logits
            gold_logits = kd_logits = logits
            kd_targets, kd_mask = gold, gold_mask
        else:
            s = sample_student_targets(unwrap(model), enc, enc_mask, self.sampling.max_new_tokens, self.eos_token_id,
                                       self.bos_token_id, self.pad_token_id, self.sampling.temperature,
                                       self.sampling.top_k, self.vocab, self.unk_token_id)
            kd_targets, kd_mask = s.targets, s.target_mask
            if alpha < 1.0:  # gold rows (for CE) and sampled rows (for KD) in one forward, the prompts encoded once
                width = max(gold.shape[1], kd_targets.shape[1])
                dec = torch.cat([_pad_to(batch["decoder_input_ids"], width, self.pad_token_id),
                                 _pad_to(s.decoder_input_ids, width, self.pad_token_id)])
                dec_mask = torch.cat([_pad_to(batch["decoder_attention_mask"].bool(), width, False),
                                      _pad_to(s.decoder_attention_mask, width, False)])
                logits = model(encoder_input_ids=enc, decoder_input_ids=dec, encoder_attention_mask=enc_mask,
                               decoder_attention_mask=dec_mask).logits
                gold_logits, kd_logits = logits[:B, :gold.shape[1]], logits[B:, :kd_targets.shape[1]]
            else:
                gold_logits = None
                kd_logits = model(encoder_input_ids=enc, decoder_input_ids=s.decoder_input_ids,
                                  encoder_attention_mask=enc_mask,
                                  decoder_attention_mask=s.decoder_attention_mask).logits
        stats: dict[str, float] = {"on_policy": float(on)}
        kd = ce = None
        if alpha > 0.0:
            cached = training and not on and self.topk_cache is not None  # the cache holds training examples
            teacher_logp = self._teacher_logp(batch, kd_targets, kd_mask, cached)
            kd = kd_divergence(kd_logits, teacher_logp, kd_mask, self.kd)
            stats["kd_loss"] = float(kd.detach())
        if gold_logits is not None:
            ce = lm_loss(gold_logits, gold, self.pad_token_id)
            stats["ce_loss"] = float(ce.detach())
        return combine(kd, ce, alpha), stats
