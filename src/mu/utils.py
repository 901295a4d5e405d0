"""Small shared helpers: device selection and seeding (done once, at entry points)."""

from __future__ import annotations

import os
import random
from typing import Optional

import torch

from mu.errors import MuError


def pick_device(name: Optional[str] = None) -> torch.device:
    """'auto'/None -> CUDA when available, else CPU; otherwise the named device, checked."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MuError(f"unknown device {name!r}; expected cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MuError(f"device {name!r} requested but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise MuError(f"device {name!r} requested but this machine has {torch.cuda.device_count()} CUDA device(s) "
                      f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if device.type not in ("cpu", "cuda", "mps"):
        raise MuError(f"device {name!r}: expected cpu, cuda, cuda:N or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise MuError(f"device {name!r} requested but MPS is not available on this machine")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass
    torch.manual_seed(seed)


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """bf16 where the device supports it (CUDA with bf16, or a CPU with AVX-512 bf16), else None (fp32)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        try:
            return torch.bfloat16 if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
        except (AttributeError, RuntimeError):
            return None
    return None
