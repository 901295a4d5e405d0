"""What the demo runs: one typed dataclass, `DemoConfig`, with named presets (quick, default, large).

The demo's models sit between the core `tiny` and `small` presets, so they are defined here as MuConfig
field dicts. The decoder-only student is the encoder-decoder student's twin: the same widths, and the
depth whose parameter count is closest to the encoder-decoder's (`deconly_twin`, checked to be within
`PARAM_TOLERANCE`). Both students train for the same FLOP budget.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

from mu.config import MuConfig
from mu.errors import MuError

PARAM_TOLERANCE = 0.02  # the two students' parameter counts may differ by at most this fraction


def _width(n_embd: int, n_head: int, n_kv_head: int, hidden_mult: int = 4) -> dict[str, int]:
    return dict(n_embd=n_embd, qkv_embd=n_embd, n_head=n_head, n_kv_head=n_kv_head, hidden_dim=hidden_mult * n_embd)


# Model shapes. The students use full multi-head attention and a 2x MLP, so an encoder-decoder with 2+2 layers
# and a decoder-only model with 5 match within 0.1% of the parameters (4+2 <-> 7 and 3+2 <-> 6 match too): at
# width 64 the shallow pair learns the default task several times faster per step than 6+3 <-> 10 (docs/demo.md).
# The teacher is a wider decoder-only model. vocab_size comes from the tokenizer at run time.
STUDENT_QUICK = dict(_width(32, 2, 2, 2), n_encoder_layer=2, n_decoder_layer=2)
TEACHER_QUICK = dict(_width(48, 2, 1), n_encoder_layer=0, n_decoder_layer=3)
STUDENT_DEFAULT = dict(_width(64, 4, 4, 2), n_encoder_layer=2, n_decoder_layer=2)
TEACHER_DEFAULT = dict(_width(128, 4, 2), n_encoder_layer=0, n_decoder_layer=3)
STUDENT_LARGE = dict(_width(256, 4, 2), n_encoder_layer=8, n_decoder_layer=4)
TEACHER_LARGE = dict(_width(512, 8, 4), n_encoder_layer=0, n_decoder_layer=12)


@dataclass
class DemoConfig:
    out: str  # output directory: data/, tokenizer/, one directory per task family / model / seed, report, PNGs
    preset: str = "default"  # the preset these values came from (recorded in the report)
    # -- data ---------------------------------------------------------------------------------
    train_data: Optional[str] = None  # squad_v2 file for training (None: built-in word-level synthetic data)
    val_data: Optional[str] = None  # validation file (None: synthetic, or carved from train_data)
    test_data: Optional[str] = None  # test file (None: synthetic, or val_data when train_data is given)
    families: tuple[str, ...] = ("context_first",)  # task families of the built-in data (synthetic_words.ORDERS)
    n_train: int = 50000  # synthetic training questions (a limit on train_data when that is given)
    n_val: int = 200  # synthetic validation questions (a limit on val_data): LR choice and curves
    n_test: int = 600  # synthetic test questions (a limit on test_data)
    synthetic: dict[str, Any] = field(default_factory=dict)  # knobs of mu.data.synthetic_words (difficulty)
    teacher_synthetic: Optional[dict[str, Any]] = None  # knobs (on top of `synthetic`) of the teacher's own
    #   training split, n_train questions from the same generator (None: the students' training split)
    vocab_size: int = 1024  # byte-level BPE trained on --train-data (the built-in data is word-level)
    max_source_len: int = 64  # prompt tokens kept (both architectures, training and evaluation)
    max_target_len: int = 4  # answer tokens kept (EOS on top)
    # -- models -------------------------------------------------------------------------------
    student: dict[str, Any] = field(default_factory=lambda: dict(STUDENT_DEFAULT))  # encoder-decoder student
    teacher: dict[str, Any] = field(default_factory=lambda: dict(TEACHER_DEFAULT))  # decoder-only teacher
    dropout: float = 0.0  # all models (short runs on fresh data: no need for dropout)
    weight_init: str = "fan_in"  # every model (N(0, 1/fan-in): tiny widths leave N(0, 0.02) at chance)
    # -- training -----------------------------------------------------------------------------
    batch_size: int = 32  # examples per optimizer step (every student)
    teacher_batch_size: int = 16  # the teacher's sequences (documents) per optimizer step
    teacher_examples: int = 48000  # training sequences the teacher sees (steps = this / teacher_batch_size):
    #   3,000 steps. The document-trained teacher leaves its plateau after a number of steps, not of documents
    #   (batch 16 and 32 alike at ~2,500 for seed 0), so batch 16 halves its time. docs/demo.md
    teacher_documents: bool = True  # the teacher trains as a language model on documents (built-in data): the
    #   questions about one paragraph packed after it, every token scored (mu.data.batching.pack_documents);
    #   False: on the questions one by one, the answer scored (the students' recipe). docs/demo.md
    teacher_seeds: int = 3  # teachers trained (seeds seed..); the one with the best validation F1 teaches:
    #   a seed leaves the plateau by step 3,000 about two times in three (docs/demo.md), three make a miss rare
    teacher_lr: float = 1e-3  # chosen on validation: at 2e-3 the document-trained teacher stayed on the plateau
    student_examples: int = 38400  # sets the students' FLOP budget: what the encoder-decoder needs for this many
    family_budget_scale: dict[str, float] = field(default_factory=lambda: {"question_first": 2.0})  # per task
    #   family: student_examples x this there, for every student alike (the decoder-only student learns the
    #   question-first prompts more slowly: at 1x its validation curve was still rising; docs/demo.md)
    student_flops: Optional[float] = None  # an explicit FLOP budget instead (both students and the KD students)
    lr_grid: tuple[float, ...] = (2e-3, 4e-3)  # peak learning rates tried for both students (seed 0, validation F1)
    seeds: int = 3  # seeds per student (initialisation and data order; the same test set)
    warmup: float = 0.05  # fraction of the steps
    weight_decay: float = 0.1
    evals_per_run: int = 4  # validation points per training run (the learning curves)
    # -- distillation -------------------------------------------------------------------------
    kd_alpha: float = 0.9  # loss = alpha * KD + (1 - alpha) * CE (the paper's 0.9)
    kd_temperature: float = 1.0
    kd_divergence: str = "forward_kl"
    kd_on_policy: float = 1.0  # the on-policy KD student: probability that a batch's targets are student samples
    # -- evaluation ---------------------------------------------------------------------------
    eval_batch_size: int = 100
    max_new_tokens: int = 4  # answer tokens generated (greedy)
    bootstrap: int = 2000  # bootstrap resamples (over seeds and test questions) for the 95% intervals
    # -- efficiency benchmark -----------------------------------------------------------------
    bench_preset: str = "small"  # the students' architectures at a larger size (mu.config preset, random weights)
    bench_input_lengths: tuple[int, ...] = (128, 256, 512, 1024)
    bench_new_tokens: int = 32
    bench_repeats: int = 2
    bench_memory: bool = True  # peak memory in fresh subprocesses (needed for memory_ratio)
    # -- run ----------------------------------------------------------------------------------
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # trainer precision: fp32 (tiny models train faster and better than in bf16) | auto | bf16
    workers: int = 2  # training runs in parallel (separate processes)
    threads: Optional[int] = None  # torch threads per worker (None: cores / workers)
    seed: int = 0  # data seed; run seeds are seed .. seed + seeds - 1
    progress: bool = True  # a line per finished run with the overall ETA on stderr

    def __post_init__(self) -> None:
        self.synthetic = dict(self.synthetic or {})
        self.teacher_synthetic = None if self.teacher_synthetic is None else dict(self.teacher_synthetic)
        self.student = dict(self.student)
        self.teacher = dict(self.teacher)
        self.family_budget_scale = {str(k): float(v) for k, v in (self.family_budget_scale or {}).items()}
        self.bench_input_lengths = tuple(int(x) for x in self.bench_input_lengths)
        self.lr_grid = tuple(float(x) for x in self.lr_grid)
        self.families = tuple(self.families) if self.train_data is None else ("squad_v2",)

    # -- checks ---------------------------------------------------------------------------------

    def validate(self) -> "DemoConfig":
        positive = dict(n_train=self.n_train, n_val=self.n_val, n_test=self.n_test, vocab_size=self.vocab_size,
                        max_source_len=self.max_source_len, max_target_len=self.max_target_len,
                        batch_size=self.batch_size, teacher_batch_size=self.teacher_batch_size,
                        teacher_examples=self.teacher_examples,
                        student_examples=self.student_examples, teacher_lr=self.teacher_lr, seeds=self.seeds,
                        teacher_seeds=self.teacher_seeds,
                        workers=self.workers, eval_batch_size=self.eval_batch_size, bootstrap=self.bootstrap,
                        max_new_tokens=self.max_new_tokens, bench_new_tokens=self.bench_new_tokens,
                        bench_repeats=self.bench_repeats, evals_per_run=self.evals_per_run)
        for name, value in positive.items():
            if not value > 0:
                raise MuError(f"demo setting {name} must be > 0, got {value}")
        for family, scale in self.family_budget_scale.items():
            if not scale > 0:
                raise MuError(f"demo setting family_budget_scale[{family!r}] must be > 0, got {scale}")
        if not self.lr_grid or min(self.lr_grid) <= 0:
            raise MuError(f"demo setting lr_grid must be positive learning rates, got {list(self.lr_grid)}")
        if self.threads is not None and self.threads < 1:
            raise MuError(f"demo setting threads must be >= 1, got {self.threads}")
        if self.train_data is not None and self.vocab_size < 300:
            raise MuError(f"demo setting vocab_size must be >= 300 (a byte-level BPE), got {self.vocab_size}")
        from mu.data.synthetic_words import ORDERS

        bad = [f for f in self.families if f not in ORDERS + ("squad_v2",)]
        if bad or not self.families:
            raise MuError(f"demo setting families {list(self.families)}: expected some of {list(ORDERS)}")
        from mu.model.layers import WEIGHT_INITS
        from mu.train.config import PRECISIONS

        if self.weight_init not in WEIGHT_INITS:
            raise MuError(f"demo setting weight_init {self.weight_init!r}: expected one of {WEIGHT_INITS}")
        if self.precision not in PRECISIONS:
            raise MuError(f"demo setting precision {self.precision!r}: expected one of {PRECISIONS}")
        if self.student_flops is not None and not self.student_flops > 0:
            raise MuError(f"demo setting student_flops must be > 0, got {self.student_flops}")
        if not 0.0 <= self.kd_alpha <= 1.0:
            raise MuError(f"demo setting kd_alpha must be in [0, 1], got {self.kd_alpha}")
        if not 0.0 <= self.kd_on_policy <= 1.0:
            raise MuError(f"demo setting kd_on_policy must be in [0, 1], got {self.kd_on_policy}")
        if self.teacher_synthetic is not None and self.train_data:
            raise MuError("demo setting teacher_synthetic applies to the built-in data, not to --train-data")
        if self.test_data and not self.train_data:
            raise MuError("--test-data needs --train-data (the built-in data has its own test split)")
        if self.val_data and not self.train_data:
            raise MuError("--val-data needs --train-data (the built-in data has its own validation split)")
        if not self.bench_input_lengths or min(self.bench_input_lengths) < 1:
            raise MuError(f"bench input lengths must be positive, got {list(self.bench_input_lengths)}")
        from mu.config import PRESETS

        if self.bench_preset not in PRESETS:
            raise MuError(f"--bench-preset {self.bench_preset!r}: expected one of {sorted(PRESETS)}")
        for name in ("student", "teacher"):
            unknown = set(getattr(self, name)) - {f.name for f in fields(MuConfig)}
            if unknown:
                raise MuError(f"demo {name} config: unknown MuConfig field(s) {sorted(unknown)}")
        self.model_config("teacher", 1024)
        deconly_twin(self.model_config("encdec", 1024))  # raises if no depth matches the parameters
        return self

    # -- models ---------------------------------------------------------------------------------

    def student_examples_for(self, family: str) -> int:
        """The examples that set the students' FLOP budget in task `family`."""
        return round(self.student_examples * self.family_budget_scale.get(family, 1.0))

    def model_config(self, role: str, vocab_size: int) -> MuConfig:
        """The MuConfig of "teacher", "encdec" (both encoder-decoder students) or "deconly"."""
        common = dict(dropout=self.dropout, vocab_size=vocab_size,
                      block_size=max(512, self.max_source_len + self.max_target_len + 1))
        if role == "teacher":
            return MuConfig(**{**self.teacher, **common, "arch": "deconly", "n_encoder_layer": 0})
        encdec = MuConfig(**{**self.student, **common, "arch": "encdec"})
        if role == "encdec":
            return encdec
        if role == "deconly":
            return deconly_twin(encdec)
        raise ValueError(f"unknown model role {role!r}")

    # -- (de)serialisation ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bench_input_lengths"] = list(self.bench_input_lengths)
        d["lr_grid"] = list(self.lr_grid)
        d["families"] = list(self.families)
        d["family_budget_scale"] = dict(self.family_budget_scale)
        return d

    def replace(self, **changes: Any) -> "DemoConfig":
        return dataclasses.replace(self, **changes)


def deconly_twin(encdec: MuConfig, tolerance: float = PARAM_TOLERANCE) -> MuConfig:
    """The decoder-only student: `encdec`'s widths, with the depth whose parameter count is closest.

    Raises MuError when even the closest depth differs by more than `tolerance` (then change the
    encoder/decoder depths: e.g. 6+3 -> 10 and 8+4 -> 13 match within 2% at hidden_dim = 4 x n_embd).
    """
    from mu.train.flops import flops_params

    target = flops_params(encdec).total
    best = None
    for depth in range(1, 2 * encdec.n_layer + 2):
        twin = encdec.replace(arch="deconly", n_encoder_layer=0, n_decoder_layer=depth)
        gap = flops_params(twin).total / target - 1.0
        if best is None or abs(gap) < abs(best[1]):
            best = (twin, gap)
    twin, gap = best
    if abs(gap) > tolerance:
        raise MuError(f"no decoder-only depth matches the encoder-decoder student ({encdec.n_encoder_layer}+"
                      f"{encdec.n_decoder_layer} layers, {target:,} parameters) within {tolerance:.0%}: the closest, "
                      f"{twin.n_decoder_layer} layers, is {gap:+.1%}; change the student's depths (6+3 and 8+4 match)")
    return twin


# Presets: field overrides of DemoConfig. `default` is set for ~15 minutes on a 2-core CPU (2 workers x 1
# thread), `full` runs both task families (~45 minutes); see docs/demo.md for the measurements behind them.
PRESETS: dict[str, dict[str, Any]] = {
    # End-to-end in well under a minute: tests and a smoke check. Its numbers mean nothing.
    "quick": dict(n_train=512, n_val=24, n_test=48, student=STUDENT_QUICK, teacher=TEACHER_QUICK, batch_size=16,
                  teacher_batch_size=16, teacher_examples=160, teacher_seeds=1, student_examples=96, teacher_lr=3e-3,
                  lr_grid=(2e-3, 5e-3),
                  seeds=2, evals_per_run=2, eval_batch_size=48, bootstrap=200, bench_preset="tiny",
                  bench_input_lengths=(16, 32), bench_new_tokens=4, bench_repeats=1),
    # `make demo`: the first task family (question after the context), 3 seeds, a 2-rate grid.
    "default": dict(),
    # Both task families (question after / before the context).
    "full": dict(families=("context_first", "question_first")),
    # Bigger models and more data (a GPU, or many hours of CPU).
    "large": dict(families=("context_first", "question_first"), n_train=40000, n_val=500, n_test=2000,
                  student=STUDENT_LARGE, teacher=TEACHER_LARGE, batch_size=64, teacher_batch_size=64,
                  teacher_examples=320000,
                  student_examples=160000, teacher_lr=1e-3, lr_grid=(5e-4, 1e-3, 2e-3), bench_preset="330m",
                  bench_input_lengths=(256, 512, 1024, 2048), bench_new_tokens=64, bench_repeats=3),
}


def demo_config(out: str, preset: str = "default", **overrides: Any) -> DemoConfig:
    """The preset's DemoConfig with `overrides` (DemoConfig fields; None values are ignored)."""
    if preset not in PRESETS:
        raise MuError(f"unknown demo preset {preset!r}; expected one of {sorted(PRESETS)}")
    known = {f.name for f in fields(DemoConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise MuError(f"unknown demo setting(s) {unknown}")
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    return DemoConfig(out=str(out), preset=preset, **values).validate()


def settings_hash(*parts: Any) -> str:
    """A short, stable hash of JSON-able settings (stage manifests compare these)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
