"""`finetune_teacher(FinetuneTeacherConfig)`: LoRA fine-tuning of a causal-LM teacher on a task (`peft`).

    from mu.distill import FinetuneTeacherConfig, finetune_teacher
    finetune_teacher(FinetuneTeacherConfig(model="phi-3.5-mini", task="squad_v2", train_data="train.jsonl",
                                           out="runs/teacher-lora", max_steps=500, merge=True))

The teacher learns the format distillation will show it: `source + target + EOS`, loss on the target
tokens only (the decoder-only collation of `mu.data.batching.Collator`). Defaults are the paper's
adapter: r 16, alpha 32, dropout 0.05 on the attention and MLP projections, named per architecture
(`mu.distill.teacher.LORA_TARGETS`: Phi-3 qkv_proj/o_proj/gate_up_proj/down_proj, Llama-like
q/k/v/o/gate/up/down_proj, mu's q/k/v/out_linear + fc1/fc2, ...).

Output: `OUT/adapter/` (adapter_config.json + adapter_model.safetensors + tokenizer; its recorded base is the
model directory, so `mu distill --teacher OUT/adapter` works), `OUT/merged/` with --merge (a full model:
Hugging Face format, or mu's for a mu decoder-only base), `OUT/metrics.jsonl` and `OUT/result.json`.

The loop runs on the text trainer's parts: `mu.train.step.train_step` (token-weighted gradient
accumulation, clipping, NaN/Inf stop naming the step and the last checkpoint; DDP under torchrun, each
process taking its share of every step's micro-batches) and `mu.train.rundir.RunDir` (`OUT/checkpoints/
step_N` every `save_every` steps with the adapter, optimizer, data position and RNG states, written
atomically; re-running the same command resumes from the newest readable one; SIGTERM/SIGINT write a
checkpoint first). AdamW on the adapter weights, warmup + cosine, periodic validation loss, progress bar.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from mu.atomic import atomic_directory
from mu.errors import MuError


ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's file name: what a checkpoint's model/ holds


@dataclass
class FinetuneTeacherConfig:
    model: str  # Hugging Face causal LM directory or a mu decoder-only checkpoint
    out: str  # output directory: adapter/, merged/, metrics.jsonl, result.json
    train_data: str = ""  # task file (see mu.data.tasks.load_examples)
    task: str = "seq2seq"  # task format: squad_v2, xsum, code2text, seq2seq
    val_data: Optional[str] = None
    tokenizer: Optional[str] = None  # tokenizer directory (default: the model directory's)
    lora_r: int = 16  # LoRA rank (the paper's)
    lora_alpha: int = 32  # LoRA scale numerator (the paper's)
    lora_dropout: float = 0.05  # dropout on the LoRA input (the paper's)
    target_modules: Optional[list[str]] = None  # default: attention + MLP projections of the architecture
    merge: bool = False  # also write OUT/merged/ (the adapter merged into the base weights)
    max_source_len: int = 512
    max_target_len: int = 128
    train_limit: Optional[int] = None
    val_limit: int = 256
    max_steps: Optional[int] = None  # optimizer steps (default: `epochs` passes)
    epochs: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup: float = 0.05  # steps if >= 1, else a fraction of the total
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto (bf16 autocast where native) | fp32 | bf16
    log_every: int = 10
    eval_every: int = 0  # steps between validation losses (0: at the end only)
    save_every: int = 200  # steps between checkpoints (0: at the end only)
    keep_checkpoints: int = 2
    resume: bool = True  # continue from OUT's newest checkpoint if there is one
    progress: bool = True

    def validate(self) -> "FinetuneTeacherConfig":
        if not self.train_data:
            raise MuError("--train-data is required")
        if not Path(self.model).exists():
            raise MuError(f"--model {self.model!r}: no such directory")
        checks = {"lora_r": self.lora_r, "lora_alpha": self.lora_alpha, "batch_size": self.batch_size,
                  "grad_accum": self.grad_accum, "lr": self.lr, "max_source_len": self.max_source_len,
                  "max_target_len": self.max_target_len, "log_every": self.log_every, "epochs": self.epochs}
        for name, value in checks.items():
            if not value > 0:
                raise MuError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise MuError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.max_steps is not None and self.max_steps < 1:
            raise MuError(f"--max-steps must be >= 1, got {self.max_steps}")
        return self


def _load_base(cfg: FinetuneTeacherConfig):
    """-> (model in fp32, kind "hf" | "mu", tokenizer)."""
    from mu.distill.teacher import _is_mu_dir, _load_hf, _tokenizer_in
    from mu.tokenizer import load_tokenizer

    path = Path(cfg.model)
    if path.is_dir() and _is_mu_dir(path):
        from mu.checkpoint import load_model

        model, kind = load_model(path, dtype="fp32"), "mu"
        if model.config.arch != "deconly":
            raise MuError(f"--model {path}: a teacher is decoder-only; this mu model is arch={model.config.arch!r}")
        tok = model.tokenizer
    elif path.is_dir() and (path / "config.json").is_file():
        model, kind, tok = _load_hf(path, torch.float32), "hf", _tokenizer_in(path)
    else:
        raise MuError(f"--model {path}: expected a Hugging Face causal LM directory or a mu decoder-only checkpoint")
    if cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer)
    if tok is None:
        raise MuError(f"--model {path} has no tokenizer files; pass --tokenizer DIR")
    return model, kind, tok


def _vocab_size(model, kind: str) -> int:
    return model.config.vocab_size if kind == "mu" else model.get_output_embeddings().weight.shape[0]


def _features(cfg: FinetuneTeacherConfig, tok, path: str, limit: Optional[int], what: str) -> list[dict]:
    from mu.data.batching import encode_examples
    from mu.data.tasks import load_examples

    examples = load_examples(cfg.task, path, limit=limit)
    return encode_examples(examples, tok, cfg.max_source_len, cfg.max_target_len, tok.eos_token_id, task=cfg.task,
                           what=what)


def _loss(model, batch: dict) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten(), ignore_index=-100)


def _save_dir(write, directory: Path) -> None:
    """Write into a temporary sibling, then rename into place."""
    with atomic_directory(directory) as tmp:
        write(tmp)


def finetune_teacher(cfg: FinetuneTeacherConfig) -> dict[str, Any]:
    """Train a LoRA adapter; returns a summary dict (also written to OUT/result.json)."""
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm

    from mu.data.batching import Collator, length_grouped_batches, move_batch
    from mu.distill.teacher import lora_target_modules, quiet_peft
    from mu.train import checkpoint as ckpt
    from mu.train.distributed import init_distributed, shutdown, wrap_model
    from mu.train.optim import LRSchedule, build_optimizer, set_lr, warmup_steps
    from mu.train.rundir import RunDir, StopSignals, log
    from mu.train.step import TrainingDiverged, any_rank, stage_autocast, train_step
    from mu.train.trainer import choose_precision
    from mu.utils import seed_everything

    cfg.validate()
    env = init_distributed(cfg.device)
    try:
        seed_everything(cfg.seed)
        out = Path(cfg.out)
        run = RunDir(out, env, keep=cfg.keep_checkpoints)
        if not cfg.resume and run.has_run():
            raise MuError(f"{out} already holds a run (checkpoints/); use another --out or resume it")
        config = {k: v for k, v in asdict(cfg).items()
                  if k not in ("max_steps", "log_every", "eval_every", "save_every", "keep_checkpoints", "resume",
                               "progress", "device", "merge")}
        run.check_same_run(config)
        device = env.device
        model, kind, tok = _load_base(cfg)
        vocab = _vocab_size(model, kind)
        if len(tok) > vocab:
            raise MuError(f"the tokenizer has {len(tok)} tokens but the model {cfg.model} has only {vocab} output "
                          f"logits")
        targets = list(cfg.target_modules) if cfg.target_modules else lora_target_modules(model)
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                          target_modules=targets, task_type="CAUSAL_LM" if kind == "hf" else None)
        try:
            with quiet_peft():
                model = get_peft_model(model, lora)
        except ValueError as e:
            raise MuError(f"cannot apply LoRA to {cfg.model} with target modules {targets}: {e}") from None
        model.peft_config["default"].base_model_name_or_path = str(Path(cfg.model).resolve())
        model.to(device).train()
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_total = sum(p.numel() for p in model.parameters())

        train_feats = _features(cfg, tok, cfg.train_data, cfg.train_limit, "training examples")
        val_feats = _features(cfg, tok, cfg.val_data, cfg.val_limit, "validation examples") if cfg.val_data else None
        bos = tok.bos_token_id if tok.bos_token_id is not None else 1
        pad = 0 if kind == "mu" else (tok.pad_token_id if tok.pad_token_id is not None else 0)
        collate = Collator("deconly", pad, bos)
        lengths = [len(f["source_ids"]) + len(f["target_ids"]) for f in train_feats]
        per_epoch = len(length_grouped_batches(lengths, cfg.batch_size, cfg.seed, 0)) // cfg.grad_accum
        if per_epoch == 0:
            raise MuError(f"{len(train_feats)} training examples make less than one step of {cfg.batch_size} x "
                          f"{cfg.grad_accum} examples; lower --batch-size or --grad-accum")
        total = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))
        trained = wrap_model(model, env)
        optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, (0.9, 0.999), 1e-8, device)
        schedule = LRSchedule(cfg.lr, total, warmup_steps(cfg.warmup, total), "cosine", 0.0)
        amp, precision = choose_precision(cfg.precision, device)
        autocast = stage_autocast(device, amp)

        def loss_fn(m, batch):
            return _loss(m, batch), {}

        @torch.no_grad()
        def val_loss() -> Optional[float]:
            if not val_feats:
                return None
            model.eval()
            total_loss = n = 0.0
            vl = [len(f["source_ids"]) + len(f["target_ids"]) for f in val_feats]
            for b in length_grouped_batches(vl, cfg.batch_size, shuffle=False):
                batch = move_batch(collate([val_feats[i] for i in b]), device)
                with autocast():
                    total_loss += float(_loss(model, batch)) * batch["n_loss_tokens"]
                n += batch["n_loss_tokens"]
            model.train()
            return total_loss / max(n, 1.0)

        def write_adapter(d: Path) -> None:
            # mu's config is not a transformers config: tell peft not to probe it for a resized vocabulary
            model.save_pretrained(str(d), **({"save_embedding_layers": False} if kind == "mu" else {}))
            tok.save_pretrained(str(d))

        epoch, queue, step, elapsed, last, first_loss = 0, [], 0, 0.0, None, None
        point = run.resume_point(weights_file=ADAPTER_WEIGHTS) if cfg.resume else None
        if point is not None:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model, point.model_state)
            optimizer.load_state_dict(point.state["optimizer"])
            ckpt.set_rng_state(point.state["rng"], device)
            step, epoch, elapsed = point.state["step"], point.state["epoch"], point.state["elapsed_s"]
            queue, last, first_loss = point.state["queue"], point.state["last_loss"], point.state["first_loss"]
            log(env, f"resuming from {point.path} (step {step} of {total})")
        metrics = run.metrics(step if point is not None else None)
        run.write_config(config)
        metrics.write({"event": "start", "step": step, "model": cfg.model, "kind": kind, "target_modules": targets,
                       "trainable_params": n_trainable, "params": n_total, "steps": total,
                       "train_examples": len(train_feats), "precision": precision, "world_size": env.world_size,
                       "resumed_from": point.step if point is not None else None})
        log(env, f"LoRA r={cfg.lora_r} alpha={cfg.lora_alpha} on {targets}: {n_trainable:,} trainable of "
                 f"{n_total:,} parameters; {len(train_feats)} examples, {total} steps, {precision}")

        def save() -> Optional[Path]:
            state = {"kind": "mu-lora", "format": 1, "step": step, "epoch": epoch, "queue": queue,
                     "optimizer": optimizer.state_dict(), "rng": ckpt.rng_state(device), "elapsed_s": elapsed,
                     "last_loss": last, "first_loss": first_loss}
            return run.save_checkpoint(step, write_adapter, state)

        def diverged(what: str, value: float) -> None:
            latest = run.latest()
            where = f"the last good checkpoint is {latest}" if latest else "no checkpoint was saved yet"
            raise TrainingDiverged(f"the training {what} is {value} at step {step + 1}; stopped before the optimizer "
                                   f"step (lower --lr). {where}")

        bar = tqdm(total=total, initial=step, disable=not (cfg.progress and env.is_main), unit="step",
                   dynamic_ncols=True, file=sys.stderr)
        with StopSignals() as stop:
            try:
                while step < total:
                    if len(queue) < cfg.grad_accum * env.world_size:
                        queue += length_grouped_batches(lengths, cfg.batch_size, cfg.seed, epoch)
                        epoch += 1
                    n_micro = cfg.grad_accum * env.world_size
                    micro, queue = queue[:n_micro], queue[n_micro:]
                    set_lr(optimizer, schedule(step))
                    t0 = time.perf_counter()
                    batches = [move_batch(collate([train_feats[i] for i in b]), device)
                               for b in micro[env.rank::env.world_size]]
                    result = train_step(trained, optimizer, batches, loss_fn, env, grad_clip=cfg.grad_clip,
                                        autocast=autocast, on_diverged=diverged)
                    last = result.loss
                    first_loss = last if first_loss is None else first_loss
                    step += 1
                    elapsed += time.perf_counter() - t0
                    bar.update(1)
                    bar.set_postfix(loss=f"{last:.4f}")
                    if step % cfg.log_every == 0 or step == 1:
                        metrics.write({"event": "train", "step": step, "loss": last, "lr": schedule(step - 1),
                                       "grad_norm": result.grad_norm, "elapsed_s": elapsed})
                    if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                        metrics.write({"event": "eval", "step": step, "val_loss": val_loss()})
                    interrupted = any_rank(stop.requested, env)
                    if interrupted or step == total or (cfg.save_every and step % cfg.save_every == 0):
                        path = save()
                        if interrupted and step < total:
                            metrics.write({"event": "interrupted", "step": step, "checkpoint": str(path)})
                            raise stop.interrupted(step, path)
            finally:
                bar.close()
        final_val = val_loss()
        model.eval()
        if not env.is_main:
            return {"steps": step, "train_loss": last}
        _save_dir(write_adapter, out / "adapter")
        merged_dir = None
        if cfg.merge:
            merged = model.merge_and_unload()
            if kind == "mu":
                merged.tokenizer = tok
                merged.save_pretrained(out / "merged")
            else:
                def write_merged(d: Path) -> None:
                    merged.save_pretrained(str(d))
                    tok.save_pretrained(str(d))

                _save_dir(write_merged, out / "merged")
            merged_dir = str(out / "merged")
        result = {"adapter_dir": str(out / "adapter"), "merged_dir": merged_dir, "steps": step,
                  "first_loss": first_loss, "train_loss": last, "val_loss": final_val, "trainable_params": n_trainable,
                  "params": n_total, "target_modules": targets, "precision": precision, "elapsed_s": elapsed,
                  "resumed_from": point.step if point is not None else None, "config": asdict(cfg)}
        metrics.write({"event": "end", **{k: v for k, v in result.items() if k != "config"}})
        run.write_json("result.json", result)
        return result
    finally:
        shutdown(env)
