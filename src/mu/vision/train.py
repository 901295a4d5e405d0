"""VQA training for a `MuVLM`: optional contrastive pretraining of a from-scratch tower, alignment, then
fine-tuning of the chosen parts; on the text trainer's parts (mu.train.step, mu.train.rundir).

    summary = train_vqa(vlm, "vqa.jsonl", "runs/vqa", align_steps=200, steps=2000, lr=1e-3)

Each stage has its own AdamW (weight decay on matrices only) with linear warmup + cosine decay to 10%
(`mu.train.optim.LRSchedule`), gradient clipping and a tqdm bar. One step is `mu.train.step.train_step`:
NaN/Inf stops the run naming the step and the last good checkpoint; under torchrun the model is
wrapped in DDP and each process takes its share of every batch. Written to `out_dir` (a
`mu.train.rundir.RunDir`): `train_config.json`, `metrics.jsonl`, `checkpoints/step_N` every `save_every`
steps and at the end (atomic; the optimizer, the data order and the RNG states included), `final/` and
`summary.json`. Calling it again with the same `out_dir` resumes from the newest readable checkpoint
(after a kill, a SIGTERM/SIGINT, or a finished run); SIGTERM/SIGINT write a checkpoint first.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from mu.errors import MuError
from mu.train import checkpoint as ckpt
from mu.train.distributed import DistEnv, wrap_model
from mu.train.optim import LRSchedule, param_groups
from mu.train.rundir import MetricsLog, RunDir, StopSignals, log
from mu.train.step import TrainingDiverged, any_rank, stage_autocast, train_step
from mu.vision.data import ImageCache, VQAExample, augment_views, collate, load_vqa_jsonl

PARTS = ("tower", "projector", "lm")
STATE_KIND = "mu-vqa"
RESUMABLE = frozenset({"save_every", "log_every", "eval_every", "max_time_s", "progress", "keep_checkpoints",
                       "eval_examples"})


@dataclass
class Stage:
    name: str  # "contrastive", "align" or "finetune"
    steps: int  # optimiser steps
    trainable: tuple[str, ...]  # parts that get gradients, from PARTS (contrastive: the tower)
    lr: float  # peak learning rate (the tower's is lr * tower_lr_scale in "finetune")
    data: Sequence[VQAExample]  # what it trains on
    batch_size: int = 32


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


class _Contrastive(nn.Module):
    """Stage 0's trained pieces: the VLM's tower, a bag-of-words text side, an image projection and CLIP's
    log temperature. forward -> the symmetric InfoNCE loss, examples with the same target text counting as
    positives of each other (a caption set repeats)."""

    def __init__(self, model, dim: int):
        super().__init__()
        self.tower = model.tower
        self.text_side = _BagOfWords(len(model.tokenizer), dim).to(model.device)
        self.image_proj = nn.Linear(model.tower.hidden_size, dim).to(model.device)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07), device=model.device))

    def forward(self, pixels: torch.Tensor, text_ids: list[list[int]], same: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        img = F.normalize(self.image_proj(self.tower(pixels).mean(1)), dim=-1)  # (B, dim)
        txt = F.normalize(self.text_side(text_ids), dim=-1)  # (B, dim)
        logits = self.log_scale.clamp(max=math.log(100)).exp() * img @ txt.T  # (B, B)
        targets = same.float() / same.sum(-1, keepdim=True)  # symmetric: same is symmetric
        return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))

    def heads_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("tower.")}


class _Loop:
    """One `train_vqa` call: the stages, run one after another from a resume point."""

    def __init__(self, model, env: DistEnv, run: Optional[RunDir], *, seed: int, augment: bool,
                 answer_balance: float, weight_decay: float, warmup_ratio: float, grad_clip: float,
                 tower_lr_scale: float, log_every: int, save_every: int, eval_every: int, eval_data,
                 eval_max_new_tokens: int, max_time_s: Optional[float], progress: bool, contrastive_dim: int):
        self.model, self.env, self.run = model, env, run
        self.seed, self.augment, self.answer_balance = seed, augment, answer_balance
        self.weight_decay, self.warmup_ratio, self.grad_clip = weight_decay, warmup_ratio, grad_clip
        self.tower_lr_scale, self.log_every, self.save_every = tower_lr_scale, log_every, save_every
        self.eval_every, self.eval_data, self.eval_max_new_tokens = eval_every, eval_data, eval_max_new_tokens
        self.max_time_s, self.progress, self.contrastive_dim = max_time_s, progress, contrastive_dim
        self.cache = ImageCache(model.processor)
        self.background = (torch.from_numpy(model.processor.mean), torch.from_numpy(model.processor.std))
        self.gen = torch.Generator().manual_seed(seed)  # the align / finetune example order and augmentation
        self.cgen = torch.Generator().manual_seed(seed)  # the contrastive stage's
        device = model.device
        self.autocast = stage_autocast(device, torch.bfloat16 if (
            device.type == "cuda" and torch.cuda.is_bf16_supported()) else None)
        self.step, self.elapsed, self.final_loss, self.last_eval, self.stopped_early = 0, 0.0, float("nan"), None, False
        self.metrics = MetricsLog(None)

    # -- batches --------------------------------------------------------------------------------

    def _views(self, batch: Sequence[VQAExample], gen: torch.Generator) -> list[torch.Tensor]:
        views = [self.cache(e) for e in batch]
        if self.augment:  # every process augments the whole batch, so the generators stay in step
            views = [augment_views(v, gen, background=self.background) for v in views]
        return views

    def _mine(self, items: list) -> list:
        return items[self.env.rank::self.env.world_size]

    def _contrastive_batch(self, stage: Stage, text_ids: dict[str, list[int]]) -> dict:
        data = stage.data
        batch = [data[i] for i in torch.randint(len(data), (stage.batch_size,), generator=self.cgen).tolist()]
        views = self._views(batch, self.cgen)
        batch, views = self._mine(batch), self._mine(views)
        device = self.model.device
        pixels = torch.stack([v[0] for v in views]).to(device=device, dtype=self.model.dtype)  # the base view
        same = torch.tensor([[a.target == b.target for b in batch] for a in batch], device=device)
        return {"pixels": pixels, "text_ids": [text_ids[e.target] for e in batch], "same": same,
                "n_loss_tokens": len(batch)}

    def _vqa_batch(self, stage: Stage, order: list[int], weights) -> dict:
        data, bs = stage.data, stage.batch_size
        if len(order) < bs:
            order += (torch.randperm(len(data), generator=self.gen) if weights is None else
                      torch.multinomial(weights, len(data), replacement=True, generator=self.gen)).tolist()
        batch = [data[i] for i in order[:bs]]
        del order[:bs]
        views = self._views(batch, self.gen)
        batch, views = self._mine(batch), self._mine(views)
        inputs = collate(batch, views, self.model)
        # answer tokens scored (pad is ignored by the loss): under DDP the gradient is the global token mean
        return {"inputs": inputs, "n_loss_tokens": int((inputs["targets"] != self.model.config.pad_token_id).sum())}

    # -- checkpoints ----------------------------------------------------------------------------

    def _state(self, stage: Stage, stage_step: int, optimizer, order: list[int], heads) -> dict[str, Any]:
        return {"kind": STATE_KIND, "format": 1, "step": self.step, "stage": stage.name, "stage_step": stage_step,
                "optimizer": optimizer.state_dict(), "gen": self.gen.get_state(), "cgen": self.cgen.get_state(),
                "order": torch.tensor(order, dtype=torch.long), "heads": heads.heads_state() if heads else {},
                "elapsed_s": self.elapsed, "final_loss": self.final_loss, "rng": ckpt.rng_state(self.model.device)}

    def save(self, stage: Stage, stage_step: int, optimizer, order: list[int], heads=None) -> Optional[Path]:
        if self.run is None:
            return None
        return self.run.save_checkpoint(self.step, self.model.save_pretrained,
                                        self._state(stage, stage_step, optimizer, order, heads))

    def _diverged(self, stage: Stage):
        def stop(what: str, value: float) -> None:
            last = self.run.latest() if self.run is not None else None
            where = (f"the last good checkpoint is {last} (re-run the same command to resume from it, e.g. with a "
                     f"lower learning rate)" if last else "no checkpoint was saved yet")
            raise TrainingDiverged(f"the training {what} is {value} at step {self.step + 1} (stage {stage.name}); "
                                   f"stopped before the optimizer step. {where}")

        return stop

    # -- the stages -----------------------------------------------------------------------------

    def run_stage(self, stage: Stage, stop: StopSignals, bar, deadline_stage: bool,
                  saved: Optional[dict] = None) -> None:
        model, env = self.model, self.env
        heads = None
        if stage.name == "contrastive":
            texts = sorted({e.target for e in stage.data})
            if len(texts) < 2:
                raise MuError(f"contrastive pretraining needs at least 2 different target texts, got {texts}")
            text_ids = {t: model.tokenizer(t, add_special_tokens=False)["input_ids"] or [model.config.pad_token_id]
                        for t in texts}
            heads = _Contrastive(model, self.contrastive_dim)
            if saved and saved.get("heads"):
                heads.load_state_dict({**heads.state_dict(), **saved["heads"]})
            for p in model.parameters():
                p.requires_grad_(False)
            for p in heads.parameters():
                p.requires_grad_(True)
            decay, no_decay = param_groups(nn.ModuleList([heads.tower, heads.text_side, heads.image_proj]),
                                           self.weight_decay)
            no_decay["params"].append(heads.log_scale)
            groups = [dict(g, lr=stage.lr, peak_lr=stage.lr) for g in (decay, no_decay)]
            warmup = max(1, stage.steps // 20)
            net = heads
            model.tower.train()

            def loss_fn(m, b):
                return m(b["pixels"], b["text_ids"], b["same"]), {}

            def next_batch():
                return self._contrastive_batch(stage, text_ids)
        else:
            groups = _param_groups(model, stage.trainable, stage.lr, self.tower_lr_scale, self.weight_decay)
            warmup = max(1, round(self.warmup_ratio * stage.steps))
            net = model
            model.train()
            for part in PARTS:  # frozen parts run without dropout
                if part not in stage.trainable:
                    getattr(model, part).eval()
            weights = None
            if self.answer_balance:
                counts = Counter(e.target for e in stage.data)
                weights = torch.tensor([counts[e.target] ** -self.answer_balance for e in stage.data],
                                       dtype=torch.double)

            def loss_fn(m, b):
                return m(**b["inputs"]).loss, {}

            def next_batch():
                return self._vqa_batch(stage, order, weights)
        optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95), fused=model.device.type == "cuda" or None)
        order: list[int] = []
        start = 0
        if saved is not None:
            optimizer.load_state_dict(saved["optimizer"])
            order = saved["order"].tolist()
            start = saved["stage_step"]
        trained = wrap_model(net, env)
        schedule = LRSchedule(1.0, stage.steps, warmup, "cosine", 0.1)
        on_diverged = self._diverged(stage)
        running, n_running = 0.0, 0
        stage_t0, stage_elapsed0 = time.perf_counter(), self.elapsed
        for s in range(start, stage.steps):
            t0 = time.perf_counter()
            min_progress = 0.0
            if self.max_time_s is not None:
                if self.elapsed > self.max_time_s:
                    self.stopped_early = True
                    self.save(stage, s, optimizer, order, heads)
                    break
                if deadline_stage and s >= warmup:  # decay by the deadline if it comes first
                    left = max(1e-9, self.max_time_s - stage_elapsed0)
                    min_progress = (time.perf_counter() - stage_t0) / left
            factor = schedule(s, min_progress)
            for g in optimizer.param_groups:
                g["lr"] = g["peak_lr"] * factor
            result = train_step(trained, optimizer, [next_batch()], loss_fn, env, grad_clip=self.grad_clip,
                                autocast=self.autocast, on_diverged=on_diverged)
            self.step += 1
            self.elapsed += time.perf_counter() - t0
            running, n_running = running + result.loss, n_running + 1
            bar.update(1)
            every = 50 if stage.name == "contrastive" else self.log_every
            if self.step % every == 0 or s == stage.steps - 1:
                self.final_loss = running / n_running
                lr_now = max(g["lr"] for g in optimizer.param_groups)  # the tower's may be lower
                bar.set_postfix(stage=stage.name, loss=f"{self.final_loss:.4f}", lr=f"{lr_now:.2e}")
                self.metrics.write({"event": "train", "step": self.step, "stage": stage.name,
                                    "loss": self.final_loss, "lr": lr_now, "grad_norm": result.grad_norm,
                                    "elapsed_s": round(self.elapsed, 2)})
                running, n_running = 0.0, 0
            if (self.eval_data and self.eval_every and self.step % self.eval_every == 0 and stage.name != "contrastive"
                    and env.is_main):
                self.last_eval = self.evaluate(stage.name)
                model.train()
                for part in PARTS:
                    if part not in stage.trainable:
                        getattr(model, part).eval()
            interrupted = any_rank(stop.requested, env)
            end = deadline_stage and s == stage.steps - 1  # the run's last step
            if interrupted or end or (self.save_every and self.step % self.save_every == 0):
                path = self.save(stage, s + 1, optimizer, order, heads)
                if interrupted:
                    self.metrics.write({"event": "interrupted", "step": self.step, "checkpoint": str(path)})
                    raise stop.interrupted(self.step, path)
        if stage.name == "contrastive":
            model.tower.train()

    def evaluate(self, stage_name: str) -> dict[str, Any]:
        from mu.vision.evaluate import evaluate_vqa

        result = evaluate_vqa(self.model, self.eval_data, batch_size=64, max_new_tokens=self.eval_max_new_tokens)
        self.metrics.write({"event": "eval", "step": self.step, "stage": stage_name,
                            "eval_accuracy": result["accuracy"], "eval_n": result["n"],
                            "elapsed_s": round(self.elapsed, 2)})
        return {k: v for k, v in result.items() if k != "predictions"}


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
              progress: bool = True, eval_max_new_tokens: int = 8, resume: bool = True,
              keep_checkpoints: int = 2, env: Optional[DistEnv] = None,
              run_config: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Train `model` (a `MuVLM`, on its current device) on VQA examples or a jsonl file.

    Stage "contrastive" (`contrastive_steps` > 0, for a tower trained from scratch): the tower alone is
    pretrained CLIP-style on the alignment data's (image, answer) pairs (batches of 64).
    Stage "align" (`align_steps` > 0): the `align_trainable` parts (default: the projector alone, as the
    paper's stage 1 with a pretrained tower and text model; a tower or text model trained from scratch
    needs all three) learn at `align_lr` on `align_data` (default: the training data; LLaVA uses
    image-caption pairs here). Stage "finetune" (`steps` > 0): the parts in `trainable` (from "tower",
    "projector", "lm") learn at `lr`, the tower at `lr * tower_lr_scale`.
    `augment` adds random flips, rescales, shifts and background colours (label-preserving for colour,
    shape and count questions about shapes on plain backgrounds; not for left/right questions).
    `answer_balance` b > 0 samples an example with probability proportional to (count of its target
    answer)^-b; 0 walks through shuffled epochs. `max_time_s` ends training early (the summary says so);
    the last stage's cosine then runs on time, reaching its minimum at the deadline. `seed` fixes the
    example order and the augmentation.
    With `out_dir`: checkpoints every `save_every` steps and at the end; `resume` (default) continues from
    the newest readable checkpoint there (a run whose settings differ is refused); SIGTERM/SIGINT write a
    checkpoint and raise `mu.train.rundir.TrainingInterrupted`. `env` (from `mu.train.distributed.
    init_distributed`) runs it under torchrun. `run_config`: more settings to record in train_config.json.
    Returns a summary: steps, seconds, final loss, stages, last eval, out_dir, resumed_from.
    """
    env = env or DistEnv(device=model.device)
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
    stages = [s for s in (Stage("contrastive", contrastive_steps, ("tower",), align_lr, align_data, 64),
                          Stage("align", align_steps, tuple(align_trainable), align_lr, align_data, batch_size),
                          Stage("finetune", steps, tuple(trainable), lr, train_data, batch_size)) if s.steps > 0]
    config = {"kind": STATE_KIND, **(run_config or {}), "train_examples": len(train_data),
              "align_examples": len(align_data), "eval_examples": len(eval_data) if eval_data else 0,
              "stages": [[s.name, s.steps, list(s.trainable), s.lr, s.batch_size] for s in stages],
              "tower_lr_scale": tower_lr_scale, "weight_decay": weight_decay, "warmup_ratio": warmup_ratio,
              "grad_clip": grad_clip, "augment": augment, "answer_balance": answer_balance, "seed": seed,
              "save_every": save_every, "log_every": log_every, "eval_every": eval_every, "max_time_s": max_time_s,
              "keep_checkpoints": keep_checkpoints}
    run = RunDir(out_dir, env, keep=keep_checkpoints) if out_dir is not None else None
    point = None
    if run is not None:
        if not resume and run.has_run():
            raise MuError(f"{run.path} already holds a run (checkpoints/); use another out_dir, remove it, or "
                          f"resume it")
        run.check_same_run(config, RESUMABLE)
        point = run.resume_point() if resume else None
        run.write_config(config)
    loop = _Loop(model, env, run, seed=seed, augment=augment, answer_balance=answer_balance,
                 weight_decay=weight_decay, warmup_ratio=warmup_ratio, grad_clip=grad_clip,
                 tower_lr_scale=tower_lr_scale, log_every=log_every, save_every=save_every, eval_every=eval_every,
                 eval_data=eval_data, eval_max_new_tokens=eval_max_new_tokens, max_time_s=max_time_s,
                 progress=progress, contrastive_dim=128)
    saved, resume_stage = None, None
    if point is not None:
        saved = point.state
        if saved.get("kind") != STATE_KIND:
            raise MuError(f"{point.path}: not a VQA training checkpoint")
        try:
            model.load_state_dict(point.model_state, strict=True)
        except RuntimeError as e:
            raise MuError(f"{point.path}: its weights do not fit this model ({str(e)[:300]})") from None
        model.lm.tie_weights()
        loop.gen.set_state(saved["gen"])
        loop.cgen.set_state(saved["cgen"])
        ckpt.set_rng_state(saved["rng"], model.device)
        loop.step, loop.elapsed, loop.final_loss = saved["step"], saved["elapsed_s"], saved["final_loss"]
        resume_stage = saved["stage"]
        log(env, f"resuming from {point.path} (step {loop.step}, stage {resume_stage}, "
                 f"{saved['stage_step']} of its steps done)")
    loop.metrics = run.metrics(loop.step if point is not None else None) if run is not None else MetricsLog(None)
    total = sum(s.steps for s in stages)
    was_trainable = {p: p.requires_grad for p in model.parameters()}
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=loop.step, desc="train vqa", unit="step",
               disable=not (progress and env.is_main), dynamic_ncols=True)
    try:
        with StopSignals() as stop:
            skipping = resume_stage is not None
            for stage in stages:
                if skipping and stage.name != resume_stage:
                    continue  # finished before the checkpoint
                state = saved if skipping else None
                skipping = False
                loop.run_stage(stage, stop, bar, deadline_stage=stage is stages[-1], saved=state)
                if loop.stopped_early:
                    break
    except BaseException:
        if run is not None:
            run.discard_if_empty()
        raise
    finally:
        bar.close()
        for p, on in was_trainable.items():
            p.requires_grad_(on)
    model.eval()
    if eval_data and env.is_main:
        loop.last_eval = loop.evaluate(stages[-1].name)
    summary = {"steps": loop.step, "planned_steps": total, "stopped_early": loop.stopped_early,
               "train_seconds": loop.elapsed, "final_loss": loop.final_loss, "examples": len(train_data),
               "batch_size": batch_size,
               "stages": [{"name": s.name, "steps": s.steps, "trainable": list(s.trainable), "lr": s.lr,
                           "examples": len(s.data)} for s in stages if s.name != "contrastive"],
               "contrastive_steps": contrastive_steps, "eval": loop.last_eval,
               "resumed_from": point.step if point is not None else None,
               "out_dir": str(run.path) if run is not None else None}
    if run is not None:
        if env.is_main:
            model.save_pretrained(run.path / "final")
            run.write_json("summary.json", summary)
        loop.metrics.write({"event": "end", "step": loop.step, "final_loss": loop.final_loss,
                            "train_seconds": loop.elapsed})
    return summary


def contrastive_pretrain(model, data: Sequence[VQAExample], steps: int, *, lr: float = 1e-3, batch_size: int = 64,
                         dim: int = 128, augment: bool = True, seed: int = 0, weight_decay: float = 0.01,
                         deadline: Optional[float] = None, log: Optional[MetricsLog] = None,
                         t_start: Optional[float] = None, cache: Optional[ImageCache] = None) -> dict[str, Any]:
    """Pretrain `model.tower` CLIP-style on (image, target text) pairs, e.g. the alignment captions (stage 0 of
    `train_vqa`, alone and without a run directory).

    A tower trained from scratch learns what the text model needs only slowly through the language loss
    (on easy-VQA: colours at once, shapes after thousands of steps). Here its mean-pooled features
    (projected to `dim`) are matched against a bag-of-words embedding of each example's target with the
    symmetric InfoNCE loss of CLIP. The text side and both projections are thrown away afterwards; only the
    tower keeps what it learnt (the parts' requires_grad flags are restored). `deadline` (a
    `time.perf_counter()` value) ends it early. Returns {"steps" done, "loss" (mean of the last up-to-50
    steps), "seconds"}.
    """
    if steps < 1:
        raise MuError(f"contrastive pretraining needs steps >= 1, got {steps}")
    loop = _Loop(model, DistEnv(device=model.device), None, seed=seed, augment=augment, answer_balance=0.0,
                 weight_decay=weight_decay, warmup_ratio=0.05, grad_clip=1.0, tower_lr_scale=1.0, log_every=50,
                 save_every=0, eval_every=0, eval_data=None, eval_max_new_tokens=8,
                 max_time_s=None if deadline is None else deadline - time.perf_counter(), progress=False,
                 contrastive_dim=dim)
    if cache is not None:
        loop.cache = cache
    loop.metrics = log or MetricsLog(None)
    was_trainable = {p: p.requires_grad for p in model.parameters()}
    t0 = time.perf_counter()

    class _NoBar:
        def update(self, n): pass

        def set_postfix(self, **kw): pass

    try:
        with StopSignals(signals=()) as stop:
            loop.run_stage(Stage("contrastive", steps, ("tower",), lr, list(data), batch_size), stop, _NoBar(),
                           deadline_stage=False)
    finally:
        for p, on in was_trainable.items():
            p.requires_grad_(on)
    return {"steps": loop.step, "loss": loop.final_loss, "seconds": time.perf_counter() - t0}
