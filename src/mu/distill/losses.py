"""Distillation losses: divergences between teacher and student next-token distributions.

Every divergence here compares two distributions at the same temperature tau, position by
position, over the vocabulary ids both models have (`common vocabulary`, the first
min(V_student, V_teacher) ids), and averages over the positions that are real target tokens:

    p = softmax(z_teacher / tau)      q = softmax(z_student / tau)

    forward_kl   KL(p || q) = sum p (log p - log q)        mode-covering, the classic KD loss (Hinton et al.)
    reverse_kl   KL(q || p) = sum q (log q - log p)        mode-seeking (MiniLLM)
    jsd          generalised Jensen-Shannon of GKD (Agarwal et al. 2024) with weight beta:
                 m = beta p + (1 - beta) q,  JSD(beta) = beta KL(p || m) + (1 - beta) KL(q || m)
                 beta = 0.5 is the symmetric JS divergence (<= log 2). For small beta,
                 JSD(beta) ~ beta KL(p || q); for beta near 1, ~ (1 - beta) KL(q || p); the end points
                 themselves are defined as forward KL (beta = 0) and reverse KL (beta = 1), as in TRL.

The KD term is multiplied by tau^2 (Hinton et al.: keeps gradient magnitudes comparable across
temperatures) unless `scale_by_t2=False`. The training loss is

    loss = alpha * KD + (1 - alpha) * CE(gold targets)          alpha = 0.9 by default (the paper)

Unlike the paper's code, padding positions are masked out of both terms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mu.errors import MuError

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


@dataclass(frozen=True)
class KDLossConfig:
    alpha: float = 0.9  # weight of the KD term; 1 - alpha goes to cross-entropy on the gold targets
    divergence: str = "forward_kl"  # forward_kl | reverse_kl | jsd
    temperature: float = 1.0  # tau: both distributions are softened by it
    jsd_beta: float = 0.5  # the JSD's mixture weight of the teacher (only for divergence="jsd")
    scale_by_t2: bool = True  # multiply the KD term by tau^2

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise MuError(f"kd alpha must be in [0, 1], got {self.alpha}")
        if self.divergence not in DIVERGENCES:
            raise MuError(f"unknown divergence {self.divergence!r}; expected one of {DIVERGENCES}")
        if not self.temperature > 0:
            raise MuError(f"kd temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise MuError(f"jsd beta must be in [0, 1], got {self.jsd_beta}")


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) over the last dim from log-probabilities; 0 * log 0 counts as 0."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)


def divergence(student_logp: Tensor, teacher_logp: Tensor, kind: str = "forward_kl", beta: float = 0.5) -> Tensor:
    """Per-position divergence (...,) between log-probability tensors (..., V) of the same shape."""
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return _kl(teacher_logp, student_logp)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return _kl(student_logp, teacher_logp)
    if kind == "jsd":
        mix = torch.logsumexp(torch.stack([teacher_logp + math.log(beta), student_logp + math.log(1.0 - beta)]), 0)
        return beta * _kl(teacher_logp, mix) + (1.0 - beta) * _kl(student_logp, mix)
    raise MuError(f"unknown divergence {kind!r}; expected one of {DIVERGENCES}")


def masked_mean(values: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Mean of `values` (B, T) over positions where `mask` is True (all positions when mask is None)."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def kd_divergence(student_logits: Tensor, teacher_logp: Tensor, mask: Optional[Tensor],
                  config: KDLossConfig = KDLossConfig()) -> Tensor:
    """The KD term: mean divergence over valid positions, x tau^2 unless disabled.

    student_logits (B, T, V_s); teacher_logp (B, T, V_t) log-probabilities *already at temperature tau*
    (see `teacher_log_probs`); both are cut to the common vocabulary min(V_s, V_t) and the student is
    renormalised over it. mask (B, T): True where the position is a real target token.
    """
    V = min(student_logits.shape[-1], teacher_logp.shape[-1])
    if student_logits.shape[:-1] != teacher_logp.shape[:-1]:
        raise ValueError(f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logp.shape)} "
                         f"positions do not line up")
    s = F.log_softmax(student_logits[..., :V].float() / config.temperature, dim=-1)
    t = teacher_logp[..., :V].float()
    if teacher_logp.shape[-1] != V:  # a teacher with more ids than the student: renormalise over the common ones
        t = F.log_softmax(t, dim=-1)
    per_position = divergence(s, t, config.divergence, config.jsd_beta)  # (B, T)
    loss = masked_mean(per_position, mask)
    return loss * config.temperature ** 2 if config.scale_by_t2 else loss


def teacher_log_probs(teacher_logits: Tensor, temperature: float, vocab: Optional[int] = None) -> Tensor:
    """Teacher logits (B, T, V_t) -> log-probabilities at temperature tau over the first `vocab` ids (fp32)."""
    if vocab is not None:
        teacher_logits = teacher_logits[..., :vocab]
    return F.log_softmax(teacher_logits.float() / temperature, dim=-1)


def topk_log_probs(values: Tensor, indices: Tensor, lse: Tensor, vocab: int, temperature: float) -> Tensor:
    """Dense teacher log-probabilities (B, T, vocab) at temperature tau rebuilt from a top-k summary.

    values/indices (B, T, k): the teacher's k largest logits and their ids; lse (B, T): logsumexp of the
    teacher's logits / tau over the whole common vocabulary. The k ids get their exact probability; the
    remaining mass 1 - sum(top-k) is spread evenly over the other vocab - k ids (so reverse KL and JSD
    stay finite, and forward KL sees the teacher's tail mass).
    """
    logp_top = values.float() / temperature - lse.float()[..., None]  # (B, T, k)
    k = values.shape[-1]
    if k >= vocab:  # the summary holds every id: exact
        return torch.zeros(*values.shape[:-1], vocab, device=values.device).scatter(-1, indices.long(), logp_top)
    tail = (1.0 - logp_top.exp().sum(-1)).clamp(min=1e-12) / (vocab - k)  # (B, T)
    out = tail.log()[..., None].expand(*values.shape[:-1], vocab).clone()
    return out.scatter(-1, indices.long(), logp_top)


def combine(kd: Optional[Tensor], ce: Optional[Tensor], alpha: float) -> Tensor:
    """alpha * KD + (1 - alpha) * CE, skipping a term whose weight is 0 (it may be None then)."""
    if alpha >= 1.0:
        return kd
    if alpha <= 0.0:
        return ce
    return alpha * kd + (1.0 - alpha) * ce
