"""Budget planning: how many steps a run takes, from its limits (steps, FLOPs, tokens, epochs), and when it stops.

    budget = plan_budget(cfg, world_size, train_data, model_config, epoch_batches)
    budget.total_steps, budget.global_batch, budget.stop_reason(state)

Tokens per step are exact for fine-tuning (every example's length) and sampled for pretraining
(every n-th chunk when there are more than 4,096); FLOPs are 6·N·tokens per stack (mu.train.flops).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Optional

from mu.data.batching import length_grouped_batches
from mu.errors import MuError
from mu.train.flops import training_flops


@dataclass
class Budget:
    accum: int  # micro-batches per process per step
    micro_per_step: int  # micro-batches per step over all processes
    global_batch: int  # examples per step
    steps_per_epoch: int
    est_tokens_per_step: float
    est_flops_per_step: float
    epoch_steps: Optional[int]  # the epochs limit in steps (None when another limit was given alone)
    total_steps: int  # the first limit reached
    max_steps: Optional[int] = None
    max_flops: Optional[float] = None
    max_tokens: Optional[int] = None

    def stop_reason(self, state: Any) -> Optional[str]:
        """Which limit `state` (step, flops, tokens) has reached, or None."""
        if self.max_steps and state.step >= self.max_steps:
            return "max_steps"
        if self.max_flops and state.flops >= self.max_flops:
            return "max_flops"
        if self.max_tokens and state.tokens >= self.max_tokens:
            return "max_tokens"
        if self.epoch_steps is not None and state.step >= self.epoch_steps:
            return "epochs"
        return None


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool
                  ) -> list[list[int]]:
    """One epoch's micro-batches of example indices: length-grouped, or a seeded shuffle."""
    if group_by_length:
        return length_grouped_batches(lengths, batch_size, seed, epoch)
    order = list(range(len(lengths)))
    random.Random(f"mu-batches:{seed}:{epoch}").shuffle(order)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def feature_tokens(feature: dict, arch: str) -> tuple[int, int]:
    """(encoder, decoder) tokens of one example's features."""
    s, t = len(feature["source_ids"]), len(feature["target_ids"])
    if arch == "encdec":
        return s, t
    return 0, (s + t - 1) if s else t


def plan_budget(cfg, world_size: int, train_data, model_config, batches: Callable[[int], list]) -> Budget:
    """The run's steps from `cfg` (TrainConfig: batch sizes and limits) for `train_data` (features with
    `get(i, epoch)`), `batches(epoch)` giving an epoch's micro-batches."""
    if cfg.global_batch_size is None:
        accum = 1
    else:
        per_step = cfg.batch_size * world_size
        if cfg.global_batch_size % per_step:
            raise MuError(f"--global-batch-size {cfg.global_batch_size} is not a multiple of --batch-size "
                          f"{cfg.batch_size} x {world_size} process(es) = {per_step}")
        accum = cfg.global_batch_size // per_step
    micro_per_step = accum * world_size
    n_batches = len(batches(0))
    steps_per_epoch = n_batches // micro_per_step
    if steps_per_epoch == 0:
        raise MuError(f"{len(train_data)} training examples make {n_batches} micro-batches of {cfg.batch_size}, "
                      f"fewer than one step needs ({micro_per_step}); lower --global-batch-size or --batch-size")
    n = len(train_data)
    sample = range(n) if n <= 4096 else range(0, n, n // 4096)
    enc = dec = 0
    for i in sample:
        e, d = feature_tokens(train_data.get(i, 0), model_config.arch)
        enc, dec = enc + e, dec + d
    k = len(sample)
    examples_per_step = n / (n_batches / micro_per_step)  # batches may be short at group ends
    limits = {}
    if cfg.max_steps:
        limits["max_steps"] = cfg.max_steps
    est_flops = training_flops(model_config, enc / k * examples_per_step, dec / k * examples_per_step)
    est_tokens = (enc + dec) / k * examples_per_step
    if cfg.max_flops:
        limits["max_flops"] = math.ceil(cfg.max_flops / est_flops)
    if cfg.max_tokens:
        limits["max_tokens"] = math.ceil(cfg.max_tokens / est_tokens)
    epoch_steps = None
    if cfg.epochs or not limits:
        epoch_steps = limits["epochs"] = max(1, math.ceil((cfg.epochs or 1.0) * steps_per_epoch))
    return Budget(accum, micro_per_step, cfg.batch_size * micro_per_step, steps_per_epoch, est_tokens, est_flops,
                  epoch_steps, min(limits.values()), cfg.max_steps, cfg.max_flops, cfg.max_tokens)
