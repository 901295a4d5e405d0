"""VQA data: the jsonl format, a deterministic synthetic shapes generator, splits by image, batches.

File format (one JSON object a line):
    {"id": str, "image": "images/x.png" (relative to the jsonl file), "question": str, "answers": [str, ...]}
In memory an example is a `VQAExample` whose `image` is a path or a PIL image, and whose
`image_key` names the picture (questions about the same picture share it: splits hold out by it).
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import Tensor

from mu.atomic import atomic_write_text
from mu.errors import MuError


@dataclass
class VQAExample:
    id: str  # unique question id
    image: Any  # a path (str / Path) or a PIL image
    question: str
    answers: list[str]  # every reference answer (VQA v2 has 10 human answers, easy-VQA one)
    image_key: str = ""  # names the picture; defaults to the image path

    def __post_init__(self) -> None:
        if not self.image_key:
            self.image_key = str(self.image) if isinstance(self.image, (str, os.PathLike)) else self.id

    @property
    def target(self) -> str:
        """The training answer: the most frequent reference (first one on ties)."""
        return Counter(self.answers).most_common(1)[0][0]


def load_vqa_jsonl(path: str | os.PathLike, check_images: bool = True) -> list[VQAExample]:
    """Read a VQA jsonl file; image paths are resolved against the file's folder."""
    from mu.data import tasks

    path = Path(path)
    if path.is_dir():
        raise MuError(f"{str(path)!r} is a directory, expected a VQA .jsonl file")
    if not path.is_file():
        raise MuError(f"no VQA data file at {str(path)!r}")
    examples, seen = [], set()
    cap = tasks.MAX_LINE_CHARS  # the text data's line cap: a line is never read whole past it
    n = 0
    try:
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(iter(lambda: f.readline(cap + 1), ""), 1):
                where = f"{path}:{n}"
                if len(line) > cap:
                    raise MuError(f"{where}: longer than {cap:,} characters; expected JSON lines, one record per line")
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise MuError(f"{where}: not valid JSON ({e})") from None
                if not isinstance(row, dict):
                    raise MuError(f"{where}: expected a JSON object with id, image, question, answers")
                for key in ("id", "image", "question"):
                    if not isinstance(row.get(key), str) or not row[key].strip():
                        raise MuError(f"{where}: field {key!r} must be a non-empty string, got {row.get(key)!r}")
                answers = row.get("answers")
                if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
                    raise MuError(f"{where}: field 'answers' must be a non-empty list of strings, got {answers!r}")
                if row["id"] in seen:
                    raise MuError(f"{where}: duplicate id {row['id']!r}")
                seen.add(row["id"])
                image = (path.parent / row["image"]).resolve()
                if check_images and not image.is_file():
                    raise MuError(f"{where}: image {row['image']!r} not found (looked for {image})")
                examples.append(VQAExample(row["id"], image, row["question"], list(answers), str(image)))
    except UnicodeDecodeError:
        raise MuError(f"{path}:{n + 1}: not valid UTF-8 text") from None
    if not examples:
        raise MuError(f"{path}: no examples")
    return examples


def split_by_image(examples: Sequence[VQAExample], holdout_fraction: float = 0.15, seed: int = 0,
                   holdout_filter=None) -> tuple[list[VQAExample], list[VQAExample]]:
    """(train, held_out): a seeded random `holdout_fraction` of the *images* (among those `holdout_filter`
    accepts, default all) with every question about them, so no held-out picture is seen in training."""
    keys = sorted({e.image_key for e in examples if holdout_filter is None or holdout_filter(e)})
    random.Random(seed).shuffle(keys)
    held = set(keys[:round(len(keys) * holdout_fraction)])
    return [e for e in examples if e.image_key not in held], [e for e in examples if e.image_key in held]


# ---------------------------------------------------------------------------------------------
# Synthetic shapes VQA

COLORS = {  # the easy-VQA palette
    "red": (230, 25, 35), "green": (20, 200, 40), "blue": (30, 40, 235), "yellow": (245, 220, 20),
    "teal": (0, 128, 128), "brown": (140, 80, 30), "black": (15, 15, 15), "gray": (128, 128, 128),
}
SHAPES = ("circle", "rectangle", "triangle")


@dataclass
class _Shape:
    kind: str
    color: str
    box: tuple[int, int, int, int]  # left, top, right, bottom in pixels

    @property
    def center(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


def _draw(shapes: list[_Shape], size: int, background: tuple[int, int, int], rng: random.Random):
    from PIL import Image, ImageDraw

    k = 4  # draw at 4x and downsample: anti-aliased edges, as in easy-VQA
    im = Image.new("RGB", (size * k, size * k), background)
    d = ImageDraw.Draw(im)
    for s in shapes:
        l, t, r, b = (v * k for v in s.box)
        color = tuple(min(255, max(0, c + rng.randint(-12, 12))) for c in COLORS[s.color])
        if s.kind == "circle":
            d.ellipse((l, t, r, b), fill=color)
        elif s.kind == "rectangle":
            d.rectangle((l, t, r, b), fill=color)
        else:
            d.polygon([((l + r) / 2, t), (l, b), (r, b)], fill=color)
    return im.resize((size, size), Image.LANCZOS)


def _place(rng: random.Random, size: int, kinds: Sequence[str]) -> list[tuple[int, int, int, int]]:
    """Non-overlapping boxes for `kinds` (circles get square boxes); fewer if the canvas is full."""
    boxes: list[tuple[int, int, int, int]] = []
    n = len(kinds)
    for _ in range(200 * n):
        if len(boxes) == n:
            break
        side = rng.randint(size // 6, size // 2 if n == 1 else size // 3)
        square = kinds[len(boxes)] == "circle" or rng.random() < 0.5
        w = side if square else rng.randint(side // 2 + 2, side)
        l, t = rng.randint(1, size - w - 1), rng.randint(1, size - side - 1)
        box = (l, t, l + w, t + side)
        if all(box[2] + 2 < o[0] or o[2] + 2 < box[0] or box[3] + 2 < o[1] or o[3] + 2 < box[1] for o in boxes):
            boxes.append(box)
    return boxes


def _where(shape: _Shape, size: int) -> str:
    dx, dy = shape.center[0] - size / 2, shape.center[1] - size / 2
    if max(abs(dx), abs(dy)) < size / 8:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _questions(shapes: list[_Shape], size: int, rng: random.Random) -> list[tuple[str, str]]:
    kinds = Counter(s.kind for s in shapes)
    colors = Counter(s.color for s in shapes)
    pairs = Counter((s.color, s.kind) for s in shapes)
    qa = [("how many shapes are there?", str(len(shapes)))]
    if len(shapes) == 1:
        s = shapes[0]
        qa += [("what shape is in the image?", s.kind), ("what color is the shape?", s.color),
               ("where is the shape?", _where(s, size))]
    for s in shapes:
        if kinds[s.kind] == 1:
            qa += [(f"what color is the {s.kind}?", s.color), (f"where is the {s.kind}?", _where(s, size))]
        if colors[s.color] == 1:
            qa.append((f"what is the {s.color} shape?", s.kind))
    kind = rng.choice(SHAPES)
    qa.append((f"how many {kind}s are there?", str(kinds[kind])))
    color, kind = rng.choice(list(COLORS)), rng.choice(SHAPES)
    if rng.random() < 0.5:  # ask about a pair that is present half of the time
        color, kind = rng.choice(list(pairs))
    qa.append((f"is there a {color} {kind}?", "yes" if pairs[(color, kind)] else "no"))
    kind = rng.choice(SHAPES)
    if rng.random() < 0.5:
        qa.append((f"is there a {kind} in the image?", "yes" if kinds[kind] else "no"))
    else:
        qa.append((f"is there not a {kind} in the image?", "no" if kinds[kind] else "yes"))
    color = rng.choice(list(COLORS))
    qa.append((f"does the image contain a {color} shape?", "yes" if colors[color] else "no"))
    return qa


def synthetic_shapes_vqa(n_images: int, seed: int = 0, image_size: int = 64, max_shapes: int = 3,
                         questions_per_image: Optional[int] = None) -> list[VQAExample]:
    """A shapes-VQA set drawn in memory: 1..max_shapes coloured circles / rectangles / triangles on a
    light background, with questions about colours, shapes, counts and positions (left, right, top,
    bottom, center). The same arguments always give the same images and questions.
    With max_shapes=1 it resembles easy-VQA.
    """
    if n_images < 1 or max_shapes < 1 or image_size < 16:
        raise MuError(f"synthetic shapes: need n_images >= 1, max_shapes >= 1, image_size >= 16; got "
                      f"{n_images}, {max_shapes}, {image_size}")
    rng = random.Random(seed)
    out = []
    for i in range(n_images):
        kinds = [rng.choice(SHAPES) for _ in range(rng.randint(1, max_shapes))]
        boxes = _place(rng, image_size, kinds)
        shapes = [_Shape(kind, rng.choice(list(COLORS)), box) for kind, box in zip(kinds, boxes)]
        background = tuple(rng.randint(225, 255) for _ in range(3))
        image = _draw(shapes, image_size, background, rng)
        qa = _questions(shapes, image_size, rng)
        if questions_per_image is not None and len(qa) > questions_per_image:
            qa = rng.sample(qa, questions_per_image)
        key = f"shapes-{seed}-{i}"
        out += [VQAExample(f"{key}-q{j}", image, q, [a], key) for j, (q, a) in enumerate(qa)]
    return out


def write_vqa_jsonl(examples: Iterable[VQAExample], path: str | os.PathLike) -> Path:
    """Write examples in the jsonl format; in-memory images are saved as PNGs under `images/` next to it."""
    path = Path(path)
    (path.parent / "images").mkdir(parents=True, exist_ok=True)
    saved: dict[str, str] = {}
    lines = []
    for e in examples:
        if e.image_key not in saved:
            if isinstance(e.image, (str, os.PathLike)):
                saved[e.image_key] = os.path.relpath(e.image, path.parent)
            else:
                rel = f"images/{e.image_key}.png"
                e.image.save(path.parent / rel)
                saved[e.image_key] = rel
        lines.append(json.dumps({"id": e.id, "image": saved[e.image_key], "question": e.question,
                                 "answers": e.answers}) + "\n")
    return atomic_write_text(path, "".join(lines))


# ---------------------------------------------------------------------------------------------
# Batches


class ImageCache:
    """Preprocessed views per `image_key`, computed once (images are small; questions share them)."""

    def __init__(self, processor):
        self.processor = processor
        self.views: dict[str, Tensor] = {}

    def __call__(self, example: VQAExample) -> Tensor:
        if example.image_key not in self.views:
            self.views[example.image_key] = self.processor(example.image)
        return self.views[example.image_key]


def augment_views(views: Tensor, gen: torch.Generator, max_shift: int = 6,
                  scale: tuple[float, float] = (0.75, 1.1), background: Optional[tuple[Tensor, Tensor]] = None
                  ) -> Tensor:
    """Label-preserving augmentation for colour / shape / count questions about shapes on a plain
    background: a random horizontal flip, a random rescale in `scale` and a random shift (edge pixels
    repeated; zooming in crops a little off the sides). Not for questions about left/right positions.

    With `background=(mean, std)` (the normalisation, (3,) each) the background colour (the border's
    median) is also replaced by a random light one, pixels close to it moving with it: otherwise a
    model can memorise a picture by its background instead of learning the shape.
    """
    import torch.nn.functional as F

    S = views.shape[-1]
    if background is not None:
        views = _jitter_background(views, gen, *background)
    if torch.rand((), generator=gen) < 0.5:
        views = views.flip(-1)
    lo, hi = scale
    size = round(S * (lo + (hi - lo) * float(torch.rand((), generator=gen))))
    if size != S:
        views = F.interpolate(views, size=(size, size), mode="bilinear", align_corners=False, antialias=size < S)
    margin = max(0, S - size) // 2 + max_shift  # pad to at least S + 2 * max_shift
    padded = F.pad(views, (margin,) * 4, mode="replicate")
    centre = (padded.shape[-1] - S) // 2
    shift = min(max_shift, centre)
    dx, dy = (centre + int(v) for v in torch.randint(-shift, shift + 1, (2,), generator=gen))
    return padded[..., dy:dy + S, dx:dx + S]


def _jitter_background(views: Tensor, gen: torch.Generator, mean: Tensor, std: Tensor,
                       lightest: float = 0.82, reach: float = 0.35) -> Tensor:
    mean, std = mean.view(1, 3, 1, 1), std.view(1, 3, 1, 1)
    pixels = views * std + mean  # (V, 3, S, S) in [0, 1]
    border = torch.cat([pixels[..., 0, :], pixels[..., -1, :], pixels[..., :, 0], pixels[..., :, -1]], dim=-1)
    old = border.median(dim=-1).values[..., None, None]  # (V, 3, 1, 1)
    new = lightest + (1 - lightest) * torch.rand(views.shape[0], 3, 1, 1, generator=gen)
    closeness = (1 - (pixels - old).abs().amax(dim=1, keepdim=True) / reach).clamp(0, 1)  # 1 on the background
    return (pixels + closeness * (new - old) - mean) / std


def collate(examples: Sequence[VQAExample], views: Sequence[Tensor], model) -> dict[str, Any]:
    """A training batch: prompt ids + mask, the images, decoder inputs [BOS] + answer, targets answer + EOS."""
    tok = model.tokenizer
    pad, bos, eos = model.config.pad_token_id, tok.bos_token_id, tok.eos_token_id
    input_ids, attention_mask = model.tokenize_prompts([e.question for e in examples])
    answers = [tok(e.target, add_special_tokens=False)["input_ids"] for e in examples]
    width = max(len(a) for a in answers) + 1
    dec = torch.full((len(answers), width), pad, dtype=torch.long)
    tgt = torch.full((len(answers), width), pad, dtype=torch.long)
    for i, a in enumerate(answers):
        dec[i, :len(a) + 1] = torch.tensor([bos] + a)
        tgt[i, :len(a) + 1] = torch.tensor(a + [eos])
    return dict(input_ids=input_ids, attention_mask=attention_mask, images=list(views),
                decoder_input_ids=dec.to(model.device), targets=tgt.to(model.device))
