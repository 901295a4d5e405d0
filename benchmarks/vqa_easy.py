"""Easy-VQA benchmark: train a small VLM from scratch on vqa.jsonl on this machine, score held-out images.

    .venv/bin/python benchmarks/vqa_easy.py [--data ../shared/data/vqa/vqa.jsonl] [--steps 1500]

Every default is the library's recipe (`mu.vision.recipe.VQARecipe`, what `mu train --task vqa --train-data
FILE --out DIR` trains with no other option): this measures what users get. The recipe's data (captions and
templated questions read off the training answers) comes from `mu.vision.recipe.prepare_vqa_data`.

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


def main() -> int:
    from mu.model.layers import WEIGHT_INITS
    from mu.vision.config import FEATURE_SELECTS, STEMS
    from mu.vision.recipe import VQARecipe

    r = VQARecipe()  # the defaults below are the recipe's: this measures what `mu train --task vqa` does
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--holdout", type=float, default=0.15, help="fraction of easy-VQA images held out")
    ap.add_argument("--seed", type=int, default=r.seed)
    ap.add_argument("--contrastive-steps", type=int, default=r.contrastive_steps,
                    help="stage 0: CLIP-style pretraining of the tower on the captions; 0 = skip")
    ap.add_argument("--align-steps", type=int, default=r.align_steps, help="stage 1 (captions) steps; 0 = skip")
    ap.add_argument("--tower-lr-scale", type=float, default=r.tower_lr_scale,
                    help="stage 2: tower lr / lr (0.1, the paper's recipe for a pretrained tower; 0 freezes it)")
    ap.add_argument("--steps", type=int, default=r.steps)
    ap.add_argument("--batch-size", type=int, default=r.batch_size)
    ap.add_argument("--lr", type=float, default=r.lr)
    ap.add_argument("--tokenizer", default=r.tokenizer, help="byte or bpe:N (the questions only fill ~500 of "
                    "1000, so every word and answer is one token)")
    ap.add_argument("--width", type=int, default=r.width, help="text model width")
    ap.add_argument("--enc-layers", type=int, default=r.encoder_layers)
    ap.add_argument("--dec-layers", type=int, default=r.decoder_layers)
    ap.add_argument("--weight-init", default=r.weight_init, choices=WEIGHT_INITS,
                    help="text model init (paper: N(0, 0.02), which leaves yes/no at the language prior here)")
    ap.add_argument("--vit-width", type=int, default=r.vit_width)
    ap.add_argument("--vit-depth", type=int, default=r.vit_depth)
    ap.add_argument("--patch", type=int, default=r.patch_size)
    ap.add_argument("--stem", default=r.stem, choices=STEMS, help="native ViT patch embedding")
    ap.add_argument("--pool", type=int, default=r.pool, help="average-pool the 8x8 patch grid by this stride "
                    "(default 8: one mean patch token, so with CLS 2 image tokens; 1 keeps all 64)")
    ap.add_argument("--select", default=r.feature_select, choices=FEATURE_SELECTS)
    ap.add_argument("--no-templated", dest="templated", action="store_false",
                    help="train on the file's questions only (no templated questions from training images)")
    ap.add_argument("--synthetic", type=int, default=0, metavar="N",
                    help="also train on N images of mu's built-in synthetic shapes (one shape each, easy-VQA "
                    "palette; their shape and colour questions only). Default 0: the file's images only")
    ap.add_argument("--no-augment", action="store_true")
    ap.add_argument("--balance", type=float, default=r.answer_balance, help="answer-balanced sampling exponent "
                    "(0 = off: yes/no, the hard questions, stay 69%% of the samples; 0.5 starved them to 40%%)")
    ap.add_argument("--max-time", type=float, default=None, help="also cap training wall time (s); default none: "
                    "the fixed step counts decide")
    ap.add_argument("--latency-n", type=int, default=30)
    ap.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default, as `mu train`)")
    ap.add_argument("--eval-every", type=int, default=0, help="also score the held-out set every N steps")
    args = ap.parse_args()

    import dataclasses

    from mu.errors import MuError
    from mu.utils import cpu_isa, seed_everything
    from mu.vision import evaluate_vqa, load_vqa_jsonl, split_by_image, train_vqa
    from mu.vision.metrics import yes_no_by_presence
    from mu.vision.recipe import COLOR_WORDS, SHAPE_WORDS, build_recipe_vlm, prepare_vqa_data

    if not Path(args.data).is_file():
        print(f"no data at {args.data} (see ../shared/data/README.md)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = dataclasses.replace(
        r, seed=args.seed, contrastive_steps=args.contrastive_steps, align_steps=args.align_steps,
        tower_lr_scale=args.tower_lr_scale or 1.0, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        tokenizer=args.tokenizer, width=args.width, encoder_layers=args.enc_layers, decoder_layers=args.dec_layers,
        weight_init=args.weight_init, vit_width=args.vit_width, vit_depth=args.vit_depth, patch_size=args.patch,
        stem=args.stem, pool=args.pool, feature_select=args.select, templated=args.templated,
        augment=not args.no_augment, answer_balance=args.balance)
    seed_everything(args.seed)
    examples = load_vqa_jsonl(args.data)
    train, held = split_by_image(examples, args.holdout, seed=args.seed,
                                 holdout_filter=lambda e: e.id.startswith("easyvqa"))
    assert not {e.image_key for e in train} & {e.image_key for e in held}
    data = prepare_vqa_data(train, recipe)
    extra = data.train[len(train):]
    if args.synthetic:
        from mu.vision import synthetic_shapes_vqa

        extra += [e for e in synthetic_shapes_vqa(args.synthetic, seed=args.seed + 1, max_shapes=1)
                  if e.target in COLOR_WORDS | SHAPE_WORDS]
    vlm = build_recipe_vlm(recipe, data.tokenizer_texts)
    params = vlm.num_parameters()
    print(f"train {len(train)} questions on {len({e.image_key for e in train})} images; held out {len(held)} "
          f"questions on {len({e.image_key for e in held})} images; {len(data.align or [])} captions, {len(extra)} "
          f"templated and synthetic questions; params {params}; vocab {len(vlm.tokenizer)}; "
          f"{torch.get_num_threads()} threads, {cpu_isa()}", flush=True)

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="vqa_easy-"))
    kwargs = recipe.train_kwargs()
    if not args.tower_lr_scale:
        kwargs["trainable"] = ("projector", "lm")
    try:
        summary = train_vqa(vlm, train + extra, out, align_data=data.align, max_time_s=args.max_time, log_every=50,
                            progress=sys.stderr.isatty(), eval_data=held if args.eval_every else None,
                            eval_every=args.eval_every, save_every=300, **kwargs)
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
        "threads": torch.get_num_threads(), "isa": cpu_isa(), "synthetic_images": args.synthetic,
        "weight_init": args.weight_init, "answer_balance": args.balance, "seed": args.seed, "out": str(out),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
