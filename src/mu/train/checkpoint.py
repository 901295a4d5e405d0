"""Training checkpoints: written atomically, read without executing pickles.

    DIR/checkpoints/step_00000200/
        model/               config.json + model.safetensors (+ tokenizer): `mu.load_model` reads it
        trainer_state.pt     optimizer, schedule, RNG states of every rank, step, data position,
                             counters, best score; read with torch.load(weights_only=True)

A checkpoint is built in `checkpoints/.tmp-step_N` and renamed into place only when complete,
so a run killed mid-save leaves the previous checkpoint as the latest one. Older checkpoints
beyond `keep` are deleted after the new one is in place.
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from mu.atomic import atomic_write_text  # noqa: F401 (trainer, demo and VQA write through it)
from mu.errors import MuError
from mu.model.io import load_weights

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.pt"
MODEL_DIR = "model"
WEIGHTS_FILE = "model.safetensors"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / STATE_FILE).is_file() and (p / MODEL_DIR).is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out_dir: Path) -> Optional[Path]:
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def _disk_full(e: BaseException) -> bool:
    """Whether a write failed for want of space (an OSError, or the RuntimeError / SafetensorError that
    torch.save and safetensors turn it into)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return "No space left on device" in text or "code: 28" in text or "Disk quota exceeded" in text


def save_checkpoint(out_dir: Path, step: int, save_model, state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint `step`: `save_model(dir)` writes the model directory, `state` goes to trainer_state.pt.

    Built in a temporary directory and renamed into place when complete. A full disk raises a `MuError` naming
    the directory; the temporary directory is removed and the previous checkpoint is left as it was."""
    root = Path(out_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step_{step:08d}-", dir=root))
    try:
        save_model(tmp / MODEL_DIR)
        torch.save(state, tmp / STATE_FILE)
        if final.exists():  # re-saving the same step (e.g. a resumed run that had nothing left to do)
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        low = shutil.disk_usage(root).free < 64 * 1024 * 1024  # torch.save's "file write failed" names no cause
        if _disk_full(e) or (isinstance(e, (OSError, RuntimeError)) and "write" in str(e) and low):
            prev = latest_checkpoint(out_dir)
            kept = f"the previous checkpoint {prev} is intact" if prev else "no earlier checkpoint exists"
            raise MuError(f"no space left on the device holding {root} while writing the checkpoint of step {step} "
                          f"({type(e).__name__}: {str(e)[:200]}); {kept}; free some space and re-run the same "
                          f"command to resume") from None
        raise
    for _, old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    path = Path(checkpoint) / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unreadable or not ours: say which file
        raise MuError(f"{path}: not a readable mu trainer state ({type(e).__name__}: {e})") from None


def load_model_state(checkpoint: Path, weights_file: str = WEIGHTS_FILE) -> dict[str, torch.Tensor]:
    """The checkpoint's model weights, with tied lm_head weights restored (text models and VLMs alike)."""
    return load_weights(Path(checkpoint) / MODEL_DIR, weights_file)


# -- RNG states (plain lists and tensors, so weights_only loading accepts them) ----------------------


def rng_state(device: torch.device) -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                       int(np_state[3]), float(np_state[4])],
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
