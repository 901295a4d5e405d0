"""Configuration of a vision-language model: vision tower, preprocessing, projector, placeholder token.

`VLMConfig` is saved as the "vision" part of a VLM directory's `config.json`; the language model's
`MuConfig` is saved next to it as "text". Presets for the tower are plain constructors
(`native_tower_config`, `hf_tower_config`), so the dataclasses stay free of flags.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

from mu.errors import MuError

TOWER_KINDS = ("native", "clip", "siglip")
FEATURE_SELECTS = ("patch", "cls_patch", "cls")
RESIZE_MODES = ("crop", "pad", "squash")
STEMS = ("patch", "conv")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's pixel statistics
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)  # SigLIP's, and the native tower's default


@dataclass
class VisionTowerConfig:
    kind: str = "native"  # "native" (mu's small ViT), "clip" or "siglip" (Hugging Face vision models)
    image_size: int = 64  # square input side in pixels (HF towers: read from hf_config)
    patch_size: int = 8  # patch side in pixels (HF towers: read from hf_config)
    width: int = 128  # native: residual width (HF towers: hf_config hidden_size)
    depth: int = 4  # native: transformer blocks
    n_head: int = 4  # native: attention heads
    mlp_ratio: float = 4.0  # native: MLP inner width / width
    stem: str = "patch"  # native: "patch" (one patch_size x patch_size convolution, as ViT) or "conv" (3x3
    #                      stride-2 convolutions, one per halving, as "Early convolutions help transformers
    #                      see better": learns shapes from few images ~2x faster); patch_size must be 2^k
    dropout: float = 0.0  # native: dropout on attention weights and after the MLP
    feature_layer: int = -1  # hidden state for the projector: 0 = embeddings, i = after block i, <0 from the end
    #                          (the paper: -2, CLIP's second-to-last layer)
    feature_select: str = "patch"  # "patch" (patch tokens only), "cls_patch" (CLS + patches), "cls" (CLS only)
    pool_stride: int = 1  # average-pool the patch grid by this stride (LLaVA's spatial pooling): fewer image tokens
    image_mean: tuple[float, float, float] = HALF  # per-channel mean used to normalise pixels in [0, 1]
    image_std: tuple[float, float, float] = HALF  # per-channel std
    hf_config: Optional[dict[str, Any]] = None  # clip/siglip: the vision config (`CLIPVisionConfig.to_dict()`)

    def __post_init__(self) -> None:
        if self.kind not in TOWER_KINDS:
            raise MuError(f"vision tower 'kind' is {self.kind!r}; expected one of {TOWER_KINDS}")
        if self.feature_select not in FEATURE_SELECTS:
            raise MuError(f"vision tower 'feature_select' is {self.feature_select!r}; "
                          f"expected one of {FEATURE_SELECTS}")
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise MuError(f"vision tower image_mean/image_std need 3 values (std > 0), got "
                          f"{self.image_mean} / {self.image_std}")
        if self.kind == "native":
            if self.stem not in STEMS:
                raise MuError(f"vision tower 'stem' is {self.stem!r}; expected one of {STEMS}")
            if self.stem == "conv" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
                raise MuError(f"vision tower: a conv stem needs patch_size a power of 2 (>= 2), got {self.patch_size}")
            if self.image_size % self.patch_size:
                raise MuError(f"vision tower: image_size {self.image_size} is not a multiple of patch_size "
                              f"{self.patch_size}")
            if self.width % self.n_head:
                raise MuError(f"vision tower: width {self.width} is not divisible by n_head {self.n_head}")
        else:
            if not self.hf_config:
                raise MuError(f"a {self.kind!r} vision tower needs 'hf_config' (its Hugging Face vision config)")
            self.hf_config = json.loads(json.dumps(self.hf_config, default=str))  # as it reads back from config.json
            self.image_size = int(self.hf_config["image_size"])  # derived: the HF config is the truth
            self.patch_size = int(self.hf_config["patch_size"])
            self.width = int(self.hf_config["hidden_size"])
            self.depth = int(self.hf_config["num_hidden_layers"])
            if self.kind == "siglip" and self.feature_select != "patch":
                raise MuError("a SigLIP tower has no CLS token: use feature_select='patch'")
        if self.pool_stride < 1 or self.grid_side % self.pool_stride:
            raise MuError(f"vision tower: pool_stride {self.pool_stride} must divide the patch grid side "
                          f"{self.grid_side} (image_size {self.image_size} / patch_size {self.patch_size})")
        if not -self.depth <= self.feature_layer <= self.depth:
            raise MuError(f"vision tower: feature_layer {self.feature_layer} is outside [-{self.depth}, {self.depth}] "
                          f"for a tower of {self.depth} blocks")

    @property
    def has_cls(self) -> bool:
        return self.kind == "clip" or self.kind == "native"

    @property
    def grid_side(self) -> int:
        """Patches along one side of a view."""
        return self.image_size // self.patch_size

    @property
    def tokens_per_view(self) -> int:
        """Image tokens one view (one square crop) contributes to the encoder input."""
        patches = (self.grid_side // self.pool_stride) ** 2
        return {"patch": patches, "cls_patch": patches + 1, "cls": 1}[self.feature_select]


@dataclass
class PreprocessConfig:
    resize: str = "crop"  # "crop": shorter side to image_size, centre crop; "pad": pad to a square with the mean
    #                       colour, then resize; "squash": resize ignoring the aspect ratio
    anyres: bool = False  # add a grid of image_size crops of the best-fitting pinpoint resolution after the base view
    pinpoints: Optional[list[list[int]]] = None  # anyres [width, height] choices in pixels;
    #                                              None -> image_size x (1x1, 2x2, 3x2, 2x3)

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise MuError(f"preprocess 'resize' is {self.resize!r}; expected one of {RESIZE_MODES}")
        if self.pinpoints is not None:
            if not self.pinpoints or any(len(p) != 2 or min(p) < 1 for p in self.pinpoints):
                raise MuError(f"preprocess 'pinpoints' must be a list of [width, height] pairs, got {self.pinpoints}")
            self.pinpoints = [[int(w), int(h)] for w, h in self.pinpoints]


@dataclass
class VLMConfig:
    tower: VisionTowerConfig = field(default_factory=VisionTowerConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    projector: str = "mlp2x_gelu"  # "linear", "identity" or "mlp{N}x_gelu" (N linear layers with GELU between)
    image_token: str = "<image>"  # placeholder in the prompt where the image tokens go
    image_token_id: int = -1  # its id in the tokenizer (set when the model is built)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "vision config") -> "VLMConfig":
        d = dict(d)
        parts = {"tower": VisionTowerConfig, "preprocess": PreprocessConfig}
        for name, part in parts.items():
            if name in d:
                d[name] = _build(part, d[name], f"{source}: {name}")
        return _build(cls, d, source)

    def replace(self, **changes: Any) -> "VLMConfig":
        return dataclasses.replace(self, **changes)


def _build(cls, d: Any, source: str):
    if not isinstance(d, dict):
        raise MuError(f"{source}: expected a JSON object, got {type(d).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise MuError(f"{source}: unknown field(s) {unknown}; expected a subset of {sorted(known)}")
    try:
        return cls(**d)
    except TypeError as e:
        raise MuError(f"{source}: {e}") from None


def default_pinpoints(image_size: int) -> list[list[int]]:
    """The paper's anyres grid for a 336 tower (336², 672², 1008x672, 672x1008), scaled to `image_size`."""
    return [[image_size * w, image_size * h] for w, h in ((1, 1), (2, 2), (3, 2), (2, 3))]
