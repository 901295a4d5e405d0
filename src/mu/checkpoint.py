"""Build models from presets; load our directory format or the paper's `.pt` checkpoints.

Our format: a directory with `config.json` (MuConfig fields + arch), `model.safetensors`
(tied `lm_head.weight` omitted) and optional tokenizer files.
The paper's format: `torch.save({"model_state_dict": ..., "model_config": asdict(MuConfig)})`,
usually bf16; read with `weights_only=True` (no arbitrary pickles are executed).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

from mu.config import MuConfig
from mu.errors import MuError
from mu.model.base import CONFIG_FILE, WEIGHTS_FILE, MuModel

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
REFERENCE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
HF_KEYS = ("auto_map", "custom_pipelines")  # what `mu export hf` adds to config.json for transformers


def parse_dtype(dtype: Optional[str | torch.dtype]) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise MuError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def model_class(config: MuConfig) -> type[MuModel]:
    from mu.model.decoder_only import MuDecoderOnly
    from mu.model.encoder_decoder import MuEncoderDecoder

    return MuEncoderDecoder if config.arch == "encdec" else MuDecoderOnly


def build_model(preset: str | MuConfig = "tiny", arch: str = "encdec", weight_init: str = "paper",
                **overrides: Any) -> MuModel:
    """A randomly initialised model from a preset name (or a config) with field overrides;
    `weight_init` "paper" (N(0, 0.02)) or "fan_in" (N(0, 1/sqrt(fan_in)), better for tiny widths)."""
    config = preset.replace(**overrides) if isinstance(preset, MuConfig) else MuConfig.from_name(preset, arch, **overrides)
    model = model_class(config)(config)
    if weight_init != "paper":
        model.init_weights(weight_init)
    return model


def _from_state_dict(config: MuConfig, state: dict[str, torch.Tensor], source: str) -> MuModel:
    with torch.device("meta"):
        model = model_class(config)(config)
    state = dict(state)
    if "lm_head.weight" not in state and "transformer.wte.weight" in state:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise MuError(f"{source}: weights do not match the config: {e}") from None
    model.tie_weights()
    return model


def load_reference_checkpoint(path: str | os.PathLike) -> tuple[MuConfig, dict[str, torch.Tensor]]:
    """Read the paper's `.pt` file safely -> (config, state_dict)."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types (UnpicklingError, RuntimeError, IndexError...) on bad files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MuError(f"{path}: not a readable PyTorch checkpoint ({first})") from None
    if not isinstance(obj, dict) or "model_state_dict" not in obj:
        keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise MuError(f"{path}: expected the paper's format {{'model_state_dict', 'model_config'}}, found {keys}")
    cfg = obj.get("model_config") or {}
    if not isinstance(cfg, dict):
        raise MuError(f"{path}: 'model_config' should be a dict of MuConfig fields, found {type(cfg).__name__}")
    return MuConfig.from_dict(cfg, source=f"{path}: model_config"), obj["model_state_dict"]


def load_model(path: str | os.PathLike, device: Optional[str | torch.device] = None,
               dtype: Optional[str | torch.dtype] = None, tokenizer: Any = None) -> MuModel:
    """Load a model from our directory format or the paper's `.pt` file, in eval mode.

    `dtype=None` keeps the stored dtype. A tokenizer saved in the directory is attached
    as `model.tokenizer` (or pass one).
    """
    path = Path(path)
    dtype = parse_dtype(dtype)
    if path.is_dir():
        model = _load_directory(path)
        if tokenizer is None:
            from mu.tokenizer import has_tokenizer_files, load_tokenizer

            if has_tokenizer_files(path):
                tokenizer = load_tokenizer(path)
    elif path.is_file():
        if path.suffix not in REFERENCE_SUFFIXES:
            raise MuError(f"{path}: expected a model directory (config.json + model.safetensors) or a paper "
                          f"checkpoint ending in {REFERENCE_SUFFIXES}")
        config, state = load_reference_checkpoint(path)
        model = _from_state_dict(config, state, str(path))
    else:
        raise MuError(f"no model at {str(path)!r}: expected a directory written by `save_pretrained`/`mu train`, "
                      f"or a paper checkpoint (.pt)")
    model.to(device=device, dtype=dtype)
    model.tokenizer = tokenizer
    return model.eval()


def _load_directory(path: Path) -> MuModel:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg_file, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    for f in (cfg_file, weights):
        if not f.is_file():
            raise MuError(f"{path}: missing {f.name} (a model directory holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        raw = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MuError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise MuError(f"{cfg_file}: expected a JSON object of MuConfig fields")
    raw = {k: v for k, v in raw.items() if k not in ("model_type", "mu_format", *HF_KEYS)}
    config = MuConfig.from_dict(raw, source=str(cfg_file))
    try:
        state = load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise MuError(f"{weights}: not a readable safetensors file ({e})") from None
    return _from_state_dict(config, state, str(weights))


def convert_reference(src: str | os.PathLike, out_dir: str | os.PathLike, tokenizer: Any = None,
                      dtype: Optional[str | torch.dtype] = None) -> Path:
    """Convert the paper's `.pt` checkpoint to our directory format (optionally with a tokenizer)."""
    src = Path(src)
    if not src.is_file():
        raise MuError(f"no checkpoint file at {str(src)!r}")
    model = load_model(src, dtype=dtype, tokenizer=tokenizer)
    return model.save_pretrained(out_dir)
