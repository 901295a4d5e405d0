"""The VQA recipe that works on a CPU, as one set of defaults: `mu train --task vqa` and
`benchmarks/vqa_easy.py` both use it.

    recipe = VQARecipe()                                  # or VQARecipe(steps=3000, pool=1, ...)
    data = prepare_vqa_data(load_vqa_jsonl("vqa.jsonl"), recipe)
    vlm = build_recipe_vlm(recipe, data.tokenizer_texts)
    train_vqa(vlm, data.train, "runs/vqa", align_data=data.align, **recipe.train_kwargs())

What it is, and why (measured in docs/vision.md): a native ViT (64x64, conv stem to an 8x8 grid, width
128, 4 blocks; its CLS token and the mean patch token are the 2 image tokens) + mlp2x_gelu projector +
a Mu encoder-decoder (width 128, 3+2 layers, N(0, 1/sqrt(fan_in)) init: with the paper's N(0, 0.02)
yes/no stays at chance), all trained from scratch in three stages of fixed length (2,100 steps of
batch 32, ~12-13 min on a 2-core AVX2 CPU):
  0. CLIP-style contrastive pretraining of the tower on the alignment captions (300 steps),
  1. alignment on captions, every part trained (300 steps),
  2. VQA on the training questions plus templated ones, the tower at 0.1x the learning rate (1,500 steps).
The alignment captions ("what is in the image?" -> "teal triangle") and the templated questions are read
off the training file's own answers (`image_facts`): nothing from outside it, no hand-made file.
Data whose answers never name an easy-VQA colour and shape gets no captions: stages 0 and 1 then learn
from the training questions themselves (a note says so).
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

from mu.vision.data import COLORS as _PALETTE
from mu.vision.data import SHAPES as _SHAPE_KINDS
from mu.vision.data import VQAExample
from mu.vision.metrics import is_negated

COLOR_WORDS = frozenset(_PALETTE)  # easy-VQA's 8 colours
SHAPE_WORDS = frozenset(_SHAPE_KINDS)  # and 3 shapes
CAPTION_QUESTION = "what is in the image?"


@dataclass
class VQARecipe:
    # text model (a fresh preset; `width` None keeps the preset's own sizes)
    preset: str = "tiny"
    width: Optional[int] = 128  # n_embd = qkv_embd; heads width // 32 (>= 2), KV heads half, FFN 4x
    encoder_layers: int = 3
    decoder_layers: int = 2
    dropout: float = 0.0
    weight_init: str = "fan_in"  # N(0, 1/sqrt(fan_in)); the paper's N(0, 0.02) leaves yes/no at chance here
    tokenizer: str = "bpe:1000"  # byte-level BPE on the training questions, answers and captions
    # native vision tower
    image_size: int = 64
    patch_size: int = 8
    vit_width: int = 128
    vit_depth: int = 4
    stem: str = "conv"  # stride-2 conv stem: learns shapes from few pictures faster than one patchify conv
    pool: int = 8  # average-pool the patch grid by this stride: 8 on 8x8 -> one mean patch token
    feature_select: str = "cls_patch"  # CLS + patch tokens
    feature_layer: int = -1
    # stages (fixed step counts: results do not depend on the machine's load)
    contrastive_steps: int = 300
    align_steps: int = 300
    steps: int = 1500
    lr: float = 1e-3  # every stage's peak learning rate
    tower_lr_scale: float = 0.1  # stage 2: the tower learns at lr x this
    batch_size: int = 32
    weight_decay: float = 0.01
    warmup: float = 0.05  # fraction of each stage
    grad_clip: float = 1.0
    augment: bool = True  # flips, rescales, shifts, background colours (not for left/right questions)
    answer_balance: float = 0.0  # 0: plain shuffled epochs (yes/no stay ~69% of the samples)
    templated: bool = True  # add easy-VQA question templates asked about each training picture
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text_overrides(self) -> dict[str, Any]:
        """build_vlm's overrides of the preset."""
        out: dict[str, Any] = {"dropout": self.dropout}
        if self.width:
            heads = max(2, self.width // 32)
            out.update(n_embd=self.width, qkv_embd=self.width, n_head=heads, n_kv_head=max(1, heads // 2),
                       hidden_dim=4 * self.width, n_encoder_layer=self.encoder_layers,
                       n_decoder_layer=self.decoder_layers)
        return out

    def tower(self):
        from mu.vision.config import VisionTowerConfig

        return VisionTowerConfig(image_size=self.image_size, patch_size=self.patch_size, width=self.vit_width,
                                 depth=self.vit_depth, n_head=max(1, self.vit_width // 32), stem=self.stem,
                                 feature_layer=self.feature_layer, pool_stride=self.pool,
                                 feature_select=self.feature_select)

    def train_kwargs(self) -> dict[str, Any]:
        """`train_vqa`'s keyword arguments for this recipe (every stage trains every part)."""
        return dict(contrastive_steps=self.contrastive_steps, align_steps=self.align_steps, align_lr=self.lr,
                    align_trainable=("tower", "projector", "lm"), steps=self.steps, lr=self.lr,
                    trainable=("tower", "projector", "lm"), tower_lr_scale=self.tower_lr_scale,
                    batch_size=self.batch_size, weight_decay=self.weight_decay, warmup_ratio=self.warmup,
                    grad_clip=self.grad_clip, augment=self.augment, answer_balance=self.answer_balance,
                    seed=self.seed)

    @property
    def total_steps(self) -> int:
        return self.contrastive_steps + self.align_steps + self.steps


@dataclass
class RecipeData:
    train: list[VQAExample]  # the training questions + templated ones
    align: Optional[list[VQAExample]]  # captions for stages 0 and 1 (None: the training data)
    tokenizer_texts: list[str]  # what a BPE tokenizer learns from
    notes: list[str] = field(default_factory=list)


def image_facts(train: Sequence[VQAExample]) -> dict[str, dict]:
    """Colour and shape of each training picture, read off its own question/answer pairs (open answers, and
    yes/no answers about a named colour or shape); only pictures whose colour and shape are both known."""
    colors_shapes = COLOR_WORDS | SHAPE_WORDS
    facts: dict[str, dict] = {}
    for e in train:
        f = facts.setdefault(e.image_key, {"image": e.image})
        words = set(e.question.rstrip("?").split())
        if e.target in colors_shapes:  # open question: the answer, plus what the question names
            f["color" if e.target in COLOR_WORDS else "shape"] = e.target
            named = words & (SHAPE_WORDS if e.target in COLOR_WORDS else COLOR_WORDS)
            if named:
                f["shape" if e.target in COLOR_WORDS else "color"] = named.pop()
        elif e.target in ("yes", "no") and (e.target == "yes") != is_negated(e.question):
            for w in words & COLOR_WORDS:  # the named colour / shape is present
                f["color"] = w
            for w in words & SHAPE_WORDS:
                f["shape"] = w
    return {k: f for k, f in facts.items() if "color" in f and "shape" in f}


def alignment_captions(facts: dict[str, dict]) -> list[VQAExample]:
    """Stages 0-1 data: "what is in the image?" -> "<colour> <shape>" for every picture with known facts."""
    return [VQAExample(f"caption-{k}", f["image"], CAPTION_QUESTION, [f"{f['color']} {f['shape']}"], k)
            for k, f in facts.items()]


def templated_questions(train: Sequence[VQAExample], facts: dict[str, dict], seed: int) -> list[VQAExample]:
    """Every question template seen in the training set about a picture with known facts (its colour / shape
    word made a slot), asked once about each such picture. Yes/no slots get the true value half of the time,
    so the answers are balanced and the wording alone predicts nothing."""
    slot = re.compile(r"\b(" + "|".join(sorted(COLOR_WORDS | SHAPE_WORDS)) + r")\b")
    templates = set()
    for e in train:
        if e.image_key not in facts or len(slot.findall(e.question)) > 1:
            continue
        m = slot.search(e.question)
        kind = None if m is None else "color" if m.group(1) in COLOR_WORDS else "shape"
        yes_no = e.target in ("yes", "no")
        asks = "color" if e.target in COLOR_WORDS else "shape" if e.target in SHAPE_WORDS else None
        if (yes_no and kind) or (not yes_no and asks):  # answerable from the facts
            templates.add((slot.sub("{}", e.question), kind, yes_no, asks))
    rng = random.Random(seed)
    out = []
    for key, f in sorted(facts.items()):
        for i, (template, kind, yes_no, asks) in enumerate(sorted(templates, key=str)):
            value = f[kind] if kind else None
            if yes_no:
                if rng.random() < 0.5:
                    value = rng.choice(sorted((COLOR_WORDS if kind == "color" else SHAPE_WORDS) - {f[kind]}))
                answer = "yes" if (value == f[kind]) != is_negated(template) else "no"
            else:
                answer = f[asks]
            question = template.format(value) if kind else template
            out.append(VQAExample(f"templated-{key}-{i}", f["image"], question, [answer], key))
    return out


def prepare_vqa_data(train: Sequence[VQAExample], recipe: Optional[VQARecipe] = None,
                     align: Optional[Sequence[VQAExample]] = None) -> RecipeData:
    """The recipe's training and alignment data from the training examples alone (see the module docstring).
    `align` given (e.g. --align-data): used as is, and no captions are built."""
    recipe = recipe or VQARecipe()
    train = list(train)
    notes = []
    facts = image_facts(train)
    if align is None:
        captions = alignment_captions(facts)
        if captions:
            align = captions
            notes.append(f"alignment data: {len(captions)} captions read off the training answers")
        else:
            notes.append("alignment data: no picture's colour and shape could be read off the training answers; "
                         "stages 0-1 use the training questions")
    else:
        align = list(align)
    extra = templated_questions(train, facts, recipe.seed) if recipe.templated else []
    if extra:
        notes.append(f"{len(extra)} templated questions about {len(facts)} training pictures")
    texts = [t for e in train + list(align or []) for t in (e.question, *e.answers)]
    return RecipeData(train + extra, align, texts, notes)


def build_recipe_vlm(recipe: VQARecipe, tokenizer_texts: Sequence[str], tokenizer=None, tower=None, text=None):
    """The recipe's VLM, from scratch: the tokenizer (`recipe.tokenizer`, BPE learnt from `tokenizer_texts`,
    unless one is given), the native tower (unless `tower` is given) and the text model (`recipe.preset`
    with `text_overrides()`, unless `text`, a text model directory, is given)."""
    from mu.train.trainer import make_tokenizer
    from mu.vision.model import build_vlm

    if tokenizer is None:
        tokenizer = make_tokenizer(recipe.tokenizer, lambda: list(tokenizer_texts))
    overrides = {} if text is not None else {"weight_init": recipe.weight_init, **recipe.text_overrides()}
    return build_vlm(text if text is not None else recipe.preset, tower=tower or recipe.tower(),
                     tokenizer=tokenizer, **overrides)
