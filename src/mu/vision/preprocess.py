"""Image preprocessing with PIL + numpy: load, resize / centre-crop / pad to square, normalise, anyres tiles.

    processor = ImageProcessor(tower_config, preprocess_config)
    views = processor(load_image("dog.jpg"))     # (n_views, 3, S, S) float32
    processor.num_views(image.size)              # known before any model runs

One view is a square `S x S` crop (S = the tower's image size). With `anyres` (the paper's
LLaVA-NeXT tiling) an image becomes a base view of the whole picture plus the crops of a grid:
the grid resolution is the pinpoint that keeps the most of the image's pixels without
upscaling past it, ties broken by the least padding (LLaVA's `select_best_resolution`); the
image is resized to fit it, keeping its aspect ratio, centred, and padded with the mean colour
(so padding normalises to zero).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from mu.errors import MuError
from mu.vision.config import PreprocessConfig, VisionTowerConfig, default_pinpoints


def load_image(path: str | os.PathLike):
    """Open an image file as RGB (EXIF rotation applied); a clear MuError if it is missing, empty, not an image,
    damaged, or larger than PIL's `Image.MAX_IMAGE_PIXELS` (a decompression bomb: refused from its header,
    before any pixel is decoded; raise that limit, or set it to None, to accept bigger images)."""
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise MuError(f"no image file at {str(path)!r}")
    if not path.is_file():
        raise MuError(f"{str(path)!r} is not a file (expected an image such as PNG or JPEG)")
    if path.stat().st_size == 0:
        raise MuError(f"{str(path)!r} is empty (0 bytes; expected an image such as PNG or JPEG)")
    limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, with the sizes
            with Image.open(path) as im:  # reads the header only
                w, h = im.size
                if limit is not None and w * h > limit:
                    raise MuError(f"{str(path)!r}: a {w}x{h} image ({w * h:,} pixels) is over the limit of "
                                  f"{limit:,} pixels (PIL.Image.MAX_IMAGE_PIXELS); refused before decoding, "
                                  f"as a possible decompression bomb")
                im.load()
                image = ImageOps.exif_transpose(im).convert("RGB")
    except Image.DecompressionBombError as e:  # PIL refuses at open beyond twice the limit
        raise MuError(f"{str(path)!r}: {str(e).rstrip('.')} (over PIL.Image.MAX_IMAGE_PIXELS = {limit:,} pixels); "
                      f"refused before decoding") from None
    except UnidentifiedImageError:
        raise MuError(f"{str(path)!r} is not an image PIL can read (expected PNG, JPEG, GIF, BMP, WebP, ...)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise MuError(f"{str(path)!r}: could not decode the image ({e})") from None
    return image


def as_rgb(image):
    """A PIL image in RGB mode (a path is loaded with `load_image`)."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if not isinstance(image, Image.Image):
        raise MuError(f"expected a PIL image or an image path, got {type(image).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


def select_best_resolution(size: tuple[int, int], candidates: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The (width, height) among `candidates` that keeps the most image pixels, then wastes the fewest."""
    w, h = size
    best, best_key = None, None
    for cw, ch in candidates:
        scale = min(cw / w, ch / h)
        kept = min(int(w * scale) * int(h * scale), w * h)  # pixels of the original resolution retained
        key = (kept, -(cw * ch - kept))
        if best_key is None or key > best_key:
            best, best_key = (int(cw), int(ch)), key
    return best


class ImageProcessor:
    """Turns PIL images into normalised square views for one vision tower."""

    def __init__(self, tower: VisionTowerConfig, preprocess: PreprocessConfig | None = None):
        self.size = tower.image_size
        self.preprocess = preprocess or PreprocessConfig()
        self.mean = np.asarray(tower.image_mean, dtype=np.float32)
        self.std = np.asarray(tower.image_std, dtype=np.float32)
        self.pinpoints = self.preprocess.pinpoints or default_pinpoints(self.size)
        self.fill = tuple(int(round(255 * m)) for m in tower.image_mean)  # padding colour (normalises to ~0)

    # -- geometry --------------------------------------------------------------------------------

    def grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """anyres: (columns, rows) of crops for an image of `size` (width, height)."""
        w, h = select_best_resolution(size, self.pinpoints)
        return -(-w // self.size), -(-h // self.size)

    def num_views(self, size: tuple[int, int]) -> int:
        """How many views an image of `size` (width, height) becomes: 1, or 1 + the anyres grid."""
        if not self.preprocess.anyres:
            return 1
        cols, rows = self.grid(size)
        return 1 + cols * rows

    def square(self, image):
        """One S x S view of the whole image, by the configured resize mode."""
        from PIL import Image

        S, (w, h) = self.size, image.size
        mode = self.preprocess.resize
        if mode == "squash":
            return image.resize((S, S), Image.BICUBIC)
        if mode == "pad":
            return self.fit(image, S, S)
        scale = S / min(w, h)  # crop: shorter side to S, then the centre
        nw, nh = max(S, round(w * scale)), max(S, round(h * scale))
        image = image.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - S) // 2, (nh - S) // 2
        return image.crop((left, top, left + S, top + S))

    def fit(self, image, width: int, height: int):
        """Resize keeping the aspect ratio to fit `width x height`, centred on a mean-colour canvas."""
        from PIL import Image

        w, h = image.size
        scale = min(width / w, height / h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        canvas = Image.new("RGB", (width, height), self.fill)
        canvas.paste(image.resize((nw, nh), Image.BICUBIC), ((width - nw) // 2, (height - nh) // 2))
        return canvas

    def views(self, image) -> list:
        """The PIL views of one image: [square] or [base, grid crops row by row]."""
        image = as_rgb(image)
        if not self.preprocess.anyres:
            return [self.square(image)]
        from PIL import Image

        cols, rows = self.grid(image.size)
        S = self.size
        tiled = self.fit(image, cols * S, rows * S)
        crops = [tiled.crop((c * S, r * S, (c + 1) * S, (r + 1) * S)) for r in range(rows) for c in range(cols)]
        return [image.resize((S, S), Image.BICUBIC)] + crops  # base view squashed, as LLaVA's anyres

    # -- tensors ---------------------------------------------------------------------------------

    def normalize(self, view) -> Tensor:
        """PIL RGB S x S -> (3, S, S) float32, (pixel / 255 - mean) / std."""
        arr = np.asarray(view, dtype=np.float32) / 255.0  # (S, S, 3)
        arr = (arr - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))

    def __call__(self, image) -> Tensor:
        """A PIL image or a path -> (n_views, 3, S, S)."""
        return torch.stack([self.normalize(v) for v in self.views(image)])
