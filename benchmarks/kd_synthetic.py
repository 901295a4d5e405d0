"""Does distillation help? A decoder-only teacher -> an encoder-decoder student on the synthetic reading task.

    .venv/bin/python benchmarks/kd_synthetic.py --work runs/kd_bench --closed-class --no-paraphrase \
        --teacher-steps 2000 --student-steps 800 --threads 2      # 16 min on a 2-core CPU; docs/distillation.md

1. Synthetic SQuAD-2.0-style splits (mu.data.synthetic; paragraph-disjoint train / val / test).
2. A decoder-only mu teacher (several times the student's parameters) is trained with `mu.train.train`
   (cross-entropy on the target tokens) with a byte-level BPE tokenizer trained on the training text.
3. The encoder-decoder student is trained twice from the same initialisation, for the same number of steps
   on the same batches: (a) cross-entropy only (`mu.train.train`), (b) KD from the teacher
   (`mu.distill.distill`: alpha * KD + (1 - alpha) * CE).
4. Teacher and students are scored on the held-out test split with SQuAD 2.0 exact / F1 (greedy decoding).

The teacher run is reused when --work already holds it (--retrain-teacher to redo). The last line printed
is one JSON object with the scores, the settings and the wall times.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

# The teacher: a decoder-only twin, wider and deeper than the student (see --teacher-* options).
TEACHER_DEFAULTS = dict(width=192, layers=6, heads=6, kv_heads=3)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/kd_bench", help="working directory (data, runs)")
    p.add_argument("--n-train", type=int, default=12800)
    p.add_argument("--prompt", choices=["compact", "paper"], default="compact",
                   help="compact: 'Q: question / C: context / A:' (half the tokens); paper: the SQuAD template")
    p.add_argument("--facts", type=int, default=3, help="synthetic knob facts_per_paragraph")
    p.add_argument("--entities", type=int, default=1, help="synthetic knob entities")
    p.add_argument("--distractors", type=int, default=0, help="synthetic knob distractors")
    p.add_argument("--no-paraphrase", action="store_true", help="synthetic knob paraphrase=False (one wording)")
    p.add_argument("--closed-class", action="store_true",
                   help="synthetic knob attributes=CLOSED_CLASS (answers from fixed lists: job, colour, pet, ...)")
    p.add_argument("--unanswerable", type=float, default=1 / 3, help="synthetic knob: fraction with no answer")
    p.add_argument("--n-val", type=int, default=100)
    p.add_argument("--n-test", type=int, default=300)
    p.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary trained on the training text")
    p.add_argument("--teacher-width", type=int, default=TEACHER_DEFAULTS["width"])
    p.add_argument("--teacher-layers", type=int, default=TEACHER_DEFAULTS["layers"])
    p.add_argument("--teacher-heads", type=int, default=TEACHER_DEFAULTS["heads"])
    p.add_argument("--teacher-kv-heads", type=int, default=TEACHER_DEFAULTS["kv_heads"])
    p.add_argument("--teacher-steps", type=int, default=600)
    p.add_argument("--teacher-lr", type=float, default=2e-3)
    p.add_argument("--student-preset", default="tiny", help="preset the student's overrides apply to")
    p.add_argument("--student-width", type=int, default=128,
                   help="student n_embd (the tiny preset's 64 learns to copy from the context far slower)")
    p.add_argument("--student-layers", default="2,1", help="student encoder,decoder layers")
    p.add_argument("--student-train", type=int, help="train the students on the first N training examples only "
                                                      "(default: all, like the teacher)")
    p.add_argument("--student-steps", type=int, default=400)
    p.add_argument("--student-lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--alpha", type=float, default=0.9)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--divergence", default="forward_kl")
    p.add_argument("--on-policy", type=float, default=0.0)
    p.add_argument("--topk", type=int, default=0, help="precompute the teacher's top-k logits (0: live teacher)")
    p.add_argument("--max-source-len", type=int, default=256)
    p.add_argument("--max-target-len", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=0, help="validation loss every N steps (0: at the end)")
    p.add_argument("--retrain-teacher", action="store_true")
    p.add_argument("--skip-ce", action="store_true", help="reuse the CE-only student of a previous run")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core CPU, 2 threads ran ~5x slower per step)")
    return p.parse_args(argv)


def _examples(args, data: Path) -> dict:
    """The splits as `Example`s, with the paper's SQuAD prompt or a compact one (same question and context).

    Targets get a leading space: with a byte-level BPE (no prefix space) "green" and " green" are different
    tokens, and the answer appears in the context as " green"; without the space an answer cannot be copied
    token by token and small models sit at "unanswerable" for a long time. Predictions are stripped when scored.
    """
    from mu.data.tasks import Example, load_examples

    out = {}
    for split in ("train", "val", "test"):
        examples = load_examples("squad_v2", data / f"{split}.jsonl")
        records = {json.loads(line)["id"]: json.loads(line) for line in (data / f"{split}.jsonl").open()}
        out[split] = [Example(e.id, _prompt(args.prompt, records[e.id], e.source), " " + e.target, e.references)
                      for e in examples]
    return out


def _prompt(kind: str, record: dict, paper_prompt: str) -> str:
    if kind == "paper":
        return paper_prompt
    return f"Q: {record['question']}\nC: {record['context']}\nA:"


def _train_config(args, out: Path, arch: str, preset: str, steps: int, lr: float, tokenizer: str, overrides: dict):
    from mu.train import TrainConfig

    return TrainConfig(out=str(out), arch=arch, preset=preset, model_overrides=overrides, tokenizer=tokenizer,
                       task="squad_v2", val_limit=args.n_val, max_source_len=args.max_source_len,
                       max_target_len=args.max_target_len,
                       max_steps=steps, batch_size=args.batch_size, lr=lr, weight_decay=0.1, warmup=0.05,
                       schedule="cosine", min_lr_ratio=0.1, seed=args.seed, device="cpu", eval_every=args.eval_every,
                       save_every=0, num_samples=0, log_every=50, progress=False, resume=False, precision="fp32")


def _score(model_dir: Path, examples, max_new_tokens: int) -> dict:
    from mu.checkpoint import load_model
    from mu.eval import evaluate_model

    model = load_model(model_dir, dtype="fp32")
    metrics, _ = evaluate_model(model, model.tokenizer, "squad_v2", examples, batch_size=32,
                                max_new_tokens=max_new_tokens, progress=False)
    keep = ("exact", "f1", "HasAns_f1", "NoAns_f1")
    return {k: round(float(metrics[k]), 2) for k in keep if k in metrics}


def _fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from mu.checkpoint import load_model
    from mu.data.synthetic import write_synthetic_splits
    from mu.distill import DistillConfig, distill
    from mu.tokenizer import train_tokenizer
    from mu.train import train

    work = Path(args.work)
    data = work / "data"
    from mu.data.synthetic import CLOSED_CLASS

    knobs = dict(facts_per_paragraph=args.facts, entities=args.entities, distractors=args.distractors,
                 paraphrase=not args.no_paraphrase, unanswerable=args.unanswerable,
                 attributes=list(CLOSED_CLASS) if args.closed_class else None)
    write_synthetic_splits(data, args.n_train, args.n_val, args.n_test, seed=args.seed, **knobs)
    ex = _examples(args, data)
    tokenizer_dir = work / "tokenizer"
    if args.retrain_teacher or not (tokenizer_dir / "tokenizer.json").is_file():  # shared by teacher and student
        tok = train_tokenizer([t for e in ex["train"] for t in (e.source, e.target)], args.vocab)
        tok.save_pretrained(_fresh(tokenizer_dir))
    times: dict[str, float] = {}
    t_all = time.perf_counter()
    max_new = args.max_target_len + 1

    student_train = ex["train"][:args.student_train] if args.student_train else ex["train"]

    def run_train(out: Path, arch: str, preset: str, steps: int, lr: float, overrides: dict, examples) -> None:
        cfg = _train_config(args, _fresh(out), arch, preset, steps, lr, str(tokenizer_dir), overrides)
        train(cfg, train_examples=examples, val_examples=ex["val"])

    # 1. the teacher (decoder-only), reused if present
    teacher_dir = work / "teacher"
    teacher_overrides = dict(n_embd=args.teacher_width, qkv_embd=args.teacher_width, n_head=args.teacher_heads,
                             n_kv_head=args.teacher_kv_heads, hidden_dim=4 * args.teacher_width,
                             n_decoder_layer=args.teacher_layers, dropout=0.0)
    if args.retrain_teacher or not (teacher_dir / "final" / "config.json").is_file():
        t0 = time.perf_counter()
        run_train(teacher_dir, "deconly", "tiny", args.teacher_steps, args.teacher_lr, teacher_overrides, ex["train"])
        times["teacher_train_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    teacher_score = _score(teacher_dir / "final", ex["test"], max_new)
    times["teacher_eval_s"] = time.perf_counter() - t0
    print(f"teacher: {teacher_score}", file=sys.stderr, flush=True)

    # 2. the student, CE only
    n_enc, n_dec = (int(x) for x in args.student_layers.split(","))
    student_overrides = dict(dropout=0.0, n_embd=args.student_width, qkv_embd=args.student_width,
                             hidden_dim=4 * args.student_width, n_encoder_layer=n_enc, n_decoder_layer=n_dec)
    ce_dir = work / "student_ce"
    if not (args.skip_ce and (ce_dir / "final" / "config.json").is_file()):
        t0 = time.perf_counter()
        run_train(ce_dir, "encdec", args.student_preset, args.student_steps, args.student_lr, student_overrides,
                  student_train)
        times["ce_train_s"] = time.perf_counter() - t0
    ce_score = _score(ce_dir / "final", ex["test"], max_new)
    print(f"student CE only: {ce_score}", file=sys.stderr, flush=True)

    # 3. the student, KD: same initialisation (same seed), same batches, same steps
    kd_dir = work / "student_kd"
    t0 = time.perf_counter()
    kd_train = _train_config(args, _fresh(kd_dir), "encdec", args.student_preset, args.student_steps,
                             args.student_lr, str(tokenizer_dir), student_overrides)
    distill(DistillConfig(train=kd_train, teacher=str(teacher_dir / "final"), student_preset=args.student_preset,
                          alpha=args.alpha, temperature=args.temperature, divergence=args.divergence,
                          on_policy=args.on_policy, topk=args.topk, max_sample_tokens=max_new),
            train_examples=student_train, val_examples=ex["val"])
    times["kd_train_s"] = time.perf_counter() - t0
    kd_score = _score(kd_dir / "final", ex["test"], max_new)
    print(f"student KD: {kd_score}", file=sys.stderr, flush=True)
    times["total_s"] = time.perf_counter() - t_all

    n_teacher = load_model(teacher_dir / "final").num_parameters()
    n_student = load_model(ce_dir / "final").num_parameters()
    result = {"benchmark": "kd_synthetic", "teacher": {"arch": "deconly", "params": n_teacher, **teacher_score},
              "student_ce": {"arch": "encdec", "preset": args.student_preset, "params": n_student, **ce_score},
              "student_kd": {**kd_score}, "kd_gain_f1": round(kd_score["f1"] - ce_score["f1"], 2),
              "student_steps": args.student_steps, "teacher_steps": args.teacher_steps, "batch_size": args.batch_size,
              "student_lr": args.student_lr, "alpha": args.alpha, "temperature": args.temperature,
              "divergence": args.divergence, "on_policy": args.on_policy, "topk": args.topk, "prompt": args.prompt,
              "knobs": knobs, "n_train": args.n_train, "student_train": len(student_train), "n_test": args.n_test, "threads": torch.get_num_threads(),
              "wall_s": {k: round(v, 1) for k, v in times.items()},
              "note": "wall times of this run: other jobs on the machine inflate them"}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
