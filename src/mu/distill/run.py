"""`distill(DistillConfig) -> TrainResult`: knowledge distillation on the trainer's loop.

    from mu.distill import DistillConfig, distill
    from mu.train import TrainConfig
    result = distill(DistillConfig(
        teacher="runs/teacher/final", student_preset="small",
        train=TrainConfig(out="runs/kd", task="squad_v2", train_data="train.jsonl", val_data="val.jsonl",
                          max_steps=2000, lr=1e-3)))

Everything about optimisation, batching, checkpoints (atomic, resumable), metrics.jsonl, validation
and the progress bar is `mu.train.train`'s; this module adds the teacher and the loss:

1. start the process group (one teacher replica per rank, on that rank's device);
2. load the student (`student`: a mu encoder-decoder directory or the paper's model.pt; or build
   `student_preset` for the shared tokenizer) and the teacher; check they share a tokenizer;
3. tokenise the task data once (the trainer's `build_datasets`);
4. optionally run the teacher once over the gold targets and keep its top-k logits (`topk`);
5. `train(..., loss_fn=DistillObjective(...))`.

`DIR/distill_config.json` records the KD settings; re-running with the same DIR resumes (the top-k
cache in `DIR/teacher_topk.safetensors` is reused).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from mu.atomic import atomic_write_text
from mu.data.tasks import load_examples
from mu.distill.losses import KDLossConfig
from mu.distill.objective import DistillObjective, SamplingConfig
from mu.distill.teacher import load_teacher
from mu.distill.topk import TopKCache, build_topk_cache, fingerprint
from mu.distill.vocab import check_same_tokenizer, common_vocab
from mu.errors import MuError
from mu.model.io import build_model, load_model
from mu.tokenizer import load_tokenizer
from mu.train import checkpoint as ckpt
from mu.train.config import TrainConfig
from mu.train.distributed import barrier, init_distributed, shutdown
from mu.train.trainer import build_datasets, model_vocab_size, train
from mu.utils import seed_everything

DISTILL_CONFIG_FILE = "distill_config.json"
TOPK_FILE = "teacher_topk.safetensors"
# KD settings that may change when a run is resumed
RESUMABLE = {"teacher_dtype", "progress"}


@dataclass
class DistillConfig:
    train: TrainConfig  # the student's training run (out, task, data, budget, optimiser, ...); arch must be encdec
    teacher: str = ""  # HF causal LM dir, PEFT adapter dir, mu decoder-only dir, or a .pt state dict
    teacher_adapter: Optional[str] = None  # a PEFT LoRA adapter directory merged into the teacher
    teacher_config: Optional[str] = None  # HF config dir for a .pt state dict (or an adapter's base model)
    teacher_dtype: Optional[str] = None  # fp32 | bf16 | None: bf16 where the device runs it natively, else fp32
    lora_alpha: int = 32  # scale of a LoRA state dict inside a .pt teacher (not stored there; the paper's 32)
    student: Optional[str] = None  # mu encoder-decoder directory or the paper's model.pt; else student_preset
    student_preset: Optional[str] = None  # build a fresh student from this preset
    alpha: float = 0.9  # loss = alpha * KD + (1 - alpha) * CE(gold)
    divergence: str = "forward_kl"  # forward_kl | reverse_kl | jsd
    temperature: float = 1.0  # tau for both distributions
    jsd_beta: float = 0.5  # weight of the teacher in the JSD mixture
    scale_by_t2: bool = True  # multiply the KD term by tau^2
    on_policy: float = 0.0  # lambda: probability that a batch's KD targets are sampled by the student
    sample_temperature: float = 0.9  # on-policy sampling (the paper's)
    sample_top_k: Optional[int] = 128  # on-policy sampling (the paper's)
    max_sample_tokens: Optional[int] = None  # on-policy target length (default: max_target_len + 1)
    topk: int = 0  # > 0: precompute the teacher's top-k logits on the gold targets once (off-policy batches)
    topk_batch_size: int = 16  # batch size of that teacher pass

    def kd_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("train")
        return d

    def validate(self) -> "DistillConfig":
        if not self.teacher:
            raise MuError("--teacher is required (a Hugging Face causal LM directory, an adapter directory, a mu "
                          "decoder-only checkpoint, or a .pt state dict with --teacher-config)")
        if (self.student is None) == (self.student_preset is None):
            raise MuError("give exactly one of --student DIR (a mu encoder-decoder) or --student-preset NAME")
        if self.train.arch != "encdec":
            raise MuError(f"the student must be an encoder-decoder (arch encdec), got arch {self.train.arch!r}")
        if self.train.objective != "seq2seq":
            raise MuError(f"distillation trains on a task (objective seq2seq), got {self.train.objective!r}")
        KDLossConfig(self.alpha, self.divergence, self.temperature, self.jsd_beta, self.scale_by_t2)
        if not 0.0 <= self.on_policy <= 1.0:
            raise MuError(f"--on-policy (lambda) is a probability in [0, 1], got {self.on_policy}")
        if not self.sample_temperature > 0:
            raise MuError(f"--sample-temperature must be > 0, got {self.sample_temperature}")
        if self.sample_top_k is not None and self.sample_top_k < 1:
            raise MuError(f"--sample-top-k must be >= 1 (0 or none: no top-k filter), got {self.sample_top_k}")
        if self.topk < 0 or self.topk_batch_size < 1:
            raise MuError(f"--topk must be >= 0 and --topk-batch-size >= 1, got {self.topk}, {self.topk_batch_size}")
        if self.max_sample_tokens is not None and self.max_sample_tokens < 1:
            raise MuError(f"--max-sample-tokens must be >= 1, got {self.max_sample_tokens}")
        return self


def _load_student(cfg: DistillConfig, tokenizer_spec: Optional[str], teacher):
    """-> (student model, tokenizer). The tokenizer: --tokenizer, else the student's, else the teacher's."""
    tokenizer = load_tokenizer(tokenizer_spec) if tokenizer_spec else None
    if cfg.student is not None:
        student = load_model(cfg.student, device="cpu", dtype="fp32")
        if student.config.arch != "encdec":
            raise MuError(f"--student {cfg.student}: the student must be an encoder-decoder, this is "
                          f"arch={student.config.arch!r}")
        tokenizer = tokenizer or student.tokenizer or teacher.tokenizer
        if tokenizer is None:
            raise MuError(f"neither --student {cfg.student} nor the teacher has tokenizer files; pass --tokenizer DIR")
        return student, tokenizer
    tokenizer = tokenizer or teacher.tokenizer
    if tokenizer is None:
        raise MuError(f"the teacher {cfg.teacher} has no tokenizer files; pass --tokenizer DIR (the teacher's)")
    seed_everything(cfg.train.seed)
    overrides = dict(cfg.train.model_overrides)
    overrides.setdefault("vocab_size", model_vocab_size(tokenizer))
    return build_model(cfg.student_preset, arch="encdec", weight_init=cfg.train.weight_init, **overrides), tokenizer


def _check_resume(cfg: DistillConfig, out: Path) -> None:
    path = out / DISTILL_CONFIG_FILE
    if not (path.is_file() and cfg.train.resume and ckpt.list_checkpoints(out)):
        return
    old = json.loads(path.read_text())
    new = cfg.kd_dict()
    diff = {k: (old.get(k), v) for k, v in new.items() if k not in RESUMABLE and old.get(k) != v}
    if diff:
        items = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise MuError(f"{out} holds a different distillation run ({items}); use another --out, or the same options "
                      f"to resume it")


def _topk_cache(cfg: DistillConfig, teacher, features: list[dict], vocab: int, tokenizer, env):
    """Load DIR/teacher_topk.safetensors if it was built for this data and these settings, else build it
    (each rank a shard, merged by rank 0)."""
    out = Path(cfg.train.out)
    path = out / TOPK_FILE
    fp = fingerprint(features, f"{teacher.name}|{cfg.teacher_adapter}")
    want = dict(k=cfg.topk, temperature=float(cfg.temperature), vocab=vocab, fingerprint=fp,
                n_examples=len(features))
    if path.is_file():
        cache = TopKCache.load(path)
        if cache.settings() == want:
            return cache
    pad, bos = 0, tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 1
    shard = build_topk_cache(teacher, features, cfg.topk, cfg.temperature, vocab, cfg.topk_batch_size, pad, bos,
                             env.rank, env.world_size, fp, progress=env.is_main and cfg.train.progress)
    if env.world_size == 1:
        shard.save(path)
        return shard
    shard_path = out / f".{TOPK_FILE}.rank{env.rank}"
    shard.save(shard_path)
    barrier(env)
    if env.is_main:
        merged = TopKCache.merge([TopKCache.load(out / f".{TOPK_FILE}.rank{r}") for r in range(env.world_size)])
        merged.save(path)
    barrier(env)
    shard_path.unlink(missing_ok=True)
    return TopKCache.load(path)


def distill(cfg: DistillConfig, *, train_examples=None, val_examples=None, on_step=None):
    """Distil `cfg.teacher` into the student; returns the trainer's `TrainResult` (see docs/distillation.md)."""
    cfg.validate()
    tc = cfg.train
    tc.validate(have_train_data=train_examples is not None, have_val_data=val_examples is not None)
    out = Path(tc.out)
    _check_resume(cfg, out)
    env = init_distributed(tc.device, tc.distributed)
    try:
        if env.strategy == "fsdp" and cfg.on_policy > 0:
            raise MuError("--on-policy sampling needs the whole student on each process; use DDP (--distributed ddp) "
                          "or --on-policy 0 with --distributed fsdp")
        teacher = load_teacher(cfg.teacher, adapter=cfg.teacher_adapter, config_dir=cfg.teacher_config,
                               device=env.device, dtype=cfg.teacher_dtype, lora_alpha=cfg.lora_alpha)
        tok_spec = tc.tokenizer
        if tok_spec is not None and not Path(tok_spec).is_dir():
            raise MuError(f"--tokenizer {tok_spec!r}: distillation needs the teacher's tokenizer directory, not a "
                          f"built-in one")
        student, tokenizer = _load_student(cfg, tok_spec, teacher)
        check_same_tokenizer(tokenizer, teacher.tokenizer, "student", f"teacher ({cfg.teacher})")
        vocab = common_vocab(tokenizer, student.config.vocab_size, teacher.vocab_size, cfg.teacher)
        if train_examples is None:
            train_examples = load_examples(tc.task, tc.train_data, limit=tc.train_limit)
        if val_examples is None and tc.val_data:
            val_examples = load_examples(tc.task, tc.val_data, limit=tc.val_limit)
        train_ds, val_ds = build_datasets(tc, tokenizer, student.config.vocab_size, train_examples, val_examples)
        cache = None
        if cfg.topk and cfg.on_policy < 1.0 and cfg.alpha > 0.0:
            if env.is_main:
                out.mkdir(parents=True, exist_ok=True)
            barrier(env)
            cache = _topk_cache(cfg, teacher, train_ds.features, vocab, tokenizer, env)
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 1
        unk = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else student.config.pad_token_id
        objective = DistillObjective(
            teacher=teacher, vocab=vocab, eos_token_id=tokenizer.eos_token_id,
            kd=KDLossConfig(cfg.alpha, cfg.divergence, cfg.temperature, cfg.jsd_beta, cfg.scale_by_t2),
            on_policy=cfg.on_policy,
            sampling=SamplingConfig(cfg.sample_temperature, cfg.sample_top_k,
                                    cfg.max_sample_tokens or tc.max_target_len + 1),
            topk_cache=cache, bos_token_id=bos, pad_token_id=student.config.pad_token_id, unk_token_id=unk)
        if env.is_main:
            out.mkdir(parents=True, exist_ok=True)
            info = {**cfg.kd_dict(), "teacher_kind": teacher.kind, "teacher_params": teacher.num_parameters(),
                    "teacher_vocab": teacher.vocab_size, "student_vocab": student.config.vocab_size,
                    "common_vocab": vocab, "teacher_precision": teacher.precision}
            atomic_write_text(out / DISTILL_CONFIG_FILE, json.dumps(info, indent=2) + "\n")
            print(f"teacher {cfg.teacher}: {teacher.kind}, {teacher.num_parameters() / 1e6:.2f}M parameters, "
                  f"{teacher.precision}", file=sys.stderr)
        if tc.init is None and cfg.student is not None:
            tc.init = cfg.student  # recorded in train_config.json; the trainer uses the model given here
        return train(tc, model=student, tokenizer=tokenizer, train_dataset=train_ds, val_dataset=val_ds,
                     val_examples=val_examples, loss_fn=objective, on_step=on_step)
    finally:
        shutdown(env)
