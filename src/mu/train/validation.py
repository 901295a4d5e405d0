"""Validation for the text trainer: token-mean loss over every process, a few greedy samples, the task metric.

    validator = Validator(cfg, env, model, raw, tokenizer, val_data, val_examples, collate, loss_fn, autocast)
    result = validator.validate()      # {"val_loss", "val_ppl", "samples"?, task metrics?}
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

from mu.data.batching import length_grouped_batches
from mu.errors import MuError
from mu.generation import new_tokens
from mu.train.distributed import DistEnv, all_reduce_sum, broadcast_object


class Validator:
    """What one run's validation needs: `model` (wrapped, for FSDP), `raw` (the plain model, for sampling),
    `collate(features) -> batch on the device`, `loss_fn`, `autocast()`."""

    def __init__(self, cfg, env: DistEnv, model, raw, tokenizer, val_data, val_examples: Optional[list],
                 collate: Callable[[list], dict], loss_fn, autocast: Callable[[], Any]):
        self.cfg, self.env, self.model, self.raw, self.tokenizer = cfg, env, model, raw, tokenizer
        self.config = raw.config
        self.val_data, self.val_examples, self._collate, self.loss_fn = val_data, val_examples, collate, loss_fn
        self.autocast = autocast

    def _bos_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return 1 if bos is None else bos

    @torch.no_grad()
    def validate(self) -> dict[str, Any]:
        """Validation loss (token mean, all processes), a few greedy samples and the task metric (rank 0)."""
        cfg, env = self.cfg, self.env
        model = self.model if env.strategy == "fsdp" else self.raw
        was_training = model.training
        model.eval()
        bs = cfg.eval_batch_size or cfg.batch_size
        data = self.val_data
        batches = length_grouped_batches(data.lengths(self.config.arch), bs, shuffle=False)
        per_rank = math.ceil(len(batches) / env.world_size)
        loss_sum = n_tok = 0.0
        for i in range(per_rank):
            j = i * env.world_size + env.rank
            weight = 1.0 if j < len(batches) else 0.0  # FSDP needs every rank to run the same number of passes
            batch = self._collate([data.get(k, 0) for k in batches[min(j, len(batches) - 1)]])
            with self.autocast():
                loss, _ = self.loss_fn(model, batch)
            n = batch.get("n_loss_tokens", len(batch["targets"]))
            loss_sum += weight * float(loss) * n
            n_tok += weight * n
        loss_sum, n_tok = all_reduce_sum([loss_sum, n_tok], env)
        val_loss = loss_sum / max(n_tok, 1.0)
        result: dict[str, Any] = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
        if env.strategy != "fsdp" and env.is_main:
            if cfg.num_samples:
                result["samples"] = self._samples(cfg.num_samples)
            if cfg.best_metric != "val_loss":
                result.update(self._task_metrics())
        result = broadcast_object(result, env)
        model.train(was_training)
        return result

    def _max_new_tokens(self) -> int:
        return self.cfg.max_new_tokens or (self.cfg.max_target_len + 1 if self.cfg.objective == "seq2seq"
                                           else min(64, self.cfg.seq_len))

    def _decode(self, ids: list[int]) -> str:
        n = len(self.tokenizer)
        parts, run = [], []
        for t in ids:
            if t >= n:  # a sentinel (or an unused id): show it, the tokenizer cannot
                if run:
                    parts.append(self.tokenizer.decode(run))
                    run = []
                parts.append(f"<extra_id_{self.config.vocab_size - 1 - t}>")
            else:
                run.append(t)
        if run:
            parts.append(self.tokenizer.decode(run))
        return "".join(parts)

    def _samples(self, k: int) -> list[dict[str, str]]:
        data, eos, pad = self.val_data, self.tokenizer.eos_token_id, self.config.pad_token_id
        out = []
        for i in range(min(k, len(data))):
            f = data.get(i, 0)
            src = f["source_ids"] or [self._bos_id()]
            ids = torch.tensor([src], device=self.env.device)
            with self.autocast():
                gen = self.raw.generate(ids, max_new_tokens=self._max_new_tokens(), eos_token_id=eos,
                                        bos_token_id=self._bos_id())
            new = new_tokens(self.raw, gen, ids)[0]
            new = [t for t in new.tolist() if t not in (eos, pad)]
            out.append({"source": self._decode(src)[-300:], "target": self._decode(f["target_ids"][:-1]
                        if f["target_ids"] and f["target_ids"][-1] == eos else f["target_ids"]),
                        "prediction": self._decode(new)})
        return out

    def _task_metrics(self) -> dict[str, float]:
        try:
            from mu.eval import evaluate_model
        except ImportError:
            raise MuError(f"--best-metric {self.cfg.best_metric} needs the evaluation module mu.eval") from None
        cfg = self.cfg
        if not self.val_examples:
            raise MuError(f"--best-metric {cfg.best_metric} needs validation Examples (val_examples or --val-data)")
        with self.autocast():
            metrics, _ = evaluate_model(self.raw, self.tokenizer, cfg.task, self.val_examples[:cfg.val_limit],
                                        batch_size=cfg.eval_batch_size or cfg.batch_size,
                                        max_new_tokens=self._max_new_tokens(), max_source_len=cfg.max_source_len,
                                        device=self.env.device, progress=False)
        if cfg.best_metric not in metrics:
            raise MuError(f"--best-metric {cfg.best_metric!r} is not a metric of task {cfg.task!r}; it has "
                          f"{sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))}")
        return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}

