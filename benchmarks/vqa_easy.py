"""Easy-VQA benchmark: train a small VLM from scratch on vqa.jsonl on this machine, score held-out images.

    .venv/bin/python benchmarks/vqa_easy.py [--data ../shared/data/vqa/vqa.jsonl] [--steps 1500]

Split: a seeded 15% of the easy-VQA *images* is held out with every question about them (so no
held-out picture is seen in training); everything else in the file (easy-VQA and the few photos)
is training data. The tokenizer (a small byte-level BPE) is trained on the training questions and
answers only. Model: a native ViT (64x64, conv stem to an 8x8 grid; its CLS token and the mean of the
patch tokens are the 2 image tokens) + mlp2x_gelu projector + a small Mu encoder-decoder, all trained
from scratch in three stages:
  0. CLIP-style contrastive pretraining of the tower alone on the same captions as stage 1 (image vs a
     bag-of-words embedding of "teal triangle"): through the language loss alone the tower learns
     colours at once but shapes only after thousands of steps; this stage stands in for the
     pretrained CLIP tower the paper starts from.
  1. alignment on captions ("what is in the image?" -> "teal triangle"), LLaVA's stage-1 recipe; the
     captions are read off each *training* image's own question/answer pairs (no new labels, nothing
     from held-out images). Without it the model learns the language priors first and takes far
     longer to start reading the image.
  2. VQA (the tower at 0.1x the learning rate, the paper's recipe) on every training question plus
     templated ones: each easy-VQA question template found in the training questions, asked about
     each training image whose colour and shape its own answers give, yes/no slots filled so that
     yes and no are balanced (again nothing from held-out images). Plain shuffled sampling, so the
     yes/no questions (the hard ones: the named colour or shape must be compared with the picture)
     stay ~69% of the samples.
The text model starts from N(0, 1/sqrt(fan_in)) weights (`--weight-init fan_in`): with the paper's
N(0, 0.02) this 128-wide model does not learn that comparison within the run (yes/no at chance,
accuracy 0.56; docs/vision.md).
Reports held-out VQA accuracy (and yes/no accuracy split by whether the named thing is in the picture),
training wall time and steps, and per-answer latency (batch 1, greedy, median after warm-up; and batched).
The last output line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "vqa" / "vqa.jsonl"


COLORS = {"red", "green", "blue", "yellow", "teal", "brown", "black", "gray"}
SHAPES = {"circle", "rectangle", "triangle"}


def _negated(question: str) -> bool:
    return " not " in question or question.startswith("is no ")


def image_facts(train) -> dict[str, dict]:
    """Colour and shape of each easy-VQA training image, read off its own question/answer pairs
    (open answers, and yes/no answers about a named colour or shape)."""
    facts: dict[str, dict] = {}
    for e in train:
        if not e.id.startswith("easyvqa"):
            continue
        f = facts.setdefault(e.image_key, {"image": e.image})
        words = set(e.question.rstrip("?").split())
        if e.target in COLORS | SHAPES:  # open question: the answer, plus what the question names
            f["color" if e.target in COLORS else "shape"] = e.target
            named = words & (SHAPES if e.target in COLORS else COLORS)
            if named:
                f["shape" if e.target in COLORS else "color"] = named.pop()
        elif e.target in ("yes", "no") and (e.target == "yes") != _negated(e.question):
            for w in words & COLORS:  # the named colour / shape is present
                f["color"] = w
            for w in words & SHAPES:
                f["shape"] = w
    return {k: f for k, f in facts.items() if "color" in f and "shape" in f}


def captions(facts):
    """Stage-1 data: "what is in the image?" -> "<colour> <shape>" for every training image with known facts."""
    from mu.vision import VQAExample

    return [VQAExample(f"caption-{k}", f["image"], "what is in the image?", [f"{f['color']} {f['shape']}"], k)
            for k, f in facts.items()]


def templated_questions(train, facts, seed: int):
    """More training questions: every easy-VQA question template seen in the training set (its colour /
    shape word made a slot), asked once about each training image with known facts. Yes/no slots get the
    true value half of the time, so the answers are balanced and the wording alone predicts nothing."""
    import random
    import re

    from mu.vision import VQAExample

    slot = re.compile(r"\b(" + "|".join(sorted(COLORS | SHAPES)) + r")\b")
    templates = set()
    for e in train:
        if e.id.startswith("easyvqa") and len(slot.findall(e.question)) <= 1:
            m = slot.search(e.question)
            kind = None if m is None else "color" if m.group(1) in COLORS else "shape"
            templates.add((slot.sub("{}", e.question), kind, e.target in ("yes", "no"),
                           "color" if e.target in COLORS else "shape" if e.target in SHAPES else None))
    rng = random.Random(seed)
    out = []
    for key, f in sorted(facts.items()):
        for i, (template, kind, yes_no, asks) in enumerate(sorted(templates, key=str)):
            value = f[kind] if kind else None
            if yes_no:
                if rng.random() < 0.5:
                    value = rng.choice(sorted((COLORS if kind == "color" else SHAPES) - {f[kind]}))
                answer = "yes" if (value == f[kind]) != _negated(template) else "no"
            else:
                answer = f[asks]
            question = template.format(value) if kind else template
            out.append(VQAExample(f"templated-{key}-{i}", f["image"], question, [answer], key))
    return out


def yes_no_by_presence(examples, predictions) -> dict[str, float]:
    """Yes/no accuracy split by whether the colour or shape the question names is in the picture.
    84% of the file's yes/no questions name an absent one, so always answering "absent" scores 0.84 on
    them; the "present" half shows whether a model reads the picture."""
    scores: dict[str, list[float]] = {"present": [], "absent": []}
    for e, p in zip(examples, predictions):
        if e.target in ("yes", "no"):
            scores["present" if (e.target == "yes") != _negated(e.question) else "absent"].append(p["score"])
    return {k: round(sum(v) / len(v), 4) for k, v in scores.items() if v}


def main() -> int:
    from mu.model.layers import WEIGHT_INITS
    from mu.vision.config import FEATURE_SELECTS, STEMS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--holdout", type=float, default=0.15, help="fraction of easy-VQA images held out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--contrastive-steps", type=int, default=300,
                    help="stage 0: CLIP-style pretraining of the tower on the captions; 0 = skip")
    ap.add_argument("--align-steps", type=int, default=300, help="stage 1 (captions) steps; 0 = skip")
    ap.add_argument("--tower-lr-scale", type=float, default=0.1,
                    help="stage 2: tower lr / lr (0.1, the paper's recipe for a pretrained tower; 0 freezes it)")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--vocab", type=int, default=1000, help="BPE vocabulary cap (0 = byte tokenizer); the "
                    "questions only fill ~500, so every word and answer is one token")
    ap.add_argument("--width", type=int, default=128, help="text model width")
    ap.add_argument("--enc-layers", type=int, default=3)
    ap.add_argument("--dec-layers", type=int, default=2)
    ap.add_argument("--weight-init", default="fan_in", choices=WEIGHT_INITS,
                    help="text model init (paper: N(0, 0.02), which leaves yes/no at the language prior here)")
    ap.add_argument("--vit-width", type=int, default=128)
    ap.add_argument("--vit-depth", type=int, default=4)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--stem", default="conv", choices=STEMS, help="native ViT patch embedding")
    ap.add_argument("--pool", type=int, default=8, help="average-pool the 8x8 patch grid by this stride (default "
                    "8: one mean patch token, so with CLS 2 image tokens; 1 keeps all 64)")
    ap.add_argument("--select", default="cls_patch", choices=FEATURE_SELECTS)
    ap.add_argument("--no-templated", dest="templated", action="store_false",
                    help="train on the file's questions only (no templated questions from training images)")
    ap.add_argument("--synthetic", type=int, default=0, metavar="N",
                    help="also train on N images of mu's built-in synthetic shapes (one shape each, easy-VQA "
                    "palette; their shape and colour questions only). Default 0: the file's images only")
    ap.add_argument("--no-augment", action="store_true")
    ap.add_argument("--balance", type=float, default=0.0, help="answer-balanced sampling exponent (0 = off: "
                    "yes/no, the hard questions, stay 69%% of the samples; 0.5 starved them to 40%%)")
    ap.add_argument("--max-time", type=float, default=14 * 60, help="training wall-time cap (s)")
    ap.add_argument("--latency-n", type=int, default=30)
    ap.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default; 1 is much "
                    "faster than 2 when other jobs share the cores)")
    ap.add_argument("--eval-every", type=int, default=0, help="also score the held-out set every N steps")
    args = ap.parse_args()

    from mu.errors import MuError
    from mu.tokenizer import byte_tokenizer, train_tokenizer
    from mu.utils import seed_everything
    from mu.vision import VisionTowerConfig, build_vlm, evaluate_vqa, load_vqa_jsonl, split_by_image, train_vqa

    if not Path(args.data).is_file():
        print(f"no data at {args.data} (see ../shared/data/README.md)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    examples = load_vqa_jsonl(args.data)
    train, held = split_by_image(examples, args.holdout, seed=args.seed,
                                 holdout_filter=lambda e: e.id.startswith("easyvqa"))
    assert not {e.image_key for e in train} & {e.image_key for e in held}
    facts = image_facts(train)
    caps = captions(facts)
    extra = templated_questions(train, facts, args.seed) if args.templated else []
    if args.synthetic:
        from mu.vision import synthetic_shapes_vqa

        extra += [e for e in synthetic_shapes_vqa(args.synthetic, seed=args.seed + 1, max_shapes=1)
                  if e.target in COLORS | SHAPES]
    texts = [t for e in train + caps for t in (e.question, *e.answers)]
    tok = train_tokenizer(texts, args.vocab) if args.vocab else byte_tokenizer()
    tower = VisionTowerConfig(image_size=64, patch_size=args.patch, width=args.vit_width, depth=args.vit_depth,
                              n_head=4, stem=args.stem, feature_layer=-1, pool_stride=args.pool,
                              feature_select=args.select)
    heads = max(2, args.width // 32)
    vlm = build_vlm("tiny", tower=tower, tokenizer=tok, n_embd=args.width, qkv_embd=args.width, n_head=heads,
                    n_kv_head=heads // 2, hidden_dim=4 * args.width, n_encoder_layer=args.enc_layers,
                    n_decoder_layer=args.dec_layers, dropout=0.0, weight_init=args.weight_init)
    params = vlm.num_parameters()
    print(f"train {len(train)} questions on {len({e.image_key for e in train})} images; held out {len(held)} "
          f"questions on {len({e.image_key for e in held})} images; {len(caps)} captions, {len(extra)} templated "
          f"and synthetic questions; params {params}; "
          f"vocab {len(tok)}", flush=True)

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="vqa_easy-"))
    try:
        summary = train_vqa(vlm, train + extra, out, align_data=caps, contrastive_steps=args.contrastive_steps,
                            align_steps=args.align_steps, align_lr=args.lr,
                            align_trainable=("tower", "projector", "lm"), steps=args.steps, lr=args.lr,
                            batch_size=args.batch_size,
                            augment=not args.no_augment, answer_balance=args.balance, seed=args.seed,
                            max_time_s=args.max_time,
                            tower_lr_scale=args.tower_lr_scale or 1.0,
                            trainable=("tower", "projector", "lm") if args.tower_lr_scale else ("projector", "lm"),
                            log_every=50, progress=sys.stderr.isatty(),
                            eval_data=held if args.eval_every else None, eval_every=args.eval_every)
    except MuError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"trained {summary['steps']} steps in {summary['train_seconds']:.0f} s, loss {summary['final_loss']:.4f}",
          flush=True)

    result = evaluate_vqa(vlm, held, batch_size=64, max_new_tokens=8)
    wrong = [p for p in result["predictions"] if p["score"] < 1][:10]
    presence = yes_no_by_presence(held, result["predictions"])
    print(f"held-out accuracy {result['accuracy']:.4f} on {result['n']}; by answer {result['by_answer']}; "
          f"yes/no by the named thing {presence}")
    for p in wrong:
        print(f"  wrong: {p['question']!r} -> {p['prediction']!r} (gold {p['answers']})")

    # latency: one question at a time (preprocessing included), warm-up first, median
    sample = held[:args.latency_n]
    vlm.answer([sample[0].image], [sample[0].question])
    times = []
    for e in sample:
        t0 = time.perf_counter()
        vlm.answer([e.image], [e.question], max_new_tokens=8)
        times.append(time.perf_counter() - t0)
    report = {
        "benchmark": "vqa_easy", "accuracy": round(result["accuracy"], 4), "n_heldout": result["n"],
        "heldout_images": len({e.image_key for e in held}), "yes_no_present": presence.get("present"),
        "yes_no_absent": presence.get("absent"), "train_questions": len(train),
        "train_seconds": round(summary["train_seconds"], 1), "steps": summary["steps"],
        "stopped_early": summary["stopped_early"], "batch_size": args.batch_size,
        "latency_ms_batch1_median": round(1000 * statistics.median(times), 2),
        "ms_per_answer_batched": round(result["ms_per_answer"], 2), "params": params,
        "threads": torch.get_num_threads(), "synthetic_images": args.synthetic, "weight_init": args.weight_init,
        "answer_balance": args.balance, "seed": args.seed, "out": str(out),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
