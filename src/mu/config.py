"""Model configuration: one typed dataclass with named presets.

`MuConfig` keeps the field names and defaults of the paper's released code
(microsoft/encoder-decoder-slm), so `asdict(config)` round-trips with its
checkpoints. Two fields are ours: `arch`, and nothing else changes meaning.
The decoder-only twin uses the same dataclass with `arch="deconly"`: its
stack is `n_decoder_layer` blocks of causal self-attention + MLP (no
cross-attention) and `n_encoder_layer` is 0.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional, Sequence

from mu.errors import MuError

ARCHS = ("encdec", "deconly")
# The fields that fix a model's tensor shapes: a saved config (config.json, a .pt's model_config) must list them.
SHAPE_FIELDS = ("n_encoder_layer", "n_decoder_layer", "n_embd", "qkv_embd", "hidden_dim", "n_head", "n_kv_head",
                "vocab_size")


@dataclass
class MuConfig:
    n_encoder_layer: int = 20  # encoder blocks (0 for the decoder-only twin)
    n_decoder_layer: int = 10  # decoder blocks (all blocks of the decoder-only twin)
    n_embd: int = 1024  # residual stream width
    qkv_embd: Optional[int] = 384  # width of q (= n_head * head_dim); None means n_embd
    is_interleaved: bool = False  # GQA mapping: False -> head h uses kv h % n_kv_head; True -> h // group
    hidden_dim: int = 4096  # MLP inner width
    n_head: int = 6  # query heads
    n_kv_head: int = 3  # key/value heads (grouped-query attention)
    block_size: int = 1024  # trained context; RoPE NTK scaling starts beyond it
    dropout: float = 0.1  # on attention weights and after the MLP
    rope_theta: int = 10000  # RoPE base
    rope_factor: float = 1.0  # > 1 enables NTK-dynamic RoPE scaling beyond block_size
    pad_token_id: int = 0  # padding id: masked as a key everywhere, ignored by the loss
    vocab_size: int = 32128  # embedding rows (tied with lm_head)
    arch: str = "encdec"  # "encdec" (Mu) or "deconly" (the matched decoder-only twin)

    def __post_init__(self) -> None:
        self._check_values()
        if self.qkv_embd is None:
            self.qkv_embd = self.n_embd
        if self.arch not in ARCHS:
            raise MuError(f"config field 'arch' is {self.arch!r}; expected one of {ARCHS}")
        if self.qkv_embd % self.n_head:
            raise MuError(f"config field 'n_head' is {self.n_head}: it must divide qkv_embd={self.qkv_embd}")
        if self.n_head % self.n_kv_head:
            raise MuError(f"config field 'n_kv_head' is {self.n_kv_head}: it must divide n_head={self.n_head}")
        if (self.qkv_embd // self.n_head) % 2:
            raise MuError(f"config fields 'qkv_embd'/'n_head' give head_dim={self.qkv_embd // self.n_head}; "
                          f"it must be even for RoPE")
        if self.arch == "deconly" and self.n_encoder_layer:
            raise MuError(f"config field 'n_encoder_layer' is {self.n_encoder_layer}; a decoder-only model has 0")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise MuError(f"config field 'pad_token_id' is {self.pad_token_id}; expected an id in "
                          f"[0, vocab_size={self.vocab_size})")

    def _check_values(self) -> None:
        """Types and ranges of every field, each error naming the field, its value and what was expected."""
        def bad(name: str, expected: str) -> MuError:
            return MuError(f"config field {name!r} is {getattr(self, name)!r}; expected {expected}")

        def is_int(v: Any) -> bool:
            return isinstance(v, numbers.Integral) and not isinstance(v, bool)

        def is_number(v: Any) -> bool:
            return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)

        for name in ("n_embd", "hidden_dim", "n_head", "n_kv_head", "block_size", "vocab_size", "n_decoder_layer"):
            if not (is_int(getattr(self, name)) and getattr(self, name) > 0):
                raise bad(name, "a positive integer")
        if not (is_int(self.n_encoder_layer) and self.n_encoder_layer >= 0):
            raise bad("n_encoder_layer", "an integer >= 0")
        if self.qkv_embd is not None and not (is_int(self.qkv_embd) and self.qkv_embd > 0):
            raise bad("qkv_embd", "a positive integer (or null for n_embd)")
        if not is_int(self.pad_token_id):
            raise bad("pad_token_id", "an integer token id")
        if not isinstance(self.is_interleaved, bool):
            raise bad("is_interleaved", "true or false")
        if not (is_number(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise bad("dropout", "a number in [0, 1)")
        if not (is_number(self.rope_theta) and self.rope_theta > 0):
            raise bad("rope_theta", "a positive number")
        if not (is_number(self.rope_factor) and self.rope_factor > 0):
            raise bad("rope_factor", "a positive number (> 1 enables NTK scaling)")
        if not isinstance(self.arch, str):
            raise bad("arch", f"one of {ARCHS}")

    @property
    def head_dim(self) -> int:
        return self.qkv_embd // self.n_head

    @property
    def n_layer(self) -> int:
        return self.n_encoder_layer + self.n_decoder_layer

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config", required: Sequence[str] = ()) -> "MuConfig":
        """A config from a dict of fields; errors name `source` (a file). `required`: fields that must be
        present (a saved model's shapes must not silently fall back to the 330M defaults)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise MuError(f"{source}: unknown config field(s) {unknown}; expected a subset of {sorted(known)}")
        missing = [k for k in required if k not in d]
        if missing:
            raise MuError(f"{source}: missing config field(s) {missing} (a saved model lists all of "
                          f"{list(SHAPE_FIELDS)})")
        try:
            return cls(**d)
        except MuError as e:
            raise MuError(f"{source}: {e}") from None

    @classmethod
    def from_name(cls, name: str, arch: str = "encdec", **overrides: Any) -> "MuConfig":
        if name not in PRESETS:
            raise MuError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        if arch not in ARCHS:
            raise MuError(f"unknown arch {arch!r}; expected one of {ARCHS}")
        base = dict(PRESETS[name])
        if arch == "deconly":
            base["n_decoder_layer"] = DECONLY_LAYERS[name]
            base["n_encoder_layer"] = 0
        base["arch"] = arch
        base.update(overrides)
        return cls.from_dict(base, source=f"preset {name!r}")

    def replace(self, **changes: Any) -> "MuConfig":
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise MuError(f"unknown config field(s) {unknown}")
        return dataclasses.replace(self, **changes)


# Encoder-decoder presets keep the paper's 2/3 encoder, 1/3 decoder split and head_dim 64.
PRESETS: dict[str, dict[str, Any]] = {
    # For tests: ~0.5M parameters with a 512-token vocabulary (enough for the byte tokenizer).
    "tiny": dict(n_encoder_layer=6, n_decoder_layer=3, n_embd=64, qkv_embd=64, n_head=4, n_kv_head=2,
                 hidden_dim=256, block_size=512, vocab_size=512),
    # ~34M parameters with the paper's 32k vocabulary (~23M with the 4k built-in one); trains on a CPU.
    "small": dict(n_encoder_layer=8, n_decoder_layer=4, n_embd=384, qkv_embd=384, n_head=6, n_kv_head=3,
                  hidden_dim=1536),
    # The paper's model: 332M parameters.
    "330m": dict(),
    # ~1.0B: width 1536, 12 query / 6 KV heads of 64, FFN 6144, 26 encoder + 13 decoder layers.
    "1b": dict(n_encoder_layer=26, n_decoder_layer=13, n_embd=1536, qkv_embd=768, n_head=12, n_kv_head=6,
               hidden_dim=6144),
}

# Depth of the decoder-only twin of each preset: the layer count whose total parameter count is
# closest to the encoder-decoder's (a decoder block carries an extra cross-attention).
DECONLY_LAYERS: dict[str, int] = {"tiny": 10, "small": 13, "330m": 31, "1b": 41}
