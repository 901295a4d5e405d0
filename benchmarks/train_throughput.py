"""Training throughput (tokens/s) of the encoder-decoder and its decoder-only twin on this machine.

    .venv/bin/python benchmarks/train_throughput.py                    # small preset, fp32, ~2-4 min on 2 cores
    .venv/bin/python benchmarks/train_throughput.py --preset tiny --steps 10

Both architectures train on the same examples: a batch of `--batch-size` examples with a
`--source-len`-token source and a `--target-len`-token target (SQuAD-like by default). One step is
what `mu.train` runs: the collated batch, forward, backward, gradient clipping and the AdamW update.
After `--warmup` steps, `--steps` steps are timed (synchronised on CUDA) and the median is reported.

tokens/s counts the real tokens each model processes per second: the encoder-decoder reads the
source with its encoder and the target with its decoder; the decoder-only model reads source +
target. `examples_per_s` is the directly comparable number (the same examples for both);
`train_flops_per_s` uses `mu.train.training_flops` (6·N per stack). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def bench_arch(arch: str, args) -> dict:
    import mu
    from mu.data.batching import Collator, move_batch
    from mu.train.flops import training_flops
    from mu.train.objectives import seq2seq_loss
    from mu.train.optim import build_optimizer
    from mu.train.trainer import resolve_precision

    device = mu.utils.pick_device(args.device)
    torch.manual_seed(0)
    overrides = {"dropout": 0.0} if args.no_dropout else {}
    if args.vocab_size:
        overrides["vocab_size"] = args.vocab_size
    model = mu.build_model(args.preset, arch=arch, **overrides).to(device).train()
    amp = resolve_precision(args.precision, device)
    opt = build_optimizer(model, 3e-4, 0.1, (0.9, 0.95), 1e-8, device)
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    features = [{"source_ids": torch.randint(4, V - 100, (args.source_len,), generator=g).tolist(),
                 "target_ids": torch.randint(4, V - 100, (args.target_len - 1,), generator=g).tolist() + [2]}
                for _ in range(args.batch_size)]
    batch = move_batch(Collator(arch)(features), device)
    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=amp) if amp else torch.autocast(device.type, enabled=False):
            loss, _ = seq2seq_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        if i >= args.warmup:
            times.append(dt)
        print(f"{arch} step {i + 1}/{args.warmup + args.steps}: {dt:.3f} s, loss {loss.item():.3f}",
              file=sys.stderr, flush=True)
    step_s = statistics.median(times)
    enc, dec = batch["n_enc_tokens"], batch["n_dec_tokens"]
    flops = training_flops(model.config, enc, dec)
    return {"arch": arch, "params": model.num_parameters(), "median_step_s": step_s,
            "step_s": [round(t, 4) for t in times], "tokens_per_step": enc + dec, "enc_tokens_per_step": enc,
            "dec_tokens_per_step": dec, "tokens_per_s": (enc + dec) / step_s,
            "examples_per_s": args.batch_size / step_s, "train_flops_per_step": flops,
            "train_flops_per_s": flops / step_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--vocab-size", type=int, default=None, help="override the preset's vocabulary (32128)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--source-len", type=int, default=256)
    p.add_argument("--target-len", type=int, default=16, help="target tokens including EOS")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-dropout", action="store_true", help="dropout 0 (default: the preset's 0.1)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {arch: bench_arch(arch, args) for arch in ("encdec", "deconly")}
    e, d = results["encdec"], results["deconly"]
    summary = {"benchmark": "train_throughput", "preset": args.preset, "precision": args.precision,
               "device": args.device, "threads": torch.get_num_threads(), "batch_size": args.batch_size,
               "source_len": args.source_len, "target_len": args.target_len, "results": results,
               "encdec_over_deconly": {"examples_per_s": e["examples_per_s"] / d["examples_per_s"],
                                       "tokens_per_s": e["tokens_per_s"] / d["tokens_per_s"]}}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
