"""`TrainConfig`: everything a training run needs, as one typed dataclass (saved as DIR/train_config.json).

Run state (step, tokens seen, best score) lives in checkpoints, never here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from mu.errors import MuError

SCHEDULES = ("cosine", "wsd", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
STRATEGIES = ("auto", "ddp", "fsdp")

# Fields that may change when a run is resumed (budget, logging, evaluation); any other difference
# between the saved config and the new one means the --out directory holds a different run.
RESUMABLE_CHANGES = {"max_steps", "max_flops", "max_tokens", "epochs", "log_every", "eval_every", "save_every",
                     "keep_checkpoints", "num_samples", "progress", "device", "compile", "eval_batch_size",
                     "max_new_tokens", "val_data", "val_limit", "best_metric", "resume", "precision", "distributed"}


@dataclass
class TrainConfig:
    out: str  # run directory: checkpoints/, metrics.jsonl, best/, final/, tokenizer/
    # -- model --------------------------------------------------------------------------------
    arch: str = "encdec"  # "encdec" (Mu) or "deconly" (the decoder-only twin)
    preset: str = "tiny"  # MuConfig preset name (tiny, small, 330m, 1b)
    model_overrides: dict[str, Any] = field(default_factory=dict)  # MuConfig fields, e.g. {"dropout": 0.0}
    init: Optional[str] = None  # start from this model directory (fine-tuning) instead of a fresh preset
    weight_init: str = "paper"  # a fresh preset's init: paper (N(0, 0.02)) | fan_in (N(0, 1/sqrt(fan_in)))
    tokenizer: Optional[str] = None  # "byte", "bpe:N" (trained on the training text) or a HF tokenizer
    #                                  directory; None: the --init model's tokenizer, else "byte"
    # -- data and objective -------------------------------------------------------------------
    objective: str = "seq2seq"  # seq2seq (fine-tuning) | span | prefix (encdec pretraining) | causal (deconly)
    task: str = "seq2seq"  # task format of train/val files for seq2seq (squad_v2, xsum, code2text, seq2seq)
    train_data: Optional[str] = None  # task file (jsonl/json/HF) or, for pretraining, a text corpus
    val_data: Optional[str] = None  # same format; enables validation loss, samples and the best checkpoint
    train_limit: Optional[int] = None  # use only the first N training examples (documents when pretraining)
    val_limit: int = 256  # validation examples (or chunks) for the validation loss and metric
    max_source_len: int = 512  # source tokens kept (the encoder input / decoder-only prompt)
    max_target_len: int = 128  # target tokens kept (EOS comes on top)
    seq_len: int = 512  # pretraining: tokens per chunk of the corpus
    noise_density: float = 0.15  # span corruption: fraction of tokens masked
    mean_span: float = 3.0  # span corruption: mean span length
    # -- budget (the first one reached stops the run; none given: 1 epoch) -------------------
    max_steps: Optional[int] = None  # optimizer steps
    max_flops: Optional[float] = None  # training FLOPs (6·N·tokens per stack, see mu.train.flops)
    max_tokens: Optional[int] = None  # real tokens through the model (encoder + decoder)
    epochs: Optional[float] = None  # passes over the training data (may be fractional)
    # -- optimisation -------------------------------------------------------------------------
    batch_size: int = 8  # examples per micro-batch, per process
    global_batch_size: Optional[int] = None  # examples per optimizer step over all processes (default:
    #                                          batch_size x processes); the rest is gradient accumulation
    lr: float = 3e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of lr (cosine, wsd)
    weight_decay: float = 0.1  # decoupled (AdamW); applied to matrices only (see mu.train.optim)
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    warmup: float = 0.05  # warmup steps if >= 1, else a fraction of the total steps
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant (after warmup)
    decay_fraction: float = 0.2  # wsd: fraction of the steps spent decaying (linearly) at the end
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    precision: str = "auto"  # auto (bf16 where the device supports it natively, else fp32) | fp32 | bf16
    compile: bool = False  # torch.compile the model's forward
    distributed: str = "auto"  # auto (DDP under torchrun) | ddp | fsdp (FSDP2, shards each block)
    seed: int = 0  # model init, data order, corruption, dropout
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun each process uses cuda:LOCAL_RANK)
    group_by_length: bool = True  # batch examples of similar length together
    # -- logging, evaluation, checkpoints -----------------------------------------------------
    log_every: int = 10  # steps between metrics.jsonl training records
    eval_every: int = 200  # steps between validations (0: only at the end)
    save_every: int = 200  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2  # most recent checkpoints kept
    num_samples: int = 3  # validation examples whose greedy generations are logged at each validation
    best_metric: str = "val_loss"  # val_loss, or a metric key of mu.eval.evaluate_model (e.g. f1, rougeL)
    eval_batch_size: Optional[int] = None  # default: batch_size
    max_new_tokens: Optional[int] = None  # generation length for samples/metrics (default max_target_len + 1)
    progress: bool = True  # tqdm progress bar on rank 0
    resume: bool = True  # continue from DIR's last checkpoint if there is one

    def __post_init__(self) -> None:
        self.adam_betas = tuple(self.adam_betas)
        self.model_overrides = dict(self.model_overrides or {})
        for f in fields(self):  # plain int / float / str (a CLI may hand over subclasses; checkpoints pickle these)
            value = getattr(self, f.name)
            for base in (bool, int, float, str):
                if isinstance(value, base):
                    if type(value) is not base:
                        setattr(self, f.name, base(value))
                    break

    # -- checks ---------------------------------------------------------------------------------

    def validate(self, have_train_data: bool = False, have_val_data: bool = False) -> "TrainConfig":
        """Raise MuError naming the field for every value that cannot work."""
        from mu.config import ARCHS, PRESETS, MuConfig
        from mu.train.objectives import check_objective

        if self.arch not in ARCHS:
            raise MuError(f"--arch {self.arch!r}: expected one of {ARCHS}")
        if self.init is None and self.preset not in PRESETS:
            raise MuError(f"--preset {self.preset!r}: expected one of {sorted(PRESETS)}")
        if self.init is None:  # a bad override (e.g. --dropout 1) fails here, before anything is written
            MuConfig.from_name(self.preset, self.arch, **self.model_overrides)
        for name in ("lr", "min_lr_ratio", "weight_decay", "warmup", "decay_fraction", "grad_clip", "max_flops",
                     "epochs", "noise_density", "mean_span", "adam_eps"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise MuError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
        check_objective(self.objective, self.arch)
        if self.objective == "seq2seq":
            from mu.data.tasks import get_task

            get_task(self.task)
        if not have_train_data and not self.train_data:
            raise MuError("--train-data is required (a task file, or a text corpus for pretraining)")
        if self.init and not Path(self.init).exists():
            raise MuError(f"--init {self.init!r}: no such model directory")
        from mu.model.layers import WEIGHT_INITS

        if self.weight_init not in WEIGHT_INITS:
            raise MuError(f"--weight-init {self.weight_init!r}: expected one of {WEIGHT_INITS}")
        if self.init and self.weight_init != "paper":
            raise MuError("--weight-init applies to a fresh --preset model, not to an --init model")
        if self.tokenizer is not None:
            _check_tokenizer_spec(self.tokenizer)
        positive = {"batch_size": self.batch_size, "max_source_len": self.max_source_len,
                    "max_target_len": self.max_target_len, "seq_len": self.seq_len, "lr": self.lr,
                    "log_every": self.log_every, "keep_checkpoints": self.keep_checkpoints,
                    "val_limit": self.val_limit}
        for name, value in positive.items():
            if not value > 0:
                raise MuError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        optional_positive = {"max_steps": self.max_steps, "max_flops": self.max_flops, "max_tokens": self.max_tokens,
                             "epochs": self.epochs, "global_batch_size": self.global_batch_size,
                             "eval_batch_size": self.eval_batch_size, "max_new_tokens": self.max_new_tokens,
                             "train_limit": self.train_limit}
        for name, value in optional_positive.items():
            if value is not None and not value > 0:
                raise MuError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        non_negative = {"weight_decay": self.weight_decay, "warmup": self.warmup, "grad_clip": self.grad_clip,
                        "eval_every": self.eval_every, "save_every": self.save_every, "num_samples": self.num_samples}
        for name, value in non_negative.items():
            if value < 0:
                raise MuError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise MuError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise MuError(f"--decay-fraction must be in (0, 1], got {self.decay_fraction}")
        if not 0.0 < self.noise_density < 1.0 or self.mean_span < 1.0:
            raise MuError(f"span corruption needs 0 < noise_density < 1 and mean_span >= 1, got "
                          f"{self.noise_density} and {self.mean_span}")
        if self.schedule not in SCHEDULES:
            raise MuError(f"--schedule {self.schedule!r}: expected one of {SCHEDULES}")
        if self.precision not in PRECISIONS:
            raise MuError(f"--precision {self.precision!r}: expected one of {PRECISIONS}")
        if self.distributed not in STRATEGIES:
            raise MuError(f"--distributed {self.distributed!r}: expected one of {STRATEGIES}")
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise MuError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas}")
        if self.best_metric != "val_loss" and not (self.val_data or have_val_data):
            raise MuError(f"--best-metric {self.best_metric} needs --val-data")
        if self.best_metric != "val_loss" and self.objective != "seq2seq":
            raise MuError("--best-metric other than val_loss needs a task (fine-tuning), not pretraining")
        return self

    # -- (de)serialisation ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "train config") -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise MuError(f"{source}: unknown field(s) {unknown}")
        return cls(**d)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def save(self, path: Path) -> None:
        from mu.atomic import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def differences(self, other: "TrainConfig") -> dict[str, tuple[Any, Any]]:
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


def _check_tokenizer_spec(spec: str) -> None:
    if spec == "byte" or Path(spec).is_dir():
        return
    if spec.startswith("bpe:"):
        n = spec[4:]
        if not n.isdigit() or int(n) < 300:
            raise MuError(f"--tokenizer {spec!r}: bpe:N needs a whole number N >= 300 (the vocabulary size)")
        return
    raise MuError(f"--tokenizer {spec!r}: expected 'byte', 'bpe:N' or an existing Hugging Face tokenizer directory")
