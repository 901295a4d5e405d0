"""Vision towers: a small native ViT (trains from scratch on a CPU) and Hugging Face CLIP / SigLIP.

Every tower maps pixels (N, 3, S, S) to the selected features (N, tokens_per_view, width):
it runs its blocks, keeps every hidden state (index 0 = the embeddings, i = after block i),
reads `feature_layer` (the paper reads CLIP's second-to-last, -2) and keeps the patch tokens,
the CLS token or both (`feature_select`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mu.errors import MuError
from mu.vision.config import CLIP_MEAN, CLIP_STD, HALF, VisionTowerConfig


def select_features(hidden: Tensor, config: VisionTowerConfig) -> Tensor:
    """(N, [CLS +] side * side, D) hidden state -> the tokens the projector sees (N, tokens_per_view, D).

    Patch tokens are average-pooled over the grid by `pool_stride` (row-major order is kept).
    """
    cls, patches = (hidden[:, :1], hidden[:, 1:]) if config.has_cls else (None, hidden)
    if config.feature_select == "cls":
        return cls
    s = config.pool_stride
    if s > 1:
        N, _, D = patches.shape
        side = config.grid_side
        grid = patches.transpose(1, 2).reshape(N, D, side, side)  # (N, D, side, side)
        patches = F.avg_pool2d(grid, s).flatten(2).transpose(1, 2)  # (N, (side / s)^2, D)
    return patches if config.feature_select == "patch" else torch.cat([cls, patches], dim=1)


# ---------------------------------------------------------------------------------------------
# Native ViT


class ViTBlock(nn.Module):
    """Pre-norm bidirectional self-attention + GELU MLP."""

    def __init__(self, width: int, n_head: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, int(width * mlp_ratio))
        self.fc2 = nn.Linear(int(width * mlp_ratio), width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        N, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(N, T, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)  # (N, H, T, hd)
        x = x + self.proj(a.transpose(1, 2).reshape(N, T, D))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.ln2(x)))))


class ConvStem(nn.Module):
    """Patch embedding by log2(patch_size) 3x3 stride-2 convolutions (GroupNorm, GELU), channels doubling
    up to `width`, then a 1x1 projection: same token grid as a patch_size patchify, with a local
    inductive bias for edges and corners (Xiao et al. 2021, "Early convolutions help transformers see better").
    """

    def __init__(self, width: int, patch_size: int):
        super().__init__()
        n = patch_size.bit_length() - 1  # patch_size == 2 ** n
        layers: list[nn.Module] = []
        channels = 3
        for i in range(1, n + 1):
            out = max(8, width >> (n - i))
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False),
                       nn.GroupNorm(min(8, out), out), nn.GELU()]
            channels = out
        layers.append(nn.Conv2d(channels, width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class NativeViT(nn.Module):
    """A small ViT: patch embedding (one patchify convolution or a conv stem), CLS token, learned
    positions, pre-norm blocks, final LayerNorm.

    The final LayerNorm is applied to whichever hidden state is selected.
    """

    def __init__(self, config: VisionTowerConfig):
        super().__init__()
        self.config = config
        c = config
        self.patch_embed = (nn.Conv2d(3, c.width, c.patch_size, stride=c.patch_size) if c.stem == "patch"
                            else ConvStem(c.width, c.patch_size))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (c.image_size // c.patch_size) ** 2, c.width))
        self.blocks = nn.ModuleList([ViTBlock(c.width, c.n_head, c.mlp_ratio, c.dropout) for _ in range(c.depth)])
        self.ln_post = nn.LayerNorm(c.width)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if isinstance(self.patch_embed, ConvStem):  # ResNet-style init for the normalised 3x3 convolutions
            for m in self.patch_embed.net[:-1]:
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    @property
    def hidden_size(self) -> int:
        return self.config.width

    def forward(self, pixel_values: Tensor) -> Tensor:
        c = self.config
        if pixel_values.shape[-2:] != (c.image_size, c.image_size):
            raise ValueError(f"expected {c.image_size}x{c.image_size} views, got {tuple(pixel_values.shape[-2:])}")
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)  # (N, n_patches, width)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1) + self.pos_embed
        layer = c.feature_layer % (c.depth + 1)  # index into [embeddings, block 1, ..., block depth]
        for block in self.blocks[:layer]:  # blocks after the selected layer never run
            x = block(x)
        return self.ln_post(select_features(x, c))


# ---------------------------------------------------------------------------------------------
# Hugging Face towers


class HFVisionTower(nn.Module):
    """A `CLIPVisionModel` or `SiglipVisionModel`, built from `config.hf_config` (weights come from our file)."""

    def __init__(self, config: VisionTowerConfig, model: Optional[nn.Module] = None):
        super().__init__()
        self.config = config
        self.model = model if model is not None else _hf_model_class(config.kind)(_hf_config(config))

    @property
    def hidden_size(self) -> int:
        return self.config.width

    def forward(self, pixel_values: Tensor) -> Tensor:
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        hidden = out.hidden_states[self.config.feature_layer]  # (N, T, width); index 0 = embeddings
        return select_features(hidden, self.config)


def _hf_model_class(kind: str):
    from transformers import CLIPVisionModel, SiglipVisionModel

    return {"clip": CLIPVisionModel, "siglip": SiglipVisionModel}[kind]


def _hf_config(config: VisionTowerConfig):
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    cls = {"clip": CLIPVisionConfig, "siglip": SiglipVisionConfig}[config.kind]
    d = {k: v for k, v in config.hf_config.items() if k not in ("transformers_version", "architectures")}
    return cls.from_dict(d)


def hf_tower_config(source, kind: Optional[str] = None, feature_layer: int = -2, feature_select: str = "patch",
                    image_mean=None, image_std=None, pool_stride: int = 1) -> VisionTowerConfig:
    """A tower config from a Hugging Face vision config object or dict (e.g. a tiny `CLIPVisionConfig`)."""
    d = source if isinstance(source, dict) else source.to_dict()
    model_type = d.get("model_type", "")
    kind = kind or ("siglip" if model_type.startswith("siglip") else "clip" if model_type.startswith("clip") else None)
    if kind not in ("clip", "siglip"):
        raise MuError(f"cannot tell the tower kind from model_type {model_type!r}; pass kind='clip' or 'siglip'")
    mean, std = (CLIP_MEAN, CLIP_STD) if kind == "clip" else (HALF, HALF)
    return VisionTowerConfig(kind=kind, hf_config=d, feature_layer=feature_layer, feature_select=feature_select,
                             image_mean=tuple(image_mean or mean), image_std=tuple(image_std or std),
                             pool_stride=pool_stride)


def load_hf_tower(path: str | os.PathLike, feature_layer: int = -2, feature_select: str = "patch",
                  pool_stride: int = 1) -> HFVisionTower:
    """A pretrained CLIP / SigLIP vision tower from a local directory (no download).

    The directory may hold a full CLIP/SigLIP model or a vision-only one; pixel statistics come from
    its `preprocessor_config.json` when present.
    """
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise MuError(f"no vision tower at {str(path)!r}: expected a Hugging Face model directory with config.json")
    try:
        model_type = json.loads(cfg_file.read_text()).get("model_type", "")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise MuError(f"{cfg_file}: not a JSON object ({e})") from None
    kind = "siglip" if model_type.startswith("siglip") else "clip" if model_type.startswith("clip") else None
    if kind is None:
        raise MuError(f"{cfg_file}: model_type {model_type!r} is not a CLIP or SigLIP model")
    try:
        model = _hf_model_class(kind).from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise MuError(f"could not load a {kind} vision model from {str(path)!r}: {e}") from None
    mean = std = None
    pre = path / "preprocessor_config.json"
    if pre.is_file():
        p = json.loads(pre.read_text())
        mean, std = p.get("image_mean"), p.get("image_std")
    config = hf_tower_config(model.config, kind, feature_layer, feature_select, mean, std, pool_stride=pool_stride)
    return HFVisionTower(config, model)


def build_tower(config: VisionTowerConfig) -> nn.Module:
    return NativeViT(config) if config.kind == "native" else HFVisionTower(config)


# ---------------------------------------------------------------------------------------------
# Projector


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """'linear', 'identity', or 'mlp{N}x_gelu' (the paper's 'mlp2x_gelu': Linear, GELU, Linear)."""
    import re

    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "identity":
        if in_dim != out_dim:
            raise MuError(f"projector 'identity' needs equal widths, got tower {in_dim} and text model {out_dim}")
        return nn.Identity()
    m = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if not m or int(m.group(1)) < 1:
        raise MuError(f"unknown projector {kind!r}; expected 'linear', 'identity' or 'mlp{{N}}x_gelu' "
                      f"(e.g. mlp2x_gelu)")
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(int(m.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)
