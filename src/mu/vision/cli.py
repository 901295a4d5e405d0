"""`--task vqa` for `mu train`, `mu eval` and `mu score`: thin adapters from parsed flags to `mu.vision`.

    mu train --task vqa --train-data vqa.jsonl --out runs/vqa      # the recipe (mu.vision.recipe)
    mu eval --task vqa --model runs/vqa/final --data held.jsonl --out results.json
    mu score --task vqa --data held.jsonl --predictions preds.jsonl

The text trainer's flags are reused where they mean the same thing; with --task vqa those not given take
the recipe's values (`mu.vision.recipe.VQARecipe`). Flags only the text trainer implements (FLOP/token
budgets, FSDP, --compile) are refused by name instead of being ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

from mu.errors import MuError
from mu.vision.config import FEATURE_SELECTS, STEMS


_RECIPE_FLAGS = {  # shared `mu train` flags whose default differs for --task vqa: dest -> recipe field
    "preset": "preset", "weight_init": "weight_init", "tokenizer": "tokenizer", "batch_size": "batch_size",
    "lr": "lr", "weight_decay": "weight_decay", "warmup": "warmup", "grad_clip": "grad_clip", "seed": "seed",
    "dropout": "dropout", "max_steps": "steps",
}


class _DefaultInt(int):
    pass


class _DefaultFloat(float):
    pass


class _DefaultStr(str):
    pass


def _mark_default(value):
    """The same value, of a type that tells "not given on the command line" (the text trainer sees no
    difference; --task vqa then takes the recipe's value instead)."""
    for base, marked in ((bool, None), (int, _DefaultInt), (float, _DefaultFloat), (str, _DefaultStr)):
        if isinstance(value, base):
            return value if marked is None else marked(value)
    return value


def given(args: argparse.Namespace, dest: str) -> bool:
    """Whether `--dest` was given on the command line (not argparse's default)."""
    value = getattr(args, dest, None)
    return value is not None and not isinstance(value, (_DefaultInt, _DefaultFloat, _DefaultStr))


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from mu.vision.recipe import VQARecipe

    r = VQARecipe()
    for action in parser._actions:  # shared flags: remember which were given (argparse has no such flag)
        if action.dest in _RECIPE_FLAGS:
            action.default = _mark_default(action.default)
    g = parser.add_argument_group(
        "vision (--task vqa)",
        "With --task vqa, every option not given takes the recipe's value (mu.vision.recipe.VQARecipe, measured "
        f"in docs/vision.md): --preset {r.preset} at width {r.width} ({r.encoder_layers}+{r.decoder_layers} "
        f"layers), --weight-init {r.weight_init}, --tokenizer {r.tokenizer}, --batch-size {r.batch_size}, --lr "
        f"{r.lr:g}, --weight-decay {r.weight_decay:g}, {r.contrastive_steps} contrastive + {r.align_steps} "
        f"alignment + {r.steps} (--max-steps) VQA steps, ~12-13 min on a quiet 2-core CPU")
    g.add_argument("--tower", default="native",
                   help="native (mu's small ViT, trained from scratch) or a local CLIP / SigLIP directory")
    g.add_argument("--image-size", type=int, help=f"native tower: input side in pixels (default {r.image_size})")
    g.add_argument("--patch-size", type=int, help=f"native tower: patch side (default {r.patch_size})")
    g.add_argument("--vit-width", type=int, help=f"native tower: width (default {r.vit_width})")
    g.add_argument("--vit-depth", type=int, help=f"native tower: blocks (default {r.vit_depth})")
    g.add_argument("--stem", choices=STEMS, help=f"native tower: patch embedding, one patchify convolution or a "
                   f"stride-2 conv stem (default {r.stem}: learns shapes from few images faster)")
    g.add_argument("--feature-select", choices=FEATURE_SELECTS,
                   help=f"tokens fed to the projector (default: {r.feature_select} native, patch CLIP/SigLIP)")
    g.add_argument("--pool", type=int, metavar="S",
                   help=f"average-pool the patch grid by stride S (default {r.pool} native: one mean patch token; "
                        "1 CLIP/SigLIP: every patch)")
    g.add_argument("--feature-layer", type=int, help="tower hidden state fed to the projector "
                   f"(default: {r.feature_layer} native, -2 CLIP/SigLIP as in the paper)")
    g.add_argument("--contrastive-steps", type=int,
                   help="stage 0 steps: CLIP-style pretraining of a from-scratch tower on the alignment data "
                        f"(default {r.contrastive_steps} native, 0 CLIP/SigLIP)")
    g.add_argument("--align-steps", type=int,
                   help=f"stage 1 steps (default {r.align_steps} native: every part; 0 CLIP/SigLIP)")
    g.add_argument("--align-data", metavar="PATH",
                   help="VQA jsonl for stages 0 and 1, e.g. captions ('what is in the image?' -> 'red circle'); "
                        "default: captions read off the training file's own colour/shape answers (the training "
                        "questions when there are none)")
    g.add_argument("--no-templated", dest="templated", action="store_false", default=None,
                   help="train on the file's questions only (no templated questions about training images)")
    g.add_argument("--trainable", default="tower,projector,lm",
                   help="parts trained in stage 2, from tower, projector, lm (default all)")
    g.add_argument("--tower-lr-scale", type=float, help=f"tower lr / lr (default {r.tower_lr_scale})")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random flips/shifts/backgrounds (default on for the native tower; not for left/right)")
    g.add_argument("--answer-balance", type=float,
                   help=f"sample examples with weight (answer count)^-b (default {r.answer_balance:g}: plain epochs)")
    g.add_argument("--max-time", type=float, metavar="S", help="also stop training after S seconds")


def _refuse(args: argparse.Namespace) -> None:
    unsupported = {"--max-flops": args.max_flops, "--max-tokens": args.max_tokens,
                   "--global-batch-size": args.global_batch_size, "--compile": args.compile or None}
    named = [flag for flag, value in unsupported.items() if value]
    if args.objective != "seq2seq":
        named.append(f"--objective {args.objective}")
    if args.distributed == "fsdp":
        named.append("--distributed fsdp")
    if named:
        raise MuError(f"--task vqa does not support {', '.join(named)} (VQA trains with --max-steps; under torchrun "
                      "with DDP; see docs/vision.md)")


def recipe_from_args(args: argparse.Namespace):
    """The recipe with every option given on the command line in place of its default."""
    from mu.vision.recipe import VQARecipe

    r = VQARecipe()
    changes = {field: getattr(args, dest) for dest, field in _RECIPE_FLAGS.items() if given(args, dest)}
    if given(args, "preset") or args.init:
        changes["width"] = None  # the preset's own sizes
    for dest, field in (("image_size", "image_size"), ("patch_size", "patch_size"), ("vit_width", "vit_width"),
                        ("vit_depth", "vit_depth"), ("stem", "stem"), ("pool", "pool"),
                        ("feature_select", "feature_select"), ("feature_layer", "feature_layer"),
                        ("contrastive_steps", "contrastive_steps"), ("align_steps", "align_steps"),
                        ("tower_lr_scale", "tower_lr_scale"), ("augment", "augment"),
                        ("answer_balance", "answer_balance"), ("templated", "templated")):
        if getattr(args, dest, None) is not None:
            changes[field] = getattr(args, dest)
    return dataclasses.replace(r, **changes)


def run_train(args: argparse.Namespace) -> int:
    """`mu train --task vqa`: build a VLM (tower + projector + Mu encoder-decoder) and run `train_vqa`."""
    _refuse(args)
    if args.init and given(args, "weight_init"):
        raise MuError("--weight-init applies to a fresh --preset text model, not to an --init model")
    from mu.train.distributed import init_distributed, shutdown
    from mu.train.rundir import RunDir
    from mu.utils import seed_everything
    from mu.vision import load_vqa_jsonl, train_vqa
    from mu.vision.recipe import build_recipe_vlm, prepare_vqa_data

    recipe = recipe_from_args(args)
    out = Path(args.out)
    parts = tuple(p.strip() for p in args.trainable.split(",") if p.strip())
    train = load_vqa_jsonl(args.train_data)[:args.train_limit]  # bad data fails before anything is built
    val = load_vqa_jsonl(args.val_data)[:args.val_limit] if args.val_data else None
    align = load_vqa_jsonl(args.align_data) if args.align_data else None
    native = args.tower == "native"
    if not native and not Path(args.tower).is_dir():
        raise MuError(f"--tower {args.tower!r}: expected 'native' or a CLIP/SigLIP model directory")
    if not native:  # a pretrained tower: no stage 0, projector-only stage 1 unless asked, every patch
        recipe = dataclasses.replace(
            recipe, contrastive_steps=args.contrastive_steps or 0, align_steps=args.align_steps or 0,
            pool=args.pool or 1, augment=bool(args.augment))
    if args.epochs and not given(args, "max_steps"):
        recipe = dataclasses.replace(recipe, steps=math.ceil(args.epochs * len(train) / recipe.batch_size))
    data = prepare_vqa_data(train, recipe, align)
    env = init_distributed(args.device, args.distributed)
    try:
        seed_everything(recipe.seed)
        run = RunDir(out, env)
        point = run.resume_point() if not args.no_resume else None
        if point is not None:  # the run's own model (and tokenizer) continue
            from mu.vision.model import load_vlm

            vlm = load_vlm(point.path / "model", device=env.device)
        else:
            tower = None
            if not native:
                from mu.vision.towers import load_hf_tower

                layer = -2 if args.feature_layer is None else args.feature_layer
                tower = load_hf_tower(args.tower, feature_layer=layer,
                                      feature_select=args.feature_select or "patch", pool_stride=recipe.pool)
            tokenizer = None
            if args.init and args.tokenizer is None:
                from mu.checkpoint import load_model

                tokenizer = load_model(args.init).tokenizer
            vlm = build_recipe_vlm(recipe, data.tokenizer_texts, tokenizer=tokenizer, tower=tower,
                                   text=args.init).to(env.device)
        if env.is_main:
            for note in data.notes:
                print(f"vqa: {note}", file=sys.stderr)
            print(f"vqa: {len(train)} training questions (+{len(data.train) - len(train)} templated), "
                  f"{sum(vlm.num_parameters().values()):,} parameters, {recipe.contrastive_steps} contrastive + "
                  f"{recipe.align_steps} alignment + {recipe.steps} VQA steps -> {out}", file=sys.stderr, flush=True)
        kwargs = recipe.train_kwargs()
        kwargs.update(trainable=parts, warmup_ratio=recipe.warmup if recipe.warmup < 1 else
                      recipe.warmup / max(1, recipe.steps))
        if not native and not given(args, "tower_lr_scale"):
            kwargs["align_trainable"] = ("projector",)
        run_config = {"recipe": recipe.to_dict(), "train_data": str(Path(args.train_data).resolve()),
                      "align_data": str(Path(args.align_data).resolve()) if args.align_data else None,
                      "tower": args.tower, "init": args.init, "train_limit": args.train_limit}
        summary = train_vqa(vlm, data.train, out, eval_data=val, align_data=data.align, log_every=args.log_every,
                            eval_every=args.eval_every if val else 0, save_every=args.save_every,
                            max_time_s=args.max_time, progress=not args.no_progress, resume=not args.no_resume,
                            keep_checkpoints=args.keep_checkpoints, env=env, run_config=run_config, **kwargs)
    finally:
        shutdown(env)
    summary["final_dir"] = str(out / "final")
    if env.is_main:
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
