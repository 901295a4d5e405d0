"""Models and their files: build from presets, save our directory format, load it or the paper's `.pt`.

Our format: a directory with `config.json` (MuConfig fields + arch), `model.safetensors`
(tied `lm_head.weight` omitted) and optional tokenizer files, written atomically (`mu.atomic`).
The paper's format: `torch.save({"model_state_dict": ..., "model_config": asdict(MuConfig)})`,
usually bf16; read with `weights_only=True` (no arbitrary pickles are executed).

This module sits below the model classes (`MuModel.save_pretrained` writes through it); the classes
enter `ARCHITECTURES` when `mu.model` is imported, so building and loading need no import cycle.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mu.atomic import atomic_directory
from mu.config import SHAPE_FIELDS, MuConfig
from mu.errors import MuError
from mu.model.fast import huge_pages_
from mu.model.quantize import split_format
from mu.tokenizer import has_tokenizer_files, load_tokenizer

if TYPE_CHECKING:
    from mu.model.base import MuModel

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1
TIED_KEYS = ("lm_head.weight",)  # left out of the weights file: the head shares the embedding
ARCHITECTURES: dict[str, type["MuModel"]] = {}  # arch -> model class, filled by mu/model/__init__.py

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


def model_class(config: MuConfig) -> type["MuModel"]:
    return ARCHITECTURES[config.arch]


def build_model(preset: str | MuConfig = "tiny", arch: str = "encdec", weight_init: str = "paper",
                **overrides: Any) -> "MuModel":
    """A randomly initialised model from a preset name (or a config) with field overrides;
    `weight_init` "paper" (N(0, 0.02)) or "fan_in" (N(0, 1/sqrt(fan_in)), better for tiny widths)."""
    config = (preset.replace(**overrides) if isinstance(preset, MuConfig)
              else MuConfig.from_name(preset, arch, **overrides))
    model = model_class(config)(config)
    if weight_init != "paper":
        model.init_weights(weight_init)
    return model


def tie_lm_head(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of `state` with the tied `lm_head.weight` (left out of our weights file) put back, also under a
    prefix (a VLM's `lm.`)."""
    state = dict(state)
    for key in [k for k in state if k.endswith("transformer.wte.weight")]:
        state.setdefault(key[:-len("transformer.wte.weight")] + "lm_head.weight", state[key])
    return state


def _from_state_dict(config: MuConfig, state: dict[str, torch.Tensor], source: str) -> "MuModel":
    with torch.device("meta"):
        model = model_class(config)(config)
    state = tie_lm_head(state)
    problem = _state_dict_problem(model.state_dict(), state)
    if problem:
        raise MuError(f"{source}: weights do not match the config: {problem}")
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    return model


def safe_torch_load(path: str | os.PathLike, **kwargs: Any) -> Any:
    """`torch.load(path, weights_only=True)`: tensors and plain containers only, never code.

    A pickle that would import anything else (a code payload) is refused with a one-line MuError naming
    the file and what it tried to import; an unreadable file gets one naming the file and the problem.
    """
    try:
        with warnings.catch_warnings():  # the weights-only unpickler warns about protocols it then refuses
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=kwargs.pop("map_location", "cpu"), weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        raise pickle_refusal(path, e) from None
    except IsADirectoryError:
        raise MuError(f"{path}: is a directory, expected a .pt file") from None
    except FileNotFoundError:
        raise MuError(f"no such file: {str(path)!r}") from None
    except Exception as e:  # torch.load raises many types (RuntimeError, EOFError, IndexError...) on bad files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MuError(f"{path}: not a readable PyTorch checkpoint ({first.split('. ')[0].rstrip('.')})") from None


def pickle_refusal(path: str | os.PathLike, error: Exception) -> MuError:
    """The one-line MuError for a pickle that `torch.load(weights_only=True)` (ours, or a library's such as
    transformers' or peft's) refused to unpickle: it names the file and what the pickle tried to import."""
    text = str(error)
    found = re.search(r"unsupported GLOBAL (\S+)", text, re.IGNORECASE)
    if found:
        what = f"it would import {found.group(1)}, which could run code"
    else:
        detail = re.search(r"WeightsUnpickler error: \s*(.+)", text)
        what = (f"it holds more than tensors and plain containers "
                f"({detail.group(1).strip() if detail else 'unsupported pickle content'})")
    return MuError(f"{path}: refused to unpickle: {what}; checkpoints are read with torch.load(weights_only=True), "
                   f"which never runs code")


def _state_dict_problem(expected: dict[str, torch.Tensor], found: dict[str, Any]) -> str:
    """'' when `found` has exactly the tensors (names and shapes) of `expected`, else the first difference
    and how many there are, on one line."""
    problems = [f"{k} is missing" for k in expected if k not in found]
    problems += [f"{k} is not in this architecture" for k in found if k not in expected]
    problems += [f"{k} has shape {tuple(found[k].shape)} in the file but {tuple(v.shape)} by the config"
                 for k, v in expected.items() if k in found and tuple(found[k].shape) != tuple(v.shape)]
    if not problems:
        return ""
    return problems[0] + (f" (and {len(problems) - 1} more differences)" if len(problems) > 1 else "")


def load_reference_checkpoint(path: str | os.PathLike) -> tuple[MuConfig, dict[str, torch.Tensor]]:
    """Read the paper's `.pt` file safely -> (config, state_dict)."""
    path = Path(path)
    obj = safe_torch_load(path)
    if not isinstance(obj, dict) or "model_state_dict" not in obj:
        keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise MuError(f"{path}: expected the paper's format {{'model_state_dict', 'model_config'}}, found {keys}")
    if "model_config" not in obj:
        raise MuError(f"{path}: no 'model_config' (the paper's format holds 'model_state_dict' and 'model_config', "
                      f"a dict of MuConfig fields)")
    cfg = obj["model_config"]
    if not isinstance(cfg, dict):
        raise MuError(f"{path}: 'model_config' should be a dict of MuConfig fields, found {type(cfg).__name__}")
    state = obj["model_state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MuError(f"{path}: 'model_state_dict' should map parameter names to tensors")
    return MuConfig.from_dict(cfg, source=f"{path}: model_config", required=SHAPE_FIELDS), state


def load_model(path: str | os.PathLike, device: Optional[str | torch.device] = None,
               dtype: Optional[str | torch.dtype] = None, tokenizer: Any = None) -> "MuModel":
    """Load a model from our directory format or the paper's `.pt` file, in eval mode.

    `dtype=None` keeps the stored dtype; "int8", "int8wo" or "int4" load fp32 weights and quantize them
    (`mu.model.quantize`); "auto" picks the fastest format the device supports (`auto_format`). A
    tokenizer saved in the directory is attached as `model.tokenizer` (or pass one).
    """
    path = Path(path)
    dtype, quantization = split_format(dtype, device)
    dtype = parse_dtype(dtype)
    if path.is_dir():
        model = _load_directory(path)
        if tokenizer is None and has_tokenizer_files(path):
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
    if quantization:
        model.quantize_(quantization)
    if model.device.type == "cpu":  # (here, not in the first `generate`'s first token)
        huge_pages_(model)
    model.tokenizer = tokenizer
    return model.eval()


def read_config_json(cfg_file: Path) -> Any:
    """A model directory's config.json, parsed; not JSON is a one-line MuError naming the file."""
    try:
        return json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MuError(f"{cfg_file}: not valid JSON ({e})") from None


def _load_directory(path: Path) -> "MuModel":
    cfg_file, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    for f in (cfg_file, weights):
        if not f.is_file():
            raise MuError(f"{path}: missing {f.name} (a model directory holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    raw = read_config_json(cfg_file)
    if not isinstance(raw, dict):
        raise MuError(f"{cfg_file}: expected a JSON object of MuConfig fields")
    raw = {k: v for k, v in raw.items() if k not in ("model_type", "mu_format", *HF_KEYS)}
    config = MuConfig.from_dict(raw, source=str(cfg_file), required=SHAPE_FIELDS)
    return _from_state_dict(config, load_weights(path), str(weights))


def load_weights(directory: str | os.PathLike, weights_file: str = WEIGHTS_FILE) -> dict[str, torch.Tensor]:
    """The tensors of a model directory's weights file, tied `lm_head.weight` included."""
    weights = Path(directory) / weights_file
    try:
        return tie_lm_head(load_file(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise MuError(f"{weights}: not a readable safetensors file ({e})") from None


def write_model_dir(directory: str | os.PathLike, state: dict[str, torch.Tensor], config: dict[str, Any],
                    tokenizer: Any, skip: tuple[str, ...] = ()) -> Path:
    """Write `config.json` + `model.safetensors` (+ tokenizer files) into `directory` atomically
    (see `mu.atomic.atomic_directory`). Keys in `skip` (tied weights) are left out of the weights file.
    """
    with atomic_directory(directory) as tmp:
        weights = {k: v.detach().contiguous().cpu() for k, v in state.items() if k not in skip}
        save_file(weights, tmp / WEIGHTS_FILE, metadata={"format": "pt", "mu_format": str(FORMAT_VERSION)})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(directory)


def save_model(model: "MuModel", directory: str | os.PathLike) -> Path:
    """`model.save_pretrained(directory)`: our directory format, tied head left out, tokenizer along."""
    if model.quantization:
        raise MuError(f"cannot save a {model.quantization}-quantized model (quantization is an inference-time "
                      "transform): save the float model and call quantize_ after loading it")
    config = {"model_type": "mu", "mu_format": FORMAT_VERSION, **model.config.to_dict()}
    return write_model_dir(directory, model.state_dict(), config, model.tokenizer, skip=TIED_KEYS)


def convert_reference(src: str | os.PathLike, out_dir: str | os.PathLike, tokenizer: Any = None,
                      dtype: Optional[str | torch.dtype] = None) -> Path:
    """Convert the paper's `.pt` checkpoint to our directory format (optionally with a tokenizer)."""
    src = Path(src)
    if src.is_dir():
        raise MuError(f"{src}: is a directory; convert-reference reads the paper's .pt file (a mu model directory "
                      f"needs no conversion)")
    if not src.is_file():
        raise MuError(f"no checkpoint file at {str(src)!r}")
    model = load_model(src, dtype=dtype, tokenizer=tokenizer)
    return model.save_pretrained(out_dir)
