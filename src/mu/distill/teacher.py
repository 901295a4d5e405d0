"""The distillation teacher: a frozen decoder-only model that scores target positions.

    teacher = load_teacher("runs/phi3-squad")                         # HF causal LM directory
    teacher = load_teacher("phi-3.5-mini", adapter="runs/lora")       # + a PEFT LoRA adapter, merged
    teacher = load_teacher("runs/lora")                               # an adapter dir whose base is local
    teacher = load_teacher("runs/teacher/final")                      # a `mu` decoder-only checkpoint
    teacher = load_teacher("teacher.pt", config_dir="phi-3.5-mini")   # the paper's LoRA-wrapped state dict
    logits = teacher.target_logits(input_ids, attention_mask, positions)   # (B, T, V_teacher), fp32

The teacher is put in eval mode with gradients off, in bf16 where the device runs bf16 matmuls
natively (CUDA with bf16, AVX-512-bf16 CPUs) and fp32 otherwise. Only the rows of the output layer
that are needed are computed: the final hidden states are gathered at `positions` first, so a
1024-token source does not cost a (B, 1024, 32064) logits tensor.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from mu.errors import MuError
from mu.model.io import load_model, parse_dtype, pickle_refusal, safe_torch_load
from mu.tokenizer import has_tokenizer_files, load_tokenizer
from mu.utils import auto_precision, pick_device, precision_note

ADAPTER_CONFIG = "adapter_config.json"

# LoRA target modules by architecture family: attention and MLP projections (the paper: Phi-3.5's
# qkv_proj, o_proj, gate_up_proj, down_proj). Matched against the names of the model's linear layers.
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),  # + Mistral, Qwen, Gemma
    "mu": ("q_linear", "k_linear", "v_linear", "out_linear", "fc1", "fc2"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "gpt_neox": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "phi": ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
}
LORA_DEFAULTS = dict(r=16, alpha=32, dropout=0.05)  # the paper's teacher adapter


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def lora_target_modules(model: nn.Module) -> list[str]:
    """Names of the attention + MLP projections to adapt, chosen by which known family's names the model has."""
    leaf_names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                  if (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D") and not name.endswith("lm_head")}
    best = max(LORA_TARGETS.values(), key=lambda names: sum(n in leaf_names for n in names))
    found = [n for n in best if n in leaf_names]
    if len(found) < 2:
        raise MuError(f"cannot tell which layers to adapt with LoRA in a {type(model).__name__} (its linear layers "
                      f"are named {sorted(leaf_names)[:12]}); pass the target module names explicitly "
                      f"(--lora-target-modules a,b,c)")
    return found


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MuError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(obj, dict):
        raise MuError(f"{path}: expected a JSON object")
    return obj


def _is_mu_dir(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    raw = _read_json(cfg)
    return raw.get("model_type") == "mu" or "mu_format" in raw


def _hf_dtype_kwarg() -> str:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


@contextmanager
def quiet_peft():
    """peft calls a transformers method that transformers 5 deprecates; the warning is not the user's concern."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


class Teacher:
    """A frozen causal LM (Hugging Face or `mu` decoder-only) that returns logits at chosen positions.

    kind: "hf" or "mu". `vocab_size` is the number of output logits (may differ from the student's).
    `tokenizer` is the tokenizer stored with the teacher, when there is one (used for the compatibility check).
    """

    def __init__(self, model: nn.Module, kind: str, tokenizer: Any = None, name: str = "teacher"):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.kind = kind
        self.tokenizer = tokenizer
        self.name = name
        self.precision = precision_note(self.dtype, "as given")  # load_teacher records how it chose
        if kind == "mu":
            if model.config.arch != "deconly":
                raise MuError(f"{name}: the teacher must be a decoder-only model; this mu checkpoint is "
                              f"arch={model.config.arch!r}")
            self.vocab_size = model.config.vocab_size
        else:
            self.vocab_size = model.get_output_embeddings().weight.shape[0]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device=None, dtype=None) -> "Teacher":
        self.model.to(device=device, dtype=dtype)
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def _hidden(self, input_ids: Tensor, attention_mask: Tensor) -> Optional[Tensor]:
        """Final hidden states (B, L, d), or None when the logits are not a plain linear map of them."""
        if self.kind == "mu":
            return self.model.hidden_states(input_ids, attention_mask)
        cfg = self.model.config
        if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
            return None
        base = self.model.base_model
        if base is self.model:
            return None
        return base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    @torch.inference_mode()
    def _target_logits(self, input_ids: Tensor, attention_mask: Tensor, positions: Tensor) -> Tensor:
        hidden = self._hidden(input_ids, attention_mask)
        idx = positions.clamp(min=0)
        if hidden is None:  # full logits, then gather
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            return logits.gather(1, idx[..., None].expand(-1, -1, logits.shape[-1])).float()
        h = hidden.gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, T, d)
        head = self.model.lm_head if self.kind == "mu" else self.model.get_output_embeddings()
        return head(h).float()

    def target_logits(self, input_ids: Tensor, attention_mask: Tensor, positions: Tensor) -> Tensor:
        """Logits (B, T, V_teacher) in fp32 at `positions` (B, T) of the right-padded `input_ids` (B, L).

        Runs under `torch.inference_mode`; the result is copied out so it can take part in the student's
        loss graph as a constant.
        """
        device = self.device
        out = self._target_logits(input_ids.to(device), attention_mask.to(device), positions.to(device))
        return out.clone()


# ---------------------------------------------------------------------------------------------
# Loading


def _load_hf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, trust_remote_code=False,
                                                    **{_hf_dtype_kwarg(): dtype})
    except pickle.UnpicklingError as e:  # a pytorch_model.bin that transformers' weights-only load refused
        raise pickle_refusal(path, e) from None
    except (OSError, ValueError, KeyError) as e:
        raise MuError(f"{path}: could not load a Hugging Face causal LM ({str(e).splitlines()[0]})") from None


def _base_of_adapter(adapter: Path, base: Optional[str | os.PathLike]) -> Path:
    if base is not None:
        return Path(base)
    name = _read_json(adapter / ADAPTER_CONFIG).get("base_model_name_or_path")
    if name and Path(name).is_dir():
        return Path(name)
    raise MuError(f"{adapter} is a LoRA adapter whose base model {name!r} is not a local directory; pass the base "
                  f"model directory as the teacher and the adapter separately (--teacher BASE --teacher-adapter "
                  f"{adapter}), or --teacher-config BASE")


def _merge_adapter(model: nn.Module, adapter: Path) -> nn.Module:
    from peft import PeftModel

    if not (adapter / ADAPTER_CONFIG).is_file():
        raise MuError(f"{adapter}: not a PEFT adapter directory (no {ADAPTER_CONFIG})")

    try:
        with quiet_peft():
            peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    except pickle.UnpicklingError as e:  # an adapter_model.bin that peft's weights-only load refused
        raise pickle_refusal(adapter, e) from None
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MuError(f"{adapter}: could not apply the LoRA adapter to the teacher ({first})") from None
    return peft_model.merge_and_unload()


def _tokenizer_in(path: Path):
    return load_tokenizer(path) if has_tokenizer_files(path) else None


def _load_lora_state_dict(file: Path, config_dir: Path, dtype: torch.dtype, lora_alpha: int):
    """The paper's teacher.pt: {"model_state_dict": state dict of get_peft_model(AutoModelForCausalLM)}."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    _quiet_transformers()
    obj = safe_torch_load(file)
    state = obj.get("model_state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state:
        raise MuError(f"{file}: expected a state dict (optionally under 'model_state_dict')")
    lora_a = {k: v for k, v in state.items() if ".lora_A." in k}
    try:
        config = AutoConfig.from_pretrained(str(config_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise MuError(f"{config_dir}: not a Hugging Face model config directory ({str(e).splitlines()[0]})") from None
    model = AutoModelForCausalLM.from_config(config, **{_hf_dtype_kwarg(): dtype})
    if lora_a:
        targets = sorted({k.split(".lora_A.")[0].rsplit(".", 1)[-1] for k in lora_a})
        r = next(iter(lora_a.values())).shape[0]
        with quiet_peft():
            model = get_peft_model(model, LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=0.0, bias="none",
                                                     target_modules=targets))
        # keys were written by a PeftModel; ours is one too, with the same prefixes
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise MuError(f"{file}: weights do not match the architecture in {config_dir}: "
                      f"{str(e).splitlines()[0][:300]}") from None
    return model.merge_and_unload() if lora_a else model


def load_teacher(path: str | os.PathLike, adapter: Optional[str | os.PathLike] = None,
                 config_dir: Optional[str | os.PathLike] = None, device: Optional[str | torch.device] = None,
                 dtype: Optional[str | torch.dtype] = None, lora_alpha: int = LORA_DEFAULTS["alpha"]) -> Teacher:
    """Load a frozen teacher (see the module docstring for the accepted layouts).

    adapter: a PEFT LoRA adapter directory applied and merged. config_dir: the architecture for a bare state
    dict (`teacher.pt`), or the base model of an adapter directory whose recorded base is not local.
    dtype=None picks bf16/fp32 by device (`mu.utils.auto_precision`;
    the choice is kept in `teacher.precision`). lora_alpha: the scale of a LoRA state dict
    in a `.pt` file (not stored there; the paper used 32).
    """
    path, asked = Path(path), dtype
    device = pick_device(device if device is None or isinstance(device, str) else str(device))
    if parse_dtype(dtype) is not None:
        dtype = parse_dtype(dtype)
        note = precision_note(dtype, "asked for")
    else:
        auto, why = auto_precision(device)
        dtype = auto or torch.float32
        note = precision_note(auto, f"auto: {why}")
    tokenizer = None
    if path.is_dir() and _is_mu_dir(path):
        model, kind = load_model(path, dtype=dtype), "mu"
        tokenizer = model.tokenizer
        if adapter is not None:
            model = _merge_adapter(model, Path(adapter))
    elif path.is_dir() and (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file():
        base = _base_of_adapter(path, config_dir)
        teacher = load_teacher(base, adapter=path, device=device, dtype=asked)
        teacher.tokenizer = _tokenizer_in(path) or teacher.tokenizer
        teacher.name = str(path)
        return teacher
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise MuError(f"{path}: not a model directory (no config.json); expected a Hugging Face causal LM, a mu "
                          f"decoder-only checkpoint or a PEFT adapter directory")
        model, kind = _load_hf(path, dtype), "hf"
        tokenizer = _tokenizer_in(path)
        adapter = adapter if adapter is not None else (path if (path / ADAPTER_CONFIG).is_file() else None)
        if adapter is not None:
            model = _merge_adapter(model, Path(adapter))
    elif path.is_file():
        obj_is_mu = _is_mu_pt(path)
        if obj_is_mu:
            model, kind = load_model(path, dtype=dtype), "mu"
        elif config_dir is None:
            raise MuError(f"{path}: a state dict needs the teacher's architecture: pass --teacher-config DIR "
                          f"(a Hugging Face config directory, e.g. Phi-3.5-mini's config.json)")
        else:
            model, kind = _load_lora_state_dict(path, Path(config_dir), dtype, lora_alpha), "hf"
            tokenizer = _tokenizer_in(Path(config_dir))
        if adapter is not None:
            model = _merge_adapter(model, Path(adapter))
    else:
        raise MuError(f"no teacher at {str(path)!r}: expected a Hugging Face causal LM directory, a PEFT adapter "
                      f"directory, a mu decoder-only checkpoint, or a .pt state dict with --teacher-config")
    model.to(device=device, dtype=dtype)
    teacher = Teacher(model, kind, tokenizer=tokenizer, name=str(path))
    teacher.precision = note
    return teacher


def _is_mu_pt(path: Path) -> bool:
    """Is this .pt file the paper's *Mu* format ({"model_state_dict", "model_config"})?"""
    try:
        obj = safe_torch_load(path, map_location="meta", mmap=True)
    except MuError:  # not loadable as a zip checkpoint with mmap: the plain read says why
        obj = safe_torch_load(path)
    return isinstance(obj, dict) and "model_config" in obj and "model_state_dict" in obj
