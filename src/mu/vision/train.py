"""VQA training for a `MuVLM`: optional contrastive pretraining of a from-scratch tower, projector-only
alignment, then fine-tuning of the chosen parts.

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
from mu.train.optim import param_groups
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
        groups += [dict(g, lr=part_lr, peak_lr=part_lr, part=part) for g in param_groups(module, weight_decay)]
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
              contrastive_steps: int = 0,
              steps: int = 1000, lr: float = 3e-4,
              trainable: Sequence[str] = PARTS, tower_lr_scale: float = 0.1, batch_size: int = 32,
              weight_decay: float = 0.01, warmup_ratio: float = 0.05, grad_clip: float = 1.0,
              augment: bool = False, answer_balance: float = 0.0, seed: int = 0, log_every: int = 20,
              eval_every: int = 0, save_every: int = 0, max_time_s: Optional[float] = None,
              progress: bool = True, eval_max_new_tokens: int = 8) -> dict[str, Any]:
    """Train `model` (a `MuVLM`, on its current device) on VQA examples or a jsonl file.

    Stage "contrastive" (`contrastive_steps` > 0, for a tower trained from scratch): the tower alone is
    pretrained CLIP-style on the alignment data's (image, answer) pairs (`contrastive_pretrain`).
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
    if batch_size < 1 or min(steps, align_steps, contrastive_steps) < 0 or steps + align_steps == 0:
        raise MuError(f"need batch_size >= 1 and some steps (contrastive_steps={contrastive_steps}, "
                      f"align_steps={align_steps}, steps={steps})")
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

    if contrastive_steps:
        deadline = None if max_time_s is None else t_start + max_time_s
        done = contrastive_pretrain(model, align_data, contrastive_steps, lr=align_lr, augment=augment, seed=seed,
                                    weight_decay=weight_decay, deadline=deadline, log=log, t_start=t_start,
                                    cache=cache)
        step = done["steps"]
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
    summary = {"steps": step, "planned_steps": total + contrastive_steps, "stopped_early": stopped_early,
               "train_seconds": seconds, "final_loss": final_loss, "examples": len(train_data),
               "batch_size": batch_size,
               "stages": [{"name": s.name, "steps": s.steps, "trainable": list(s.trainable), "lr": s.lr,
                           "examples": len(s.data)} for s in stages],
               "contrastive_steps": contrastive_steps,
               "eval": last_eval, "out_dir": str(out) if out is not None else None}
    if out is not None:
        model.save_pretrained(out / "final")
        from mu.atomic import atomic_write_text

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


# ---------------------------------------------------------------------------------------------
# Stage 0: CLIP-style contrastive pretraining of a tower trained from scratch


class _BagOfWords(nn.Module):
    """The contrastive stage's throwaway text side: the mean of learned token embeddings."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.embed = nn.EmbeddingBag(vocab_size, dim, mode="mean")

    def forward(self, ids: list[list[int]]) -> torch.Tensor:
        device = self.embed.weight.device
        flat = torch.tensor([i for row in ids for i in row], device=device)
        offsets = torch.tensor([0] + [len(r) for r in ids[:-1]], device=device).cumsum(0)
        return self.embed(flat, offsets)


def contrastive_pretrain(model, data: Sequence[VQAExample], steps: int, *, lr: float = 1e-3, batch_size: int = 64,
                         dim: int = 128, augment: bool = True, seed: int = 0, weight_decay: float = 0.01,
                         deadline: Optional[float] = None, log: Optional["_MetricsLog"] = None,
                         t_start: Optional[float] = None, cache: Optional[ImageCache] = None) -> dict[str, Any]:
    """Pretrain `model.tower` CLIP-style on (image, target text) pairs, e.g. the alignment captions.

    A tower trained from scratch learns what the text model needs only slowly through the language
    loss (on easy-VQA: colours at once, shapes after thousands of steps). Here its mean-pooled
    features (projected to `dim`) are matched against a bag-of-words embedding of each example's
    target with the symmetric InfoNCE loss of CLIP; examples with the same target text count as
    positives of each other (a caption set repeats). The text side and both projections are thrown
    away afterwards; only the tower keeps what it learnt (the parts' requires_grad flags are restored).
    `deadline` (a `time.perf_counter()` value) ends it early; `cache` lets a caller share its
    preprocessed views (`train_vqa` does, so no picture is preprocessed twice). Returns {"steps" done, "loss" (mean of the
    last up-to-50 steps), "seconds"}.
    """
    import torch.nn.functional as F

    texts = sorted({e.target for e in data})
    if len(texts) < 2:
        raise MuError(f"contrastive pretraining needs at least 2 different target texts, got {texts}")
    device = model.device
    text_ids = {t: model.tokenizer(t, add_special_tokens=False)["input_ids"] or [model.config.pad_token_id]
                for t in texts}
    width = model.tower.hidden_size
    text_side = _BagOfWords(len(model.tokenizer), dim).to(device)
    image_proj = nn.Linear(width, dim).to(device)
    log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07), device=device))
    tower_params = list(model.tower.parameters())
    was_trainable = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in tower_params:
        p.requires_grad_(True)
    heads = [*text_side.parameters(), *image_proj.parameters()]
    decay, no_decay = param_groups(nn.ModuleList([model.tower, text_side, image_proj]), weight_decay)
    no_decay["params"].append(log_scale)
    optimizer = torch.optim.AdamW([decay, no_decay], lr=lr, betas=(0.9, 0.95))
    cache = cache or ImageCache(model.processor)
    background = (torch.from_numpy(model.processor.mean), torch.from_numpy(model.processor.std))
    gen = torch.Generator().manual_seed(seed)
    model.tower.train()
    warmup = max(1, steps // 20)
    t0 = time.perf_counter()
    loss_sum, n, done, last = 0.0, 0, 0, float("nan")
    for step in range(steps):
        if deadline is not None and time.perf_counter() > deadline:
            break
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, warmup, (step - warmup) / max(1, steps - warmup), lr)
        batch = [data[i] for i in torch.randint(len(data), (batch_size,), generator=gen).tolist()]
        views = [cache(e) for e in batch]
        if augment:
            views = [augment_views(v, gen, background=background) for v in views]
        pixels = torch.stack([v[0] for v in views]).to(device=device, dtype=model.dtype)  # the base view
        img = F.normalize(image_proj(model.tower(pixels).mean(1)), dim=-1)  # (B, dim)
        txt = F.normalize(text_side([text_ids[e.target] for e in batch]), dim=-1)  # (B, dim)
        logits = log_scale.clamp(max=math.log(100)).exp() * img @ txt.T  # (B, B)
        same = torch.tensor([[a.target == b.target for b in batch] for a in batch], device=device)
        targets = same.float() / same.sum(-1, keepdim=True)  # symmetric: same is symmetric
        loss = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tower_params + heads, 1.0)
        optimizer.step()
        done += 1
        loss_sum, n = loss_sum + loss.item(), n + 1
        if (step + 1) % 50 == 0:
            last = loss_sum / n
            if log is not None:
                log.write({"step": step + 1, "stage": "contrastive", "loss": last,
                           "elapsed_s": round(time.perf_counter() - (t_start or t0), 2)})
            loss_sum, n = 0.0, 0
    for p, on in was_trainable.items():
        p.requires_grad_(on)
    return {"steps": done, "loss": loss_sum / n if n else last, "seconds": time.perf_counter() - t0}
