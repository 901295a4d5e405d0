"""One optimizer step, shared by every training loop (text, VQA, LoRA).

    result = train_step(model, optimizer, micro_batches, loss_fn, env, grad_clip=1.0)

`loss_fn(model, batch) -> (loss, stats)`: the mean loss over the batch's scored tokens and floats to
log. Each micro-batch's loss is weighted by its share of the step's scored tokens (the batch's
"n_loss_tokens", else its number of rows), summed over processes, so the gradient is the token mean
over the global batch under DDP/FSDP as in one process. A NaN/Inf loss or gradient norm stops the
step before the optimizer touches the weights (`TrainingDiverged`). The learning rate is the
caller's: set it on the optimizer's groups before the call.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from mu.errors import MuError
from mu.train.distributed import DistEnv, all_reduce_sum, no_grad_sync

LossFn = Callable[[nn.Module, dict], tuple[Tensor, dict]]


class TrainingDiverged(MuError):
    """The loss or the gradient norm became NaN/Inf; the run stopped before the optimizer step."""


@dataclass
class StepResult:
    loss: float  # token-mean loss over the global batch
    grad_norm: float  # before clipping
    loss_tokens: float  # scored tokens in the global batch
    sums: list[float] = field(default_factory=list)  # `counters` of the micro-batches, summed over processes
    extra: dict[str, float] = field(default_factory=dict)  # loss_fn's stats, token-weighted means


def clip_gradients(model: nn.Module, max_norm: float) -> float:
    """Clip the gradient norm of `model`'s parameters that have gradients (0 or less: no clipping); the norm."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP: a DTensor
        norm = norm.full_tensor()
    return float(norm)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: Sequence[dict], loss_fn: LossFn,
               env: Optional[DistEnv] = None, *, grad_clip: float = 1.0, autocast=None,
               counters: Optional[Callable[[dict], Sequence[float]]] = None,
               on_diverged: Optional[Callable[[str, float], None]] = None) -> StepResult:
    """Forward/backward every micro-batch (gradient sync on the last only), check, clip, step, zero the grads.

    `autocast`: a context-manager factory (e.g. `lambda: torch.autocast("cuda", torch.bfloat16)`).
    `counters(batch)`: numbers of each batch (e.g. its real tokens) to sum over micro-batches and processes.
    `on_diverged(what, value)`: called instead of the default `TrainingDiverged` (it must raise).
    """
    env = env or DistEnv()
    autocast = autocast or nullcontext
    counts = [float(b["n_loss_tokens"] if "n_loss_tokens" in b else len(b["targets"])) for b in micro_batches]
    (n_global,) = all_reduce_sum([sum(counts)], env)
    loss_sum, extra = 0.0, {}
    for k, batch in enumerate(micro_batches):
        with no_grad_sync(model, env, skip=k < len(micro_batches) - 1):
            with autocast():
                loss, stats = loss_fn(model, batch)
            # token-weighted share of the global mean; x world_size undoes DDP's gradient averaging
            (loss * (counts[k] / n_global * env.world_size)).backward()
        loss_sum += float(loss.detach()) * counts[k]
        for key, v in stats.items():
            extra[key] = extra.get(key, 0.0) + float(v) * counts[k]
    keys = sorted(extra)
    per_batch = [list(counters(b)) for b in micro_batches] if counters is not None else []
    own = [float(sum(col)) for col in zip(*per_batch)]
    reduced = all_reduce_sum([loss_sum, *own, *[extra[k] for k in keys]], env)
    diverged = on_diverged or _diverged
    loss_mean = reduced[0] / n_global
    if not math.isfinite(loss_mean):
        optimizer.zero_grad(set_to_none=True)
        diverged("loss", loss_mean)
    grad_norm = clip_gradients(model, grad_clip)
    if not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        diverged("gradient norm", grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    n_sums = len(own)
    return StepResult(loss_mean, grad_norm, n_global, reduced[1:1 + n_sums],
                      {k: v / n_global for k, v in zip(keys, reduced[1 + n_sums:])})


def _diverged(what: str, value: float) -> None:
    raise TrainingDiverged(f"the training {what} is {value}; stopped before the optimizer step")


def stage_autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """An autocast factory for `train_step` (None dtype: fp32, no autocast)."""
    if dtype is None:
        return nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def any_rank(flag: bool, env: Optional[DistEnv]) -> bool:
    """True on every process when it is true on one (e.g. a stop signal that reached one rank)."""
    if env is None or not env.distributed:
        return flag
    return all_reduce_sum([1.0 if flag else 0.0], env)[0] > 0


__all__ = ["LossFn", "StepResult", "TrainingDiverged", "any_rank", "clip_gradients", "stage_autocast", "train_step"]
