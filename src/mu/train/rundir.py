"""A run directory, shared by every training loop (text, VQA, LoRA): config, metrics, checkpoints, resume.

    run = RunDir("runs/x", env)
    point = run.resume_point(log)              # newest readable checkpoint (falls back past a corrupt one)
    metrics = run.metrics(point.step if point else None)
    with StopSignals() as stop:
        ... train_step(...) ...
        if stop.requested: run.save_checkpoint(step, save_model, state); raise stop.interrupted(...)

    DIR/train_config.json   what the run is (a re-run with other settings is refused)
    DIR/metrics.jsonl       one JSON object per log / eval record (a resumed run drops records past its checkpoint)
    DIR/checkpoints/step_N  model/ + trainer_state.pt, written atomically (mu.train.checkpoint)

Faults: SIGTERM/SIGINT during training -> a checkpoint of the current step, then `TrainingInterrupted`
(exit status 128 + signal); a corrupt newest checkpoint -> the previous one, said on stderr; a full disk
while saving -> a `MuError` naming the directory, the previous checkpoint intact.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from mu.errors import MuError
from mu.train import checkpoint as ckpt
from mu.train.distributed import DistEnv, barrier

CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"


def log(env: Optional[DistEnv], msg: str) -> None:
    """A line on stderr from the main process."""
    if env is None or env.is_main:
        print(msg, file=sys.stderr, flush=True)


@dataclass
class ResumePoint:
    step: int
    path: Path  # checkpoints/step_N
    state: dict[str, Any]  # trainer_state.pt, loaded with weights_only
    model_state: dict[str, Any]  # the model's weights (safetensors)


class TrainingInterrupted(KeyboardInterrupt):
    """SIGTERM/SIGINT stopped training after a checkpoint; `exit_code` is 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopSignals:
    """Within the block, SIGTERM and SIGINT set `requested` instead of killing the process, so the loop can
    write a checkpoint at the end of the current step. A second SIGINT interrupts at once (KeyboardInterrupt).
    Outside the main thread it does nothing."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals, self.signum, self._old = signals, None, {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}

    def interrupted(self, step: int, checkpoint: Optional[Path]) -> TrainingInterrupted:
        name = signal.Signals(self.signum).name
        where = f"checkpoint {checkpoint} written" if checkpoint else "no checkpoint could be written"
        return TrainingInterrupted(f"{name} received: stopped after step {step}, {where}; re-run the same command "
                                   f"to resume", self.signum)


class MetricsLog:
    """metrics.jsonl, written by the main process; a resumed run drops the records after its checkpoint's step,
    a fresh run starts the file anew."""

    def __init__(self, path: Optional[Path], env: Optional[DistEnv] = None, resume_step: Optional[int] = None):
        self.path = Path(path) if path is not None else None  # None: records go nowhere
        self.enabled = self.path is not None and (env is None or env.is_main)
        if self.enabled and self.path.exists():
            if resume_step is None:
                self.path.unlink()
            else:
                kept = []
                for ln in self.path.read_text(encoding="utf-8").splitlines():
                    try:
                        if ln.strip() and json.loads(ln).get("step", 0) <= resume_step:
                            kept.append(ln)
                    except (json.JSONDecodeError, AttributeError):  # a line cut short by a kill
                        continue
                ckpt.atomic_write_text(self.path, "".join(ln + "\n" for ln in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def close(self) -> None:  # nothing held open; kept for callers that close
        pass


class RunDir:
    """One training run's directory: see the module docstring."""

    def __init__(self, path, env: Optional[DistEnv] = None, keep: int = 2):
        self.path, self.env, self.keep = Path(path), env or DistEnv(), keep

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    def checkpoints(self) -> list[tuple[int, Path]]:
        return ckpt.list_checkpoints(self.path)

    def latest(self) -> Optional[Path]:
        return ckpt.latest_checkpoint(self.path)

    def has_run(self) -> bool:
        return bool(self.checkpoints())

    def read_config(self) -> Optional[dict]:
        if not self.config_path.is_file():
            return None
        try:
            return json.loads(self.config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MuError(f"{self.config_path}: not valid JSON ({e})") from None

    def check_same_run(self, config: dict, resumable: frozenset | set = frozenset()) -> None:
        """Refuse to resume a run whose saved config differs from `config` (except the `resumable` keys)."""
        old = self.read_config()
        if old is None or not self.has_run():
            return
        diff = {k: (old.get(k), v) for k, v in config.items() if k not in resumable and old.get(k) != v}
        if diff:
            items = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
            raise MuError(f"{self.path} holds a different run ({items}); use another --out to start a new one, or "
                          f"the same options to resume it")

    def write_config(self, config: dict) -> None:
        if self.env.is_main:
            ckpt.atomic_write_text(self.config_path, json.dumps(config, indent=2, default=str) + "\n")
        barrier(self.env)

    def discard_if_empty(self) -> None:
        """After a failure: remove train_config.json and metrics.jsonl when no checkpoint was written, so a run that
        stopped before its first checkpoint (bad data found late, NaN at once) leaves nothing that looks like a run."""
        if self.env.is_main and not self.has_run():
            for name in (CONFIG_FILE, METRICS_FILE):
                (self.path / name).unlink(missing_ok=True)

    def write_json(self, name: str, obj: Any) -> Path:
        path = self.path / name
        if self.env.is_main:
            ckpt.atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")
        return path

    def metrics(self, resume_step: Optional[int] = None) -> MetricsLog:
        return MetricsLog(self.path / METRICS_FILE, self.env, resume_step)

    def resume_point(self, load_model: bool = True, weights_file: str = ckpt.WEIGHTS_FILE) -> Optional[ResumePoint]:
        """The newest checkpoint that reads back whole (trainer state and `model/<weights_file>`); a corrupt newer
        one is skipped with a note on stderr. None when there is none. Every checkpoint unreadable: a `MuError`
        naming them."""
        found = self.checkpoints()
        bad = []
        for step, path in reversed(found):
            try:
                state = ckpt.load_trainer_state(path)
                model_state = ckpt.load_model_state(path, weights_file) if load_model else {}
            except MuError as e:
                bad.append(str(e))
                log(self.env, f"warning: checkpoint {path} is unreadable ({e}); falling back to the previous one")
                continue
            if bad:
                log(self.env, f"resuming from {path} (step {step}) instead of the newer, unreadable checkpoint")
            return ResumePoint(step, path, state, model_state)
        if bad:
            raise MuError(f"{self.path}: no readable checkpoint ({'; '.join(bad)}); remove "
                          f"{self.path / ckpt.CHECKPOINTS} to start again")
        return None

    def save_checkpoint(self, step: int, save_model: Callable[[Path], Any], state: dict[str, Any]) -> Optional[Path]:
        """Write checkpoint `step` atomically (main process; the others wait). A full disk: `MuError` naming the
        directory, with the previous checkpoint left intact and no partial checkpoint behind."""
        path = None
        if self.env.is_main:
            path = ckpt.save_checkpoint(self.path, step, save_model, state, self.keep)
        barrier(self.env)
        return path
