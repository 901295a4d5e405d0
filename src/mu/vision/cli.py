"""`--task vqa` for `mu train`, `mu eval` and `mu score`: thin adapters from parsed flags to `mu.vision`.

    mu train --task vqa --preset small --train-data vqa.jsonl --val-data held.jsonl --out runs/vqa \\
             --tokenizer bpe:1000 --align-steps 300 --max-steps 1500 --lr 1e-3
    mu eval --task vqa --model runs/vqa/final --data held.jsonl --out results.json
    mu score --task vqa --data held.jsonl --predictions preds.jsonl

The text trainer's flags are reused where they mean the same thing; flags that only the text trainer
implements (FLOP/token budgets, torchrun, resume) are refused by name instead of being ignored.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from mu.errors import MuError
from mu.vision.config import FEATURE_SELECTS, STEMS


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("vision (--task vqa)")
    g.add_argument("--tower", default="native",
                   help="native (mu's small ViT, trained from scratch) or a local CLIP / SigLIP directory")
    g.add_argument("--image-size", type=int, default=64, help="native tower: input side in pixels (default 64)")
    g.add_argument("--patch-size", type=int, default=8, help="native tower: patch side (default 8)")
    g.add_argument("--vit-width", type=int, default=128, help="native tower: width (default 128)")
    g.add_argument("--vit-depth", type=int, default=4, help="native tower: blocks (default 4)")
    g.add_argument("--stem", choices=STEMS, default="conv",
                   help="native tower: patch embedding, one patchify convolution or a stride-2 conv stem "
                        "(default conv: learns shapes from few images faster)")
    g.add_argument("--feature-select", choices=FEATURE_SELECTS,
                   help="tokens fed to the projector (default: cls_patch native, patch CLIP/SigLIP)")
    g.add_argument("--pool", type=int, default=1, metavar="S",
                   help="average-pool the patch grid by stride S (fewer image tokens; default 1 = every patch)")
    g.add_argument("--feature-layer", type=int, help="tower hidden state fed to the projector "
                   "(default: -1 native, -2 CLIP/SigLIP as in the paper)")
    g.add_argument("--contrastive-steps", type=int, default=0,
                   help="stage 0 steps: CLIP-style pretraining of a from-scratch tower on the --align-data (image, "
                        "answer) pairs; helps when answers name what is seen (colours, shapes); default 0 = skip")
    g.add_argument("--align-steps", type=int, default=0,
                   help="stage 1 steps (projector-only alignment with a pretrained tower; default 0 = skip)")
    g.add_argument("--align-data", metavar="PATH",
                   help="VQA jsonl for stages 0 and 1, e.g. captions ('what is in the image?' -> 'red circle'); "
                        "default: the training data (whose yes/no answers say nothing to stage 0)")
    g.add_argument("--trainable", default="tower,projector,lm",
                   help="parts trained in stage 2, from tower, projector, lm (default all)")
    g.add_argument("--tower-lr-scale", type=float,
                   help="tower lr / lr (default 0.1 for a pretrained tower, 1.0 for the native one)")
    g.add_argument("--augment", action="store_true", help="random flips/shifts/backgrounds (not for left/right)")
    g.add_argument("--answer-balance", type=float, default=0.0,
                   help="sample examples with weight (answer count)^-b, e.g. 0.5 (default 0: plain epochs)")
    g.add_argument("--max-time", type=float, metavar="S", help="stop training after S seconds")


def _refuse(args: argparse.Namespace) -> None:
    unsupported = {"--max-flops": args.max_flops, "--max-tokens": args.max_tokens,
                   "--global-batch-size": args.global_batch_size, "--compile": args.compile or None}
    named = [flag for flag, value in unsupported.items() if value]
    if args.objective != "seq2seq":
        named.append(f"--objective {args.objective}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        named.append("torchrun (several processes)")
    if named:
        raise MuError(f"--task vqa does not support {', '.join(named)} (VQA trains in one process with "
                      "--max-steps/--epochs; see docs/vision.md)")


def _tokenizer(spec: str | None, examples):
    """The text trainer's --tokenizer rules (byte, bpe:N, a directory); bpe:N learns from questions and answers."""
    from mu.train.config import _check_tokenizer_spec
    from mu.train.trainer import make_tokenizer

    spec = spec or "byte"
    _check_tokenizer_spec(spec)
    return make_tokenizer(spec, lambda: [t for e in examples for t in (e.question, *e.answers)])


def run_train(args: argparse.Namespace) -> int:
    """`mu train --task vqa`: build a VLM (tower + projector + Mu encoder-decoder) and run `train_vqa`."""
    _refuse(args)
    if args.init and args.weight_init != "paper":
        raise MuError("--weight-init applies to a fresh --preset text model, not to an --init model")
    from mu.utils import pick_device, seed_everything
    from mu.vision import VisionTowerConfig, build_vlm, load_vqa_jsonl, train_vqa

    out = Path(args.out)
    if (out / "final").exists():
        raise MuError(f"{out / 'final'} exists: this VQA run already finished (VQA runs do not resume; "
                      "choose another --out)")
    parts = tuple(p.strip() for p in args.trainable.split(",") if p.strip())
    train = load_vqa_jsonl(args.train_data)[:args.train_limit]  # bad data fails before anything is built
    val = load_vqa_jsonl(args.val_data)[:args.val_limit] if args.val_data else None
    align = load_vqa_jsonl(args.align_data) if args.align_data else None
    seed_everything(args.seed)
    native = args.tower == "native"
    if native:
        tower = VisionTowerConfig(image_size=args.image_size, patch_size=args.patch_size, width=args.vit_width,
                                  depth=args.vit_depth, n_head=max(1, args.vit_width // 32), stem=args.stem,
                                  feature_select=args.feature_select or "cls_patch", pool_stride=args.pool,
                                  feature_layer=-1 if args.feature_layer is None else args.feature_layer)
    elif Path(args.tower).is_dir():
        from mu.vision.towers import load_hf_tower

        tower = load_hf_tower(args.tower, feature_layer=-2 if args.feature_layer is None else args.feature_layer,
                              feature_select=args.feature_select or "patch", pool_stride=args.pool)
    else:
        raise MuError(f"--tower {args.tower!r}: expected 'native' or a CLIP/SigLIP model directory")
    text = args.init or args.preset
    tokenizer = None if args.init and args.tokenizer is None else _tokenizer(args.tokenizer, train)
    overrides = {} if args.init else {"dropout": 0.0 if args.dropout is None else args.dropout,
                                      "weight_init": args.weight_init}
    vlm = build_vlm(text, tower=tower, tokenizer=tokenizer, **overrides).to(pick_device(args.device))
    steps = args.max_steps
    if steps is None:
        steps = math.ceil((args.epochs or 1.0) * len(train) / args.batch_size)
    print(f"vqa: {len(train)} training questions, {sum(vlm.num_parameters().values()):,} parameters, {steps} steps "
          f"(+{args.contrastive_steps} contrastive, +{args.align_steps} alignment) -> {out}", file=sys.stderr,
          flush=True)
    summary = train_vqa(
        vlm, train, out, eval_data=val, align_data=align, contrastive_steps=args.contrastive_steps,
        align_steps=args.align_steps, align_lr=args.lr or 1e-3,
        align_trainable=("projector",) if not native else ("tower", "projector", "lm"),
        steps=steps, lr=args.lr or (1e-3 if native else 3e-4), trainable=parts,
        tower_lr_scale=args.tower_lr_scale if args.tower_lr_scale is not None else (1.0 if native else 0.1),
        batch_size=args.batch_size, weight_decay=args.weight_decay,
        warmup_ratio=args.warmup if args.warmup < 1 else args.warmup / max(1, steps), grad_clip=args.grad_clip,
        augment=args.augment, answer_balance=args.answer_balance, seed=args.seed, log_every=args.log_every,
        eval_every=args.eval_every if val else 0, save_every=args.save_every, max_time_s=args.max_time,
        progress=not args.no_progress)
    summary["final_dir"] = str(out / "final")
    print(json.dumps(summary, default=str))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """`mu eval --task vqa`: VQA accuracy of a VLM directory on a VQA jsonl file."""
    from mu.eval.io import write_json_atomic
    from mu.utils import pick_device
    from mu.vision import evaluate_vqa, load_vlm, load_vqa_jsonl

    data = load_vqa_jsonl(args.data)[:args.limit]
    model = load_vlm(args.model, device=pick_device(args.device), dtype=args.dtype)
    result = evaluate_vqa(model, data, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens or 8,
                          num_beams=args.num_beams, predictions_file=args.predictions, progress=not args.quiet)
    result.pop("predictions")
    result = {"task": "vqa", "model": str(args.model), "data": str(args.data), "primary_metric": "accuracy",
              "metrics": result}
    if args.out:
        write_json_atomic(args.out, result)
    print(json.dumps(result, indent=2))
    return 0


def run_score(args: argparse.Namespace) -> int:
    """`mu score --task vqa`: VQA accuracy of a predictions file against a VQA jsonl file."""
    from mu.eval.io import predicted_only, read_predictions, write_json_atomic
    from mu.vision import load_vqa_jsonl, vqa_accuracy

    data = load_vqa_jsonl(args.data, check_images=False)[:args.limit]
    predictions = read_predictions(args.predictions)
    data = predicted_only(data, predictions, args.predictions, args.data, args.allow_missing)
    result = {"task": "vqa", "n": len(data),
              "accuracy": vqa_accuracy([predictions[e.id] for e in data], [e.answers for e in data])}
    if args.out:
        write_json_atomic(args.out, result)
    print(json.dumps(result, indent=2))
    return 0
