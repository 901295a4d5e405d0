"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedules.

Weight decay applies to every parameter with 2 or more dimensions: the attention and MLP
matrices and the tied embedding / lm_head matrix (as nanoGPT and litgpt do). Norm weights and
biases (1-D) are not decayed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():  # tied parameters are yielded once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float,
                    device: torch.device) -> torch.optim.AdamW:
    fused = device.type == "cuda"  # the fused kernel is CUDA-only; foreach elsewhere
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, fused=fused or None)


@dataclass
class LRSchedule:
    """lr(step) for step = 0, 1, ... (the step about to be taken).

    Linear warmup from lr/warmup_steps to lr over `warmup_steps`, then
      cosine:   cosine decay to min_lr_ratio * lr at `total_steps`
      wsd:      constant, then linear decay to min_lr_ratio * lr over the last decay_fraction of the steps
      constant: lr
    """

    lr: float
    total_steps: int
    warmup_steps: int
    name: str = "cosine"
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2

    def __call__(self, step: int, min_progress: float = 0.0) -> float:
        """`min_progress` (cosine): decay at least this far (e.g. the fraction of a time budget spent)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.name == "constant":
            return self.lr
        floor = self.min_lr_ratio * self.lr
        if self.name == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            progress = max(0.0, min(1.0, max((step - self.warmup_steps) / span, min_progress)))
            return floor + (self.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        decay_steps = max(1, round(self.decay_fraction * self.total_steps))
        decay_start = max(self.warmup_steps, self.total_steps - decay_steps)
        if step < decay_start:
            return self.lr
        progress = min(1.0, (step - decay_start) / max(1, self.total_steps - decay_start))
        return self.lr - (self.lr - floor) * progress

    def state_dict(self) -> dict:
        return asdict(self)


def warmup_steps(warmup: float, total_steps: int) -> int:
    """`warmup` >= 1 is a number of steps, < 1 a fraction of the total; at most the total."""
    steps = int(warmup) if warmup >= 1 else int(round(warmup * total_steps))
    return min(steps, total_steps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
