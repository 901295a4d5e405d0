"""The training loop, as a library function: `train(cfg) -> TrainResult`.

    from mu.train import TrainConfig, train
    result = train(TrainConfig(out="runs/squad", arch="encdec", preset="small", task="squad_v2",
                               train_data="squad_v2_train.jsonl", val_data="squad_v2_dev.jsonl",
                               tokenizer="bpe:8192", max_flops=1e15))

One step = `grad_accum` micro-batches per process, `world_size` processes. Each micro-batch's mean
loss is weighted by its share of the step's scored target tokens (all-reduced over processes), so
the gradient is the token-mean over the whole global batch: 2 processes x k micro-batches give the
same step as 1 process x 2k micro-batches on the same data.

Hooks for other objectives (knowledge distillation, ...) without copying this loop:
  loss_fn(model, batch) -> (loss, stats)    scalar mean over the batch's scored tokens + floats to log
  batch_hook(batch, features) -> batch      add tensors to a collated batch (e.g. teacher logits)
  on_step(state)                            after every optimizer step (and its checkpoint)
and `train_dataset`/`val_dataset`/`model`/`tokenizer` may be given instead of files.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from mu.data.batching import Collator, encode_examples, example_text, move_batch, round_up
from mu.errors import MuError
from mu.train.budget import epoch_batches, plan_budget
from mu.train.config import RESUMABLE_CHANGES, TrainConfig
from mu.train.distributed import DistEnv, all_gather_object, barrier, init_distributed, shutdown, wrap_model
from mu.train.flops import flops_params, training_flops
from mu.train.objectives import NUM_SENTINELS, FeatureDataset, PretrainDataset, chunk_documents, seq2seq_loss
from mu.train.optim import LRSchedule, build_optimizer, set_lr, warmup_steps
from mu.train.rundir import MetricsLog, RunDir, StopSignals, log
from mu.train.step import TrainingDiverged, any_rank, train_step
from mu.train import checkpoint as ckpt
from mu.train.validation import Validator

LossFn = Callable[[nn.Module, dict], tuple[Tensor, dict]]
BatchHook = Callable[[dict, list], dict]

RESULT_FILE = "result.json"
TOKENIZER_DIR = "tokenizer"
FINAL_DIR = "final"
BEST_DIR = "best"
VOCAB_MULTIPLE = 64


@dataclass
class TrainState:
    """Progress counters (saved in every checkpoint); totals are over all processes."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # current pass over the data
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed (all processes)
    examples: int = 0
    enc_tokens: int = 0  # real tokens through the encoder
    dec_tokens: int = 0  # real tokens through the decoder (decoder-only: the whole input)
    loss_tokens: int = 0  # scored target tokens
    flops: float = 0.0  # training FLOPs, 6·N·tokens per stack
    best_metric: Optional[float] = None
    best_step: Optional[int] = None
    last_loss: Optional[float] = None
    elapsed_s: float = 0.0  # training time, summed over resumed segments

    @property
    def tokens(self) -> int:
        return self.enc_tokens + self.dec_tokens


@dataclass
class TrainResult:
    out_dir: str
    final_dir: str  # the trained model (mu.load_model), with its tokenizer
    best_dir: Optional[str]  # best checkpoint by `best_metric` (None without validation data)
    arch: str
    params: int  # all parameters (tied embedding once)
    steps: int
    epochs: float  # passes over the training data
    examples: int
    enc_tokens: int
    dec_tokens: int
    loss_tokens: int
    flops: float
    train_loss: Optional[float]  # mean loss of the last step
    val_loss: Optional[float]
    val_metrics: dict[str, float] = field(default_factory=dict)  # final validation (loss, task metrics)
    best_metric: Optional[float] = None
    best_step: Optional[int] = None
    stop_reason: str = ""  # max_steps | max_flops | max_tokens | epochs
    resumed_from: Optional[int] = None
    elapsed_s: float = 0.0
    tokens_per_s: float = 0.0
    precision: str = ""  # what ran and why, e.g. "bf16 (auto: CPU has native bf16 (AVX-512-BF16/AMX))"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Set-up helpers


def resolve_precision(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype (None = fp32). bf16 on a CPU without native bf16 works but is emulated (slow)."""
    return choose_precision(precision, device)[0]


def choose_precision(precision: str, device: torch.device) -> tuple[Optional[torch.dtype], str]:
    """The autocast dtype (None = fp32) and a note saying which was chosen and why (logged and saved)."""
    from mu.utils import auto_precision, precision_note

    if precision == "fp32":
        return None, precision_note(None, "--precision fp32")
    if precision == "auto":
        dtype, why = auto_precision(device)
        return dtype, precision_note(dtype, f"auto: {why}")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise MuError(f"--precision bf16: {torch.cuda.get_device_name(device)} does not support bf16; use fp32")
    if device.type == "cpu" and auto_precision(device)[0] is None:
        warnings.warn("bf16 on this CPU is emulated (no native bf16 matmul): expect it to be several times slower "
                      "than fp32", stacklevel=2)
    return torch.bfloat16, precision_note(torch.bfloat16, "--precision bf16")


def make_tokenizer(spec: str, texts: Callable[[], Sequence[str]]):
    from mu.tokenizer import byte_tokenizer, load_tokenizer, train_tokenizer

    if spec == "byte":
        return byte_tokenizer()
    if spec.startswith("bpe:"):
        return train_tokenizer(texts(), int(spec[4:]))
    return load_tokenizer(spec)


def model_vocab_size(tokenizer) -> int:
    """len(tokenizer) + the span-corruption sentinels, rounded up to a multiple of 64."""
    return round_up(len(tokenizer) + NUM_SENTINELS, VOCAB_MULTIPLE)


def _log(env: DistEnv, msg: str) -> None:
    log(env, msg)


# ---------------------------------------------------------------------------------------------
# Data


def _load_examples(cfg: TrainConfig, path: str, limit: Optional[int]):
    from mu.data.tasks import load_examples

    return load_examples(cfg.task, path, limit=limit)


def _load_texts(path: str, limit: Optional[int]) -> list[str]:
    from mu.data.tasks import iter_text

    texts = []
    for t in iter_text(path):
        if limit is not None and len(texts) >= limit:
            break
        texts.append(t)
    if not texts:
        raise MuError(f"{path}: no text found")
    return texts


def _tokenize_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    out: list[list[int]] = []
    for i in range(0, len(texts), 1000):
        out.extend(tokenizer(list(texts[i:i + 1000]), add_special_tokens=False)["input_ids"])
    return out


def build_datasets(cfg: TrainConfig, tokenizer, vocab_size: int, train_source, val_source):
    """Examples/texts -> datasets of features for `cfg.objective` (None for a split without a source)."""
    eos = tokenizer.eos_token_id
    if cfg.objective == "seq2seq":
        train = None
        if train_source is not None:
            train = FeatureDataset(encode_examples(train_source, tokenizer, cfg.max_source_len, cfg.max_target_len,
                                                   eos, task=cfg.task, what="training examples"))
        val = None
        if val_source is not None:
            val = FeatureDataset(encode_examples(val_source[:cfg.val_limit], tokenizer, cfg.max_source_len,
                                                 cfg.max_target_len, eos, task=cfg.task, what="validation examples"))
        return train, val
    datasets = []
    for name, texts in (("training", train_source), ("validation", val_source)):
        if texts is None:
            datasets.append(None)
            continue
        chunks = chunk_documents(_tokenize_texts(tokenizer, texts), cfg.seq_len, eos)
        if name == "validation":
            chunks = chunks[:cfg.val_limit]
        if not chunks:
            raise MuError(f"the {name} text has fewer than --seq-len={cfg.seq_len} tokens; use a shorter --seq-len")
        datasets.append(PretrainDataset(chunks, cfg.objective, vocab_size, eos, cfg.seed, cfg.noise_density,
                                        cfg.mean_span))
    return datasets[0], datasets[1]


# ---------------------------------------------------------------------------------------------
# The loop


class Trainer:
    """Holds one run's objects; `train()` below is the public entry point."""

    def __init__(self, cfg: TrainConfig, env: DistEnv, *, model=None, tokenizer=None, train_dataset=None,
                 val_dataset=None, train_examples=None, val_examples=None, loss_fn: Optional[LossFn] = None,
                 batch_hook: Optional[BatchHook] = None, on_step: Optional[Callable[[TrainState], None]] = None):
        self.cfg, self.env = cfg, env
        self.out = Path(cfg.out)
        self.loss_fn = loss_fn or seq2seq_loss
        self.batch_hook, self.on_step = batch_hook, on_step
        self.run_dir = RunDir(self.out, env, keep=cfg.keep_checkpoints)
        self._setup_run_dir()
        self.state = TrainState()
        self.resume = self.run_dir.resume_point() if cfg.resume else None
        self.resume_from = self.resume.path if self.resume is not None else None

        pretraining = cfg.objective != "seq2seq"
        train_src, val_src = train_examples, val_examples
        if train_dataset is None and train_src is None:
            train_src = (_load_texts(cfg.train_data, cfg.train_limit) if pretraining
                         else _load_examples(cfg, cfg.train_data, cfg.train_limit))
        if val_dataset is None and val_src is None and cfg.val_data:
            val_src = (_load_texts(cfg.val_data, None) if pretraining
                       else _load_examples(cfg, cfg.val_data, cfg.val_limit))
        self.val_examples = val_src if not pretraining else None

        self.tokenizer = self._setup_tokenizer(tokenizer, model, train_src, pretraining)
        self.raw = self._setup_model(model)
        self.config = self.raw.config
        if len(self.tokenizer) > self.config.vocab_size:
            raise MuError(f"the tokenizer has {len(self.tokenizer)} tokens but the model's vocab_size is "
                          f"{self.config.vocab_size}")
        if cfg.objective == "span" and len(self.tokenizer) > self.config.vocab_size - NUM_SENTINELS:
            raise MuError(f"span corruption needs {NUM_SENTINELS} free ids at the top of the vocabulary: the model has "
                          f"{self.config.vocab_size} and the tokenizer {len(self.tokenizer)}")
        if train_dataset is None or (val_dataset is None and val_src is not None):  # what was not given ready
            built_train, built_val = build_datasets(cfg, self.tokenizer, self.config.vocab_size,
                                                    train_src if train_dataset is None else None,
                                                    val_src if val_dataset is None else None)
            train_dataset = built_train if train_dataset is None else train_dataset
            val_dataset = built_val if val_dataset is None else val_dataset
        self.train_data, self.val_data = train_dataset, val_dataset
        if len(self.train_data) == 0:
            raise MuError("the training data is empty")
        self.collator = Collator(self.config.arch, self.config.pad_token_id, bos_token_id=self._bos_id(),
                                 pad_to_multiple_of=8 if cfg.compile else 1)
        self._setup_budget()
        barrier(env)
        if env.is_main:  # only now: a run that failed on its data leaves no config behind looking like a run
            cfg.save(self.run_dir.config_path)
        barrier(env)

    # -- set-up ---------------------------------------------------------------------------------

    def _setup_run_dir(self) -> None:
        cfg, env, path = self.cfg, self.env, self.run_dir.config_path
        if not cfg.resume and self.run_dir.has_run():
            raise MuError(f"{self.out} already holds a run (checkpoints/); use another --out, remove it, or drop "
                          f"--no-resume to continue it")
        if path.exists() and cfg.resume and self.run_dir.has_run():  # every rank checks: all stop alike
            old = TrainConfig.from_dict(json.loads(path.read_text()), source=str(path))
            diff = {k: v for k, v in old.differences(cfg).items() if k not in RESUMABLE_CHANGES}
            if diff:
                items = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
                raise MuError(f"{self.out} holds a different run ({items}); use another --out to start a new "
                              f"one, or the same options to resume it")
        barrier(env)
        if env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        barrier(env)

    def _bos_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return 1 if bos is None else bos

    def _setup_tokenizer(self, tokenizer, model, train_src, pretraining: bool):
        cfg, env = self.cfg, self.env
        tok_dir = self.out / TOKENIZER_DIR
        if tokenizer is not None:
            return tokenizer
        from mu.tokenizer import has_tokenizer_files, load_tokenizer

        # a resumed run keeps its tokenizer (a trained BPE is not retrained)
        exists = self.resume_from is not None and has_tokenizer_files(tok_dir)
        barrier(env)  # every rank has looked before rank 0 writes: all take the same branch
        if exists:
            return load_tokenizer(tok_dir)
        spec = cfg.tokenizer
        if spec is None and cfg.init:
            if not has_tokenizer_files(cfg.init):
                raise MuError(f"--init {cfg.init} has no tokenizer files; pass --tokenizer")
            spec = cfg.init
        spec = spec or "byte"
        if env.is_main:
            def texts():
                if train_src is None:
                    raise MuError("--tokenizer bpe:N needs training text; pass a tokenizer with a prebuilt dataset")
                if pretraining:
                    return list(train_src)
                return [example_text(e, k) for e in train_src for k in ("source", "target")]

            _log(env, f"tokenizer: {spec}")
            tok = make_tokenizer(spec, texts)
            import shutil
            import tempfile

            tmp = Path(tempfile.mkdtemp(prefix=".tokenizer.tmp-", dir=self.out))
            tok.save_pretrained(tmp)
            if tok_dir.exists():
                shutil.rmtree(tok_dir)
            os.rename(tmp, tok_dir)
        barrier(env)
        return load_tokenizer(tok_dir)

    def _setup_model(self, model):
        cfg = self.cfg
        from mu.checkpoint import build_model, load_model
        from mu.utils import seed_everything

        seed_everything(cfg.seed)
        if model is None:
            if cfg.init:
                model = load_model(cfg.init, device="cpu", dtype="fp32")
                if model.config.arch != cfg.arch:
                    raise MuError(f"--init {cfg.init} is an {model.config.arch} model but --arch is {cfg.arch}")
                if cfg.model_overrides:
                    raise MuError("model overrides (e.g. --dropout) cannot change an --init model's config")
            else:
                overrides = dict(cfg.model_overrides)
                overrides.setdefault("vocab_size", model_vocab_size(self.tokenizer))
                model = build_model(cfg.preset, arch=cfg.arch, weight_init=cfg.weight_init, **overrides)
        model.tokenizer = self.tokenizer
        if self.resume is not None:
            model.load_state_dict(self.resume.model_state)
            model.tie_weights()
        model.train()
        return model

    def _setup_budget(self) -> None:
        b = plan_budget(self.cfg, self.env.world_size, self.train_data, self.config, self._epoch_batches)
        self.budget = b
        self.accum, self.micro_per_step, self.global_batch = b.accum, b.micro_per_step, b.global_batch
        self.steps_per_epoch, self.epoch_steps, self.total_steps = b.steps_per_epoch, b.epoch_steps, b.total_steps
        self.est_tokens_per_step, self.est_flops_per_step = b.est_tokens_per_step, b.est_flops_per_step
        cfg = self.cfg
        self.schedule = LRSchedule(cfg.lr, self.total_steps, warmup_steps(cfg.warmup, self.total_steps),
                                   cfg.schedule, cfg.min_lr_ratio, cfg.decay_fraction)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        cfg = self.cfg
        return epoch_batches(self.train_data.lengths(self.config.arch), cfg.batch_size, cfg.seed, epoch,
                             cfg.group_by_length)

    def _collate(self, features: list[dict]) -> dict:
        batch = self.collator(features)
        if self.batch_hook is not None:
            batch = self.batch_hook(batch, features)
        return move_batch(batch, self.env.device)

    # -- stopping -------------------------------------------------------------------------------

    def _stop_reason(self) -> Optional[str]:
        return self.budget.stop_reason(self.state)

    # -- checkpoints ----------------------------------------------------------------------------

    def _full_model_state(self) -> dict[str, Tensor]:
        if self.env.strategy != "fsdp":
            return self.raw.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _save_model_dir(self, directory: Path, state: Optional[dict[str, Tensor]] = None) -> None:
        """Write a `mu.load_model` directory (rank 0); `state` from `_full_model_state` (all ranks under FSDP)."""
        if self.env.strategy != "fsdp":
            self.raw.save_pretrained(directory)
            return
        from mu.checkpoint import model_class

        with torch.device("meta"):
            m = model_class(self.config)(self.config)
        m.load_state_dict(state, strict=True, assign=True)
        m.tie_weights()
        m.tokenizer = self.tokenizer
        m.save_pretrained(directory)

    def save_checkpoint(self) -> Optional[Path]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        env = self.env
        model_state = self._full_model_state() if env.strategy == "fsdp" else None
        optim_state = get_optimizer_state_dict(self.model, self.optimizer,
                                               options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        rngs = all_gather_object(ckpt.rng_state(env.device), env)
        state = {"optimizer": optim_state, "schedule": self.schedule.state_dict(), "rng": rngs,
                 "world_size": env.world_size, "train": asdict(self.state), "format": 1}
        return self.run_dir.save_checkpoint(self.state.step, lambda d: self._save_model_dir(d, model_state), state)

    def _restore(self) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        env = self.env
        saved = self.resume.state
        set_optimizer_state_dict(self.model, self.optimizer, saved["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        self.state = TrainState(**saved["train"])
        if saved.get("world_size") == env.world_size:
            ckpt.set_rng_state(saved["rng"][env.rank], env.device)
        else:
            _log(env, f"note: the checkpoint was written by {saved.get('world_size')} process(es), this run has "
                      f"{env.world_size}: RNG states are re-seeded, the data position is kept")
            torch.manual_seed(self.cfg.seed + 1000 * self.state.step + env.rank)

    # -- evaluation -----------------------------------------------------------------------------

    def validate(self) -> dict[str, Any]:
        """Validation loss (token mean, all processes), a few greedy samples and the task metric (rank 0)."""
        return Validator(self.cfg, self.env, self.model, self.raw, self.tokenizer, self.val_data, self.val_examples,
                         self._collate, self.loss_fn, self.autocast).validate()

    def _is_better(self, value: float) -> bool:
        best = self.state.best_metric
        lower = self.cfg.best_metric in ("val_loss", "val_ppl")
        return best is None or (value < best if lower else value > best)

    def _after_validation(self, result: dict[str, Any], metrics: MetricsLog) -> None:
        s = self.state
        value = result.get(self.cfg.best_metric)
        record = {"event": "eval", "step": s.step, "tokens": s.tokens, "flops": s.flops,
                  **{k: v for k, v in result.items()}}
        if value is not None and math.isfinite(value) and self._is_better(value):
            s.best_metric, s.best_step = float(value), s.step
            state = self._full_model_state() if self.env.strategy == "fsdp" else None
            if self.env.is_main:
                self._save_model_dir(self.out / BEST_DIR, state)
            barrier(self.env)
            record["new_best"] = True
        metrics.write(record)
        if self.env.is_main:
            msg = f"step {s.step}: val_loss {result['val_loss']:.4f}"
            if self.cfg.best_metric != "val_loss" and value is not None:
                msg += f", {self.cfg.best_metric} {value:.4f}"
            self._write(msg + (" (best)" if record.get("new_best") else ""))
            for smp in result.get("samples", []):
                self._write(f"  target: {smp['target'][:120]!r}\n  output: {smp['prediction'][:120]!r}")

    def _write(self, msg: str) -> None:
        if self.env.is_main:
            from tqdm.auto import tqdm

            tqdm.write(msg, file=sys.stderr)

    # -- the run --------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        cfg, env = self.cfg, self.env
        device = env.device
        self.raw.to(device)
        self.amp_dtype, self.precision_note = choose_precision(cfg.precision, device)
        fsdp_dtype = self.amp_dtype if env.strategy == "fsdp" else None
        if cfg.compile:
            self.raw.compile()
        self.model = wrap_model(self.raw, env, fsdp_dtype)
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay, cfg.adam_betas, cfg.adam_eps, device)
        resumed_from = None
        if self.resume_from is not None:
            self._restore()
            resumed_from = self.state.step
            _log(env, f"resuming from {self.resume_from} (step {self.state.step}, {self.state.tokens:,} tokens, "
                      f"{self.state.flops:.3g} FLOPs)")
        else:
            torch.manual_seed(cfg.seed + env.rank)  # dropout differs across processes
        metrics = self.run_dir.metrics(resumed_from)
        p = flops_params(self.config)
        info = {"event": "start", "step": self.state.step, "arch": self.config.arch, "params": p.total,
                "params_per_encoder_token": p.encoder, "params_per_decoder_token": p.decoder,
                "vocab_size": self.config.vocab_size, "world_size": env.world_size, "strategy": env.strategy,
                "batch_size": cfg.batch_size, "grad_accum": self.accum, "global_batch_size": self.global_batch,
                "train_examples": len(self.train_data), "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps, "est_flops_per_step": self.est_flops_per_step,
                "precision": self.precision_note, "resumed_from": resumed_from}
        metrics.write(info)
        _log(env, f"{self.config.arch} {cfg.preset if not cfg.init else cfg.init}: {p.total / 1e6:.2f}M parameters, "
                  f"vocab {self.config.vocab_size}; {len(self.train_data)} training examples, global batch "
                  f"{self.global_batch} ({cfg.batch_size} x {self.accum} accumulation x {env.world_size} "
                  f"process(es)), {self.total_steps} steps ({self.steps_per_epoch}/epoch), "
                  f"~{self.est_flops_per_step * self.total_steps:.3g} FLOPs, {info['precision']}, {env.strategy}")
        stop = self._loop(metrics)
        return self._finish(stop, metrics, resumed_from)

    def autocast(self):
        if self.amp_dtype is None or self.env.strategy == "fsdp":
            return nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.amp_dtype)

    def _loop(self, metrics: MetricsLog) -> str:
        cfg, env, s = self.cfg, self.env, self.state
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total_steps, initial=s.step, disable=not (env.is_main and cfg.progress),
                   unit="step", dynamic_ncols=True, file=sys.stderr)
        batches = self._epoch_batches(s.epoch)
        window_t, window_tokens = time.perf_counter(), 0
        stop = self._stop_reason()
        signals = StopSignals().__enter__()  # SIGTERM/SIGINT: a checkpoint at the end of this step, then stop
        try:
            while stop is None:
                if s.batch_in_epoch + self.micro_per_step > len(batches):
                    s.epoch, s.batch_in_epoch = s.epoch + 1, 0
                    batches = self._epoch_batches(s.epoch)
                step_batches = batches[s.batch_in_epoch:s.batch_in_epoch + self.micro_per_step]
                mine = step_batches[env.rank::env.world_size]  # this process's share of the global batch
                t0 = time.perf_counter()
                stats = self._step([self._collate([self.train_data.get(i, s.epoch) for i in b]) for b in mine])
                s.batch_in_epoch += self.micro_per_step
                dt = time.perf_counter() - t0
                s.elapsed_s += dt
                window_tokens += stats["tokens"]
                bar.update(1)
                if s.step % cfg.log_every == 0 or s.step == 1:
                    now = time.perf_counter()
                    tps = window_tokens / max(now - window_t, 1e-9)
                    window_t, window_tokens = now, 0
                    metrics.write({"event": "train", "step": s.step, "epoch": s.epoch + s.batch_in_epoch /
                                   max(len(batches), 1), "loss": stats["loss"], "lr": stats["lr"],
                                   "grad_norm": stats["grad_norm"], "tokens": s.tokens, "enc_tokens": s.enc_tokens,
                                   "dec_tokens": s.dec_tokens, "loss_tokens": s.loss_tokens, "flops": s.flops,
                                   "examples": s.examples, "tokens_per_s": tps, "step_time_s": dt,
                                   "elapsed_s": s.elapsed_s, **stats["extra"]})
                    bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{stats['lr']:.2e}", tok_s=f"{tps:,.0f}")
                stop = self._stop_reason()
                if self.val_data is not None and cfg.eval_every and s.step % cfg.eval_every == 0 and stop is None:
                    self._after_validation(self.validate(), metrics)
                interrupted = any_rank(signals.requested, env)
                if (interrupted or cfg.save_every and s.step % cfg.save_every == 0) and stop is None:
                    path = self.save_checkpoint()
                    if interrupted:
                        metrics.write({"event": "interrupted", "step": s.step, "checkpoint": str(path)})
                        raise signals.interrupted(s.step, path)
                if self.on_step is not None:
                    self.on_step(s)
        finally:
            signals.__exit__(None, None, None)
            bar.close()
        return stop

    def _step(self, micro: list[dict]) -> dict[str, Any]:
        s = self.state
        lr = self.schedule(s.step)
        set_lr(self.optimizer, lr)
        r = train_step(self.model, self.optimizer, micro, self.loss_fn, self.env, grad_clip=self.cfg.grad_clip,
                       autocast=self.autocast, on_diverged=self._diverged,
                       counters=lambda b: (int(b.get("n_enc_tokens", 0)), int(b.get("n_dec_tokens", 0)),
                                           len(b["targets"])))
        enc, dec, n_ex = r.sums
        s.step += 1
        s.enc_tokens += int(enc)
        s.dec_tokens += int(dec)
        s.examples += int(n_ex)
        s.loss_tokens += int(r.loss_tokens)
        s.flops += training_flops(self.config, enc, dec)
        s.last_loss = r.loss
        return {"loss": r.loss, "lr": lr, "grad_norm": r.grad_norm, "tokens": enc + dec, "extra": r.extra}

    def _diverged(self, what: str, value: float) -> None:
        last = self.run_dir.latest()
        where = (f"the last good checkpoint is {last} (re-run the same command to resume from it, e.g. with a "
                 f"lower --lr)" if last else "no checkpoint was saved yet")
        raise TrainingDiverged(f"the training {what} is {value} at step {self.state.step + 1}; stopped before the "
                               f"optimizer step. {where}")

    def _finish(self, stop: str, metrics: MetricsLog, resumed_from: Optional[int]) -> TrainResult:
        env, s = self.env, self.state
        val = {}
        if self.val_data is not None:
            val = self.validate()
            self._after_validation(val, metrics)
        found = self.run_dir.checkpoints()
        if not found or found[-1][0] != s.step:
            self.save_checkpoint()
        state = self._full_model_state() if env.strategy == "fsdp" else None
        if env.is_main:
            self._save_model_dir(self.out / FINAL_DIR, state)
        barrier(env)
        result = TrainResult(
            out_dir=str(self.out), final_dir=str(self.out / FINAL_DIR),
            best_dir=str(self.out / BEST_DIR) if s.best_step is not None else None, arch=self.config.arch,
            params=flops_params(self.config).total, steps=s.step,
            epochs=s.epoch + s.batch_in_epoch / max(1, self.steps_per_epoch * self.micro_per_step),
            examples=s.examples, enc_tokens=s.enc_tokens, dec_tokens=s.dec_tokens, loss_tokens=s.loss_tokens,
            flops=s.flops, train_loss=s.last_loss, val_loss=val.get("val_loss"),
            val_metrics={k: v for k, v in val.items() if isinstance(v, (int, float))},
            best_metric=s.best_metric, best_step=s.best_step, stop_reason=stop, resumed_from=resumed_from,
            precision=self.precision_note,
            elapsed_s=s.elapsed_s, tokens_per_s=s.tokens / s.elapsed_s if s.elapsed_s else 0.0)
        metrics.write({"event": "end", "step": s.step, **result.to_dict()})
        if env.is_main:
            ckpt.atomic_write_text(self.out / RESULT_FILE, json.dumps(result.to_dict(), indent=2) + "\n")
            _log(env, f"done ({stop}): {s.step} steps, {s.tokens:,} tokens ({s.enc_tokens:,} encoder + "
                      f"{s.dec_tokens:,} decoder), {s.flops:.3g} FLOPs, {result.tokens_per_s:,.0f} tokens/s; "
                      f"model in {result.final_dir}")
        return result


def train(cfg: TrainConfig, *, model: Optional[nn.Module] = None, tokenizer=None, train_dataset=None,
          val_dataset=None, train_examples: Optional[Sequence[Any]] = None,
          val_examples: Optional[Sequence[Any]] = None, loss_fn: Optional[LossFn] = None,
          batch_hook: Optional[BatchHook] = None,
          on_step: Optional[Callable[[TrainState], None]] = None) -> TrainResult:
    """Train (or resume) the run `cfg` describes; see the module docstring and docs/training.md.

    Data comes from `cfg.train_data`/`cfg.val_data` unless given: `train_examples`/`val_examples`
    (`Example`s for fine-tuning, strings for pretraining), or ready `train_dataset`/`val_dataset`
    (objects with `__len__`, `get(i, epoch) -> feature` and `lengths(arch)`, e.g. `FeatureDataset`).
    `model`/`tokenizer` replace the preset/--init model and the --tokenizer.
    """
    have_val = val_dataset is not None or val_examples is not None
    cfg.validate(have_train_data=train_dataset is not None or train_examples is not None, have_val_data=have_val)
    env = init_distributed(cfg.device, cfg.distributed)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*returned a view tensor.*")  # FSDP2 on cross_kv
            trainer = Trainer(cfg, env, model=model, tokenizer=tokenizer, train_dataset=train_dataset,
                              val_dataset=val_dataset, train_examples=train_examples, val_examples=val_examples,
                              loss_fn=loss_fn, batch_hook=batch_hook, on_step=on_step)
            try:
                return trainer.run()
            except BaseException:
                trainer.run_dir.discard_if_empty()
                raise
    finally:
        shutdown(env)
