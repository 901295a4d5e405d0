"""VQA training for a `MuVLM`: projector-only alignment, then fine-tuning of the chosen parts.

    summary = train_vqa(vlm, "vqa.jsonl", "runs/vqa", align_steps=200, steps=2000, lr=1e-3)

Each stage has its own AdamW (weight decay on matrices only) with linear warmup + cosine decay,
gradient clipping and a tqdm bar (loss, lr, ETA). The paper's recipe: stage 1 trains the projector
alone (tower and text model frozen), stage 2 trains everything with the tower at a lower learning
rate (`tower_lr_scale`). Written to `out_dir`: `metrics.jsonl` (one JSON object per log / eval),
`checkpoint/` every `save_every` steps and `final/` at the end (atomic directory swaps), `summary.json`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from mu.errors import MuError
from mu.vision.data import ImageCache, VQAExample, augment_views, collate, load_vqa_jsonl

PARTS = ("tower", "projector", "lm")


@dataclass
class Stage:
    name: str  # "align" or "finetune"
    steps: int  # optimiser steps
    trainable: tuple[str, ...]  # parts that get gradients, from PARTS
    lr: float  # peak learning rate (the tower's is lr * tower_lr_scale)
    data: Sequence[VQAExample]  # what it trains on


def lr_at(step: int, warmup: int, progress: float, peak: float, min_ratio: float = 0.1) -> float:
    """Linear warmup over `warmup` steps to `peak`, then cosine decay to `min_ratio * peak` as
    `progress` (the fraction of the stage done, in steps or in time) goes from warmup's end to 1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress)))))


def _param_groups(model, trainable: Sequence[str], lr: float, tower_lr_scale: float, weight_decay: float):
    groups = []
    for part in PARTS:
        module: nn.Module = getattr(model, part)
        on = part in trainable
        for p in module.parameters():
            p.requires_grad_(on)
        if not on:
            continue
        part_lr = lr * (tower_lr_scale if part == "tower" else 1.0)
        decay = [p for p in module.parameters() if p.dim() >= 2]  # parameters() yields tied weights once
        no_decay = [p for p in module.parameters() if p.dim() < 2]
        groups += [dict(params=decay, weight_decay=weight_decay, lr=part_lr, peak_lr=part_lr, part=part),
                   dict(params=no_decay, weight_decay=0.0, lr=part_lr, peak_lr=part_lr, part=part)]
    return [g for g in groups if g["params"]]


class _MetricsLog:
    def __init__(self, out_dir: Optional[Path]):
        self.file = None
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.file = (out_dir / "metrics.jsonl").open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def train_vqa(model, train_data: Sequence[VQAExample] | str | os.PathLike,
              out_dir: Optional[str | os.PathLike] = None, *,
              eval_data: Sequence[VQAExample] | str | os.PathLike | None = None,
              align_data: Sequence[VQAExample] | str | os.PathLike | None = None,
              align_steps: int = 0, align_lr: float = 1e-3, align_trainable: Sequence[str] = ("projector",),
              steps: int = 1000, lr: float = 3e-4,
              trainable: Sequence[str] = PARTS, tower_lr_scale: float = 0.1, batch_size: int = 32,
              weight_decay: float = 0.01, warmup_ratio: float = 0.05, grad_clip: float = 1.0,
              augment: bool = False, answer_balance: float = 0.0, seed: int = 0, log_every: int = 20,
              eval_every: int = 0, save_every: int = 0, max_time_s: Optional[float] = None,
              progress: bool = True, eval_max_new_tokens: int = 8) -> dict[str, Any]:
    """Train `model` (a `MuVLM`, on its current device) on VQA examples or a jsonl file.

    Stage "align" (`align_steps` > 0): the `align_trainable` parts (default: the projector alone, as the
    paper's stage 1 with a pretrained tower and text model; a tower or text model trained from scratch
    needs all three) learn at `align_lr` on `align_data` (default: the training data; LLaVA uses
    image-caption pairs here). Stage "finetune" (`steps` > 0): the parts in `trainable` (from "tower",
    "projector", "lm") learn at `lr`, the tower at `lr * tower_lr_scale`.
    `augment` adds random flips, rescales, shifts and background colours (label-preserving for colour,
    shape and count questions about shapes on plain backgrounds; not for left/right questions). `answer_balance` b > 0 samples an example with
    probability proportional to (count of its target answer)^-b (0.5: square-root balancing, so yes/no
    questions stop drowning the rest); 0 walks through shuffled epochs. `max_time_s` ends training
    early (the summary says so); the last stage's cosine then runs on time, reaching its minimum at
    the deadline, so a time-capped run still ends with a decayed learning rate. `seed` fixes the
    example order and the augmentation.
    Returns a summary: steps, seconds, final loss, stages, last eval, out_dir.
    """
    if isinstance(train_data, (str, os.PathLike)):
        train_data = load_vqa_jsonl(train_data)
    if isinstance(eval_data, (str, os.PathLike)):
        eval_data = load_vqa_jsonl(eval_data)
    if isinstance(align_data, (str, os.PathLike)):
        align_data = load_vqa_jsonl(align_data)
    train_data = list(train_data)
    align_data = list(align_data) if align_data is not None else train_data
    if not train_data or not align_data:
        raise MuError("train_vqa: no training examples")
    for name, parts in (("trainable", trainable), ("align_trainable", align_trainable)):
        if not parts or set(parts) - set(PARTS):
            raise MuError(f"{name} parts {list(parts)} invalid; choose from {list(PARTS)}")
    if batch_size < 1 or steps < 0 or align_steps < 0 or steps + align_steps == 0:
        raise MuError(f"need batch_size >= 1 and some steps (align_steps={align_steps}, steps={steps})")
    if model.tokenizer is None:
        raise MuError("train_vqa: the model needs a tokenizer (build it with `build_vlm(..., tokenizer=...)`)")
    stages = [s for s in (Stage("align", align_steps, tuple(align_trainable), align_lr, align_data),
                          Stage("finetune", steps, tuple(trainable), lr, train_data)) if s.steps > 0]
    out = Path(out_dir) if out_dir is not None else None
    log = _MetricsLog(out)
    cache = ImageCache(model.processor)
    background = (torch.from_numpy(model.processor.mean), torch.from_numpy(model.processor.std))
    gen = torch.Generator().manual_seed(seed)
    device = model.device
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if (
        device.type == "cuda" and torch.cuda.is_bf16_supported()) else nullcontext()
    total = sum(s.steps for s in stages)
    step, t_start, final_loss, last_eval, stopped_early = 0, time.perf_counter(), float("nan"), None, False

    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="train vqa", unit="step", disable=not progress, dynamic_ncols=True)
    try:
        for stage in stages:
            groups = _param_groups(model, stage.trainable, stage.lr, tower_lr_scale, weight_decay)
            params = [p for g in groups for p in g["params"]]
            fused = device.type == "cuda"
            optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95), fused=fused)
            warmup = max(1, round(warmup_ratio * stage.steps))
            model.train()
            for part in PARTS:  # frozen parts run without dropout
                if part not in stage.trainable:
                    getattr(model, part).eval()
            running, n_running = 0.0, 0
            data, order, weights = stage.data, [], None
            if answer_balance:
                counts = Counter(e.target for e in data)
                weights = torch.tensor([counts[e.target] ** -answer_balance for e in data], dtype=torch.double)
            stage_start = time.perf_counter()
            for s in range(stage.steps):
                progress = (s - warmup) / max(1, stage.steps - warmup)
                if max_time_s is not None:
                    left = max_time_s - (stage_start - t_start)
                    if time.perf_counter() - t_start > max_time_s:
                        stopped_early = True
                        break
                    if s >= warmup and stage is stages[-1]:  # decay by the deadline if it comes first
                        progress = max(progress, (time.perf_counter() - stage_start) / left)
                for g in optimizer.param_groups:
                    g["lr"] = lr_at(s, warmup, progress, g["peak_lr"])
                if len(order) < batch_size:
                    order += (torch.randperm(len(data), generator=gen) if weights is None else
                              torch.multinomial(weights, len(data), replacement=True, generator=gen)).tolist()
                batch = [data[i] for i in order[:batch_size]]
                del order[:batch_size]
                views = [cache(e) for e in batch]
                if augment:
                    views = [augment_views(v, gen, background=background) for v in views]
                inputs = collate(batch, views, model)
                with amp:
                    loss = model(**inputs).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip else None
                optimizer.step()
                step += 1
                running += loss.item()
                n_running += 1
                bar.update(1)
                if step % log_every == 0 or s == stage.steps - 1:
                    final_loss = running / n_running
                    lr_now = max(g["lr"] for g in optimizer.param_groups)  # the tower's may be lower
                    bar.set_postfix(stage=stage.name, loss=f"{final_loss:.4f}", lr=f"{lr_now:.2e}")
                    log.write({"step": step, "stage": stage.name, "loss": final_loss, "lr": lr_now,
                               "grad_norm": None if grad_norm is None else float(grad_norm),
                               "elapsed_s": round(time.perf_counter() - t_start, 2)})
                    running, n_running = 0.0, 0
                if eval_data and eval_every and step % eval_every == 0:
                    last_eval = _evaluate(model, eval_data, eval_max_new_tokens, step, stage, log, t_start)
                    model.train()
                if out is not None and save_every and step % save_every == 0:
                    model.save_pretrained(out / "checkpoint")
            if stopped_early:
                break
    finally:
        bar.close()
    seconds = time.perf_counter() - t_start
    model.eval()
    if eval_data:
        last_eval = _evaluate(model, eval_data, eval_max_new_tokens, step, stages[-1], log, t_start)
    summary = {"steps": step, "planned_steps": total, "stopped_early": stopped_early, "train_seconds": seconds,
               "final_loss": final_loss, "examples": len(train_data), "batch_size": batch_size,
               "stages": [{"name": s.name, "steps": s.steps, "trainable": list(s.trainable), "lr": s.lr,
                           "examples": len(s.data)} for s in stages],
               "eval": last_eval, "out_dir": str(out) if out is not None else None}
    if out is not None:
        model.save_pretrained(out / "final")
        from mu.train.checkpoint import atomic_write_text

        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    log.close()
    return summary


def _evaluate(model, data, max_new_tokens: int, step: int, stage: Stage, log: _MetricsLog, t_start: float):
    from mu.vision.evaluate import evaluate_vqa

    result = evaluate_vqa(model, data, batch_size=64, max_new_tokens=max_new_tokens)
    record = {"step": step, "stage": stage.name, "eval_accuracy": result["accuracy"], "eval_n": result["n"],
              "elapsed_s": round(time.perf_counter() - t_start, 2)}
    log.write(record)
    return {k: v for k, v in result.items() if k != "predictions"}
