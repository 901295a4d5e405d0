"""SQuAD 2.0 at a matched training-FLOP budget: encoder-decoder vs decoder-only, trained from scratch.

    .venv/bin/python benchmarks/squad_matched_flops.py --work runs/squad_flops     # ~15 min on 2 busy cores

1. A byte-level BPE tokenizer (`--tokenizer bpe:4096`) is trained once on the training sources and
   targets and shared by both runs (or pass a tokenizer directory, e.g. ../shared/data/phi3_tokenizer).
2. Each architecture trains with `mu.train.train` on ../shared/data/squad_v2_train.jsonl until it has
   spent `--max-flops` training FLOPs (6·N per stack for the tokens each stack processed, see
   mu.train.flops); same data order, batch size, optimiser and schedule.
3. Each final model is scored on ../shared/data/squad_v2_dev.jsonl with SQuAD 2.0 exact/F1 (greedy,
   cached, batched decoding through `mu.eval.evaluate_model`), and its cross-entropy on the answer tokens
   of the first `--val-loss-limit` dev questions is reported (`dev_target_loss`: the same tokens are
   scored for both architectures, so it separates runs that F1 cannot, e.g. when both always abstain).

The default model is the `tiny` preset (6+3 layers of width 64 for the encoder-decoder, 10 layers for
the decoder-only twin), dropout 0: the `small` preset trains at well under one SQuAD example per second
on a shared 2-core CPU (see benchmarks/train_throughput.py), which would leave it a few hundred examples
in 15-20 minutes. Runs are resumable: re-running with the same --work reuses finished training. The
last line printed is one JSON object. Numbers on a shared CPU are noisy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/squad_matched_flops", help="directory for the tokenizer and both runs")
    p.add_argument("--train-data", default=str(DATA / "squad_v2_train.jsonl"))
    p.add_argument("--dev-data", default=str(DATA / "squad_v2_dev.jsonl"))
    p.add_argument("--preset", default="tiny")
    p.add_argument("--tokenizer", default="bpe:4096", help="bpe:N (trained on the training text) or a directory")
    p.add_argument("--max-flops", type=float, default=1e12, help="training FLOP budget of each run")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-source-len", type=int, default=384)
    p.add_argument("--max-target-len", type=int, default=24)
    p.add_argument("--dev-limit", type=int, default=None, help="score only the first N dev questions")
    p.add_argument("--val-loss-limit", type=int, default=256,
                   help="dev questions for the target cross-entropy reported at the end of training")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is fastest for these small models on a busy 2-core machine)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from mu.checkpoint import load_model
    from mu.data.tasks import NO_ANSWER, load_examples
    from mu.eval import evaluate_model
    from mu.tokenizer import has_tokenizer_files, train_tokenizer
    from mu.train import TrainConfig, train

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    train_examples = load_examples("squad_v2", args.train_data)
    dev = load_examples("squad_v2", args.dev_data, limit=args.dev_limit)
    tok_dir = Path(args.tokenizer) if not args.tokenizer.startswith("bpe:") else work / "tokenizer"
    if args.tokenizer.startswith("bpe:") and not has_tokenizer_files(tok_dir):
        t0 = time.perf_counter()
        tok = train_tokenizer([t for e in train_examples for t in (e.source, e.target)], int(args.tokenizer[4:]))
        tok.save_pretrained(tok_dir)
        print(f"trained {args.tokenizer} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    results = {}
    for arch in ("encdec", "deconly"):
        cfg = TrainConfig(out=str(work / arch), arch=arch, preset=args.preset, model_overrides={"dropout": 0.0},
                          tokenizer=str(tok_dir), task="squad_v2", train_data=args.train_data,
                          max_flops=args.max_flops, batch_size=args.batch_size, lr=args.lr, warmup=0.05,
                          max_source_len=args.max_source_len, max_target_len=args.max_target_len,
                          save_every=200, eval_every=0, log_every=20, seed=args.seed, val_data=args.dev_data,
                          val_limit=args.val_loss_limit, num_samples=0)
        t0 = time.perf_counter()
        r = train(cfg)
        train_s = time.perf_counter() - t0
        model = load_model(r.final_dir)
        t0 = time.perf_counter()
        metrics, predictions = evaluate_model(model, model.tokenizer, "squad_v2", dev, batch_size=32,
                                              max_new_tokens=args.max_target_len + 1,
                                              max_source_len=args.max_source_len, progress=False)
        eval_s = time.perf_counter() - t0
        no_answer = sum(p.strip() == NO_ANSWER for p in predictions.values()) / len(predictions)
        results[arch] = {"params": r.params, "steps": r.steps, "examples": r.examples, "epochs": r.epochs,
                         "enc_tokens": r.enc_tokens, "dec_tokens": r.dec_tokens, "train_flops": r.flops,
                         "final_train_loss": r.train_loss, "dev_target_loss": r.val_loss, "train_tokens_per_s": r.tokens_per_s,
                         "train_examples_per_s": r.examples / r.elapsed_s if r.elapsed_s else None,
                         "train_wall_s": train_s, "eval_wall_s": eval_s, "predicted_no_answer": no_answer,
                         "dev": metrics}
        print(f"{arch}: {r.steps} steps, {r.examples} examples, {r.flops:.3g} FLOPs, loss {r.train_loss:.3f}, "
              f"dev F1 {metrics.get('f1')}", file=sys.stderr, flush=True)
    n_noans = sum(not e.references for e in dev)
    print(json.dumps({"benchmark": "squad_matched_flops", "preset": args.preset, "tokenizer": args.tokenizer,
                      "max_flops": args.max_flops, "threads": args.threads, "dev_examples": len(dev),
                      "always_no_answer_f1": 100.0 * n_noans / len(dev), "results": results}))


if __name__ == "__main__":
    main()
