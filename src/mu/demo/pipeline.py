"""`run_demo(DemoConfig)`: the paper's comparison at small scale, as a list of resumable stages.

    data      tokenizer (byte-level BPE) + train / val / test splits (built-in synthetic reading
              comprehension with unanswerable questions, or squad_v2 files)
    teacher   a decoder-only teacher several times the students' size (mu.train.train)
    encdec    the encoder-decoder student, cross-entropy, FLOP budget B
    deconly   the decoder-only student: same widths, the depth that matches the parameters, budget B
    encdec_kd the encoder-decoder student distilled from the teacher (mu.distill.distill), budget B
    evaluate  all four on the test split (and val): exact / F1, HasAns / NoAns (mu.eval.evaluate_model)
    bench     inference of the two students' architectures at a larger size (mu.bench.run_benchmark)
    report    report.md, report.json, PNG plots

Every stage records a hash of its settings (and of the stages it reads) in DIR/demo_manifest.json;
re-running the same command reuses finished stages, resumes an interrupted training run from its
checkpoint, and redoes a stage whose settings changed together with the stages that depend on it.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from mu.demo.config import DemoConfig, settings_hash
from mu.demo.manifest import Manifest
from mu.atomic import atomic_directory, atomic_write_text
from mu.demo.progress import Plan, fmt_time
from mu.errors import MuError

STAGES = ("data", "teacher", "encdec", "deconly", "encdec_kd", "evaluate", "bench", "report")
MODELS = ("teacher", "encdec", "deconly", "encdec_kd")  # trained models, in report order
# stage -> the stages whose outputs it reads
DEPENDS = {"data": (), "teacher": ("data",), "encdec": ("data",), "deconly": ("data",),
           "encdec_kd": ("data", "teacher"), "evaluate": ("data",) + MODELS, "bench": (),
           "report": STAGES[:-1]}
TASK = "squad_v2"


@dataclass
class DemoResult:
    out: Path
    report: dict[str, Any]
    files: dict[str, Path]  # report.md, report.json, the PNGs
    stages: dict[str, str] = field(default_factory=dict)  # stage -> "ran" | "reused"
    seconds: float = 0.0


class Demo:
    """One demo directory: its settings, manifest, data and stages."""

    def __init__(self, cfg: DemoConfig):
        import torch

        from mu.utils import pick_device

        self.cfg = cfg
        self.out = Path(cfg.out)
        self.device = pick_device(cfg.device)
        self.torch = torch
        self.manifest = Manifest(self.out)
        self.plan = Plan(enabled=cfg.progress)
        self.hashes = self._stage_hashes()
        self._examples: dict[str, list] = {}
        self._tokenizer = None
        self._features = None
        self.loads: dict[str, list[float]] = {}

    # -- settings and hashes --------------------------------------------------------------------

    def stage_settings(self, stage: str) -> dict[str, Any]:
        c = self.cfg
        train_common = dict(batch_size=c.batch_size, warmup=c.warmup, weight_decay=c.weight_decay, seed=c.seed,
                            max_source_len=c.max_source_len, max_target_len=c.max_target_len, dropout=c.dropout,
                            precision=c.precision, evals_per_run=c.evals_per_run, max_new_tokens=c.max_new_tokens)
        budget = dict(student_examples=c.student_examples, student_flops=c.student_flops)
        if stage == "data":
            return dict(train_data=_file_key(c.train_data), val_data=_file_key(c.val_data),
                        test_data=_file_key(c.test_data), n_train=c.n_train, n_val=c.n_val, n_test=c.n_test,
                        synthetic=c.synthetic, vocab_size=c.vocab_size, tokenizer="byte-bpe+prefix-space", seed=c.seed)
        if stage == "teacher":
            return dict(model=c.teacher, examples=c.teacher_examples, lr=c.teacher_lr, **train_common)
        if stage == "encdec":
            return dict(model=c.student, lr=c.student_lr, **budget, **train_common)
        if stage == "deconly":
            return dict(model=c.student, lr=c.deconly_lr, **budget, **train_common)
        if stage == "encdec_kd":
            return dict(model=c.student, lr=c.student_lr, **budget, **train_common, alpha=c.kd_alpha,
                        temperature=c.kd_temperature, divergence=c.kd_divergence, on_policy=c.kd_on_policy,
                        topk=c.kd_topk)
        if stage == "evaluate":
            return dict(batch=c.eval_batch_size, max_new_tokens=c.max_new_tokens, max_source_len=c.max_source_len)
        if stage == "bench":
            return dict(preset=c.bench_preset, lengths=list(c.bench_input_lengths), new_tokens=c.bench_new_tokens,
                        repeats=c.bench_repeats, memory=c.bench_memory, seed=c.seed,
                        device=str(self.device.type))
        if stage == "report":
            from mu.demo import report

            return dict(version=report.REPORT_VERSION)
        raise ValueError(stage)

    def _stage_hashes(self) -> dict[str, str]:
        hashes: dict[str, str] = {}
        for stage in STAGES:
            hashes[stage] = settings_hash(stage, self.stage_settings(stage), [hashes[d] for d in DEPENDS[stage]])
        return hashes

    # -- data -------------------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self.out / "data"

    @property
    def tokenizer_dir(self) -> Path:
        return self.out / "tokenizer"

    def examples(self, split: str) -> list:
        """The split's `Example`s (built-in synthetic files in DIR/data, or the user's files)."""
        if split in self._examples:
            return self._examples[split]
        from mu.data.tasks import load_examples

        c = self.cfg
        if c.train_data is None:
            self._examples[split] = load_examples(TASK, self.data_dir / f"{split}.jsonl")
            return self._examples[split]
        train = load_examples(TASK, c.train_data)
        carved: dict[str, list] = {}
        if c.val_data is None:  # held out from the end of the training file (SQuAD files are grouped by article)
            carved["val"], train = train[len(train) - c.n_val:], train[:len(train) - c.n_val]
        if c.test_data is None and c.val_data is None:
            carved["test"], train = train[len(train) - c.n_test:], train[:len(train) - c.n_test]
        if len(train) < c.batch_size:
            raise MuError(f"--train-data {c.train_data}: {len(train)} examples left for training after holding "
                          f"out validation/test examples; need at least --batch-size={c.batch_size}")
        self._examples["train"] = train[:c.n_train]
        self._examples["val"] = carved.get("val") or load_examples(TASK, c.val_data, limit=c.n_val)
        test_path = c.test_data or c.val_data
        self._examples["test"] = carved.get("test") or load_examples(TASK, test_path, limit=c.n_test)
        return self._examples[split]

    def data_source(self) -> dict[str, str]:
        c = self.cfg
        if c.train_data is None:
            return {s: str(self.data_dir / f"{s}.jsonl") for s in ("train", "val", "test")}
        return {"train": c.train_data,
                "val": c.val_data or f"last {c.n_val} examples of {c.train_data}",
                "test": c.test_data or c.val_data or f"{c.n_test} examples held out from {c.train_data}"}

    def tokenizer(self):
        if self._tokenizer is None:
            from mu.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_dir)
        return self._tokenizer

    def vocab_size(self) -> int:
        from mu.train.trainer import model_vocab_size

        return model_vocab_size(self.tokenizer())

    def model_config(self, role: str):
        return self.cfg.model_config("encdec" if role == "encdec_kd" else role, self.vocab_size())

    def train_features(self) -> list[dict]:
        if self._features is None:
            import warnings

            from mu.data.batching import TruncationWarning, encode_examples

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", TruncationWarning)  # the trainer reports truncation itself
                self._features = encode_examples(self.examples("train"), self.tokenizer(), self.cfg.max_source_len,
                                                 self.cfg.max_target_len, task=TASK)
        return self._features

    def student_budget(self) -> float:
        """The students' FLOP budget: explicit, or what the encoder-decoder spends on `student_examples`."""
        if self.cfg.student_flops:
            return float(self.cfg.student_flops)
        from mu.train.flops import training_flops

        f = self.train_features()
        enc = sum(len(x["source_ids"]) for x in f) / len(f)
        dec = sum(len(x["target_ids"]) for x in f) / len(f)
        return training_flops(self.model_config("encdec"), enc * self.cfg.student_examples,
                              dec * self.cfg.student_examples)

    def flops_per_example(self, role: str) -> float:
        from mu.train.flops import training_flops

        f = self.train_features()
        enc = sum(len(x["source_ids"]) for x in f) / len(f)
        dec = sum(len(x["target_ids"]) for x in f) / len(f)
        config = self.model_config(role)
        if config.arch == "deconly":
            return training_flops(config, 0, enc + dec - 1)
        return training_flops(config, enc, dec)

    # -- the stages ---------------------------------------------------------------------------------

    def run_data(self) -> dict[str, Any]:
        c = self.cfg
        if c.train_data is None:
            from mu.data.synthetic import write_synthetic_splits

            write_synthetic_splits(self.data_dir, c.n_train, c.n_val, c.n_test, seed=c.seed, **c.synthetic)
        self._examples.clear()
        splits = {s: self.examples(s) for s in ("train", "val", "test")}
        tok = copy_friendly_tokenizer([t for e in splits["train"] for t in (e.source, e.target)], c.vocab_size)
        with atomic_directory(self.tokenizer_dir) as tmp:
            tok.save_pretrained(tmp)
        self._tokenizer, self._features = None, None
        summary: dict[str, Any] = {"source": self.data_source(),
                                   "tokenizer": f"byte-level BPE with a prefix space, {len(tok)} tokens"}
        for name, exs in splits.items():
            ids = tok([e.source for e in exs], add_special_tokens=False)["input_ids"]
            tids = tok([e.target for e in exs], add_special_tokens=False)["input_ids"]
            summary[name] = {"examples": len(exs), "unanswerable": sum(not e.references for e in exs),
                             "mean_source_tokens": sum(map(len, ids)) / len(ids),
                             "mean_target_tokens": sum(map(len, tids)) / len(tids) + 1}  # + EOS
        return summary

    def _train_config(self, stage: str, **extra):
        from mu.train import TrainConfig

        c = self.cfg
        role = "teacher" if stage == "teacher" else ("deconly" if stage == "deconly" else "encdec")
        config = self.model_config(role)
        overrides = {k: v for k, v in config.to_dict().items() if k != "arch"}
        lr = {"teacher": c.teacher_lr, "deconly": c.deconly_lr}.get(stage, c.student_lr)
        steps = extra.pop("steps", None)
        eval_every = max(1, (steps or 1) // c.evals_per_run) if steps else 0
        return TrainConfig(
            out=str(self.out / stage), arch=config.arch, preset="tiny", model_overrides=overrides,
            tokenizer=str(self.tokenizer_dir), task=TASK, max_source_len=c.max_source_len,
            max_target_len=c.max_target_len, batch_size=c.batch_size, lr=lr, warmup=c.warmup, schedule="cosine",
            weight_decay=c.weight_decay, seed=c.seed, device=str(self.device), precision=c.precision,
            val_limit=c.n_val, eval_every=eval_every, save_every=eval_every, keep_checkpoints=1, num_samples=0,
            best_metric="f1", eval_batch_size=c.eval_batch_size, max_new_tokens=c.max_new_tokens,
            log_every=max(1, (steps or 100) // 100), progress=c.progress, resume=True, max_steps=steps, **extra)

    def _on_step(self, stage: str, total: Callable[[Any], float]):
        def on_step(state) -> None:
            self.plan.update(stage, total(state), note=f"loss {state.last_loss:.3f}" if state.last_loss else None)

        return on_step

    def run_teacher(self) -> dict[str, Any]:
        from mu.train import train

        steps = max(1, math.ceil(self.cfg.teacher_examples / self.cfg.batch_size))
        cfg = self._train_config("teacher", steps=steps)
        result = train(cfg, tokenizer=self.tokenizer(), train_examples=self.examples("train"),
                       val_examples=self.examples("val"),
                       on_step=self._on_step("teacher", lambda s: s.step / steps))
        return _train_summary(result)

    def _student_steps(self, role: str) -> int:
        """Steps the FLOP budget allows (an estimate: the trainer stops on the exact FLOP count)."""
        return max(1, math.ceil(self.student_budget() / (self.flops_per_example(role) * self.cfg.batch_size)))

    def run_student(self, stage: str) -> dict[str, Any]:
        from mu.train import train

        budget = self.student_budget()
        cfg = self._train_config(stage, max_flops=budget)
        steps = self._student_steps(stage)
        cfg.eval_every = cfg.save_every = max(1, steps // self.cfg.evals_per_run)
        cfg.log_every = max(1, steps // 100)
        result = train(cfg, tokenizer=self.tokenizer(), train_examples=self.examples("train"),
                       val_examples=self.examples("val"),
                       on_step=self._on_step(stage, lambda s: s.flops / budget))
        return {**_train_summary(result), "flops_budget": budget}

    def run_kd(self) -> dict[str, Any]:
        from mu.distill import DistillConfig, distill

        c = self.cfg
        budget = self.student_budget()
        tc = self._train_config("encdec_kd", max_flops=budget)
        steps = self._student_steps("encdec")
        tc.eval_every = tc.save_every = max(1, steps // c.evals_per_run)
        tc.log_every = max(1, steps // 100)
        dc = DistillConfig(train=tc, teacher=str(self.out / "teacher" / "final"), student_preset="tiny",
                           alpha=c.kd_alpha, temperature=c.kd_temperature, divergence=c.kd_divergence,
                           on_policy=c.kd_on_policy, topk=c.kd_topk, max_sample_tokens=c.max_target_len + 1)
        result = distill(dc, train_examples=self.examples("train"), val_examples=self.examples("val"),
                         on_step=self._on_step("encdec_kd", lambda s: s.flops / budget))
        teacher_params = _param_count(self.model_config("teacher"))
        # the teacher reads source + target for every KD example (a forward pass: 2 FLOPs per parameter per token)
        teacher_tokens = result.enc_tokens + result.dec_tokens
        return {**_train_summary(result), "flops_budget": budget,
                "teacher_forward_flops": 2.0 * teacher_params * teacher_tokens}

    def run_evaluate(self) -> dict[str, Any]:
        from mu.checkpoint import load_model
        from mu.eval import evaluate_model

        c = self.cfg
        eval_dir = self.out / "evaluate"
        eval_dir.mkdir(parents=True, exist_ok=True)
        summary: dict[str, Any] = {}
        n = len(MODELS)
        for k, name in enumerate(MODELS):
            model = load_model(self.out / name / "final", device=self.device)
            result: dict[str, Any] = {}
            for split in ("val", "test"):
                metrics, preds = evaluate_model(model, self.tokenizer(), TASK, self.examples(split),
                                                batch_size=c.eval_batch_size, max_new_tokens=c.max_new_tokens,
                                                max_source_len=c.max_source_len, device=self.device,
                                                progress=False)
                result[split] = {k2: float(v) for k2, v in metrics.items()}
                if split == "test":
                    lines = "".join(json.dumps({"id": i, "prediction": p}) + "\n" for i, p in preds.items())
                    atomic_write_text(eval_dir / f"{name}_test_predictions.jsonl", lines)
                    result["per_example_f1"] = per_example_f1(self.examples("test"), preds)
            summary[name] = result
            self.plan.update("evaluate", (k + 1) / n, note=f"{name}: test F1 {result['test']['f1']:.1f}")
            del model
        atomic_write_text(eval_dir / "metrics.json", json.dumps(summary, indent=1) + "\n")
        return {name: {"test_f1": r["test"]["f1"], "val_f1": r["val"]["f1"]} for name, r in summary.items()}

    def run_bench(self) -> dict[str, Any]:
        from mu.bench import BenchConfig, run_benchmark

        c = self.cfg
        lengths = tuple(sorted(c.bench_input_lengths))
        common = dict(preset=c.bench_preset, archs=("encdec", "deconly"), new_tokens=c.bench_new_tokens,
                      batch_sizes=(1,), dtypes=("fp32",), device=str(self.device), flop_check=False,
                      threads=c.threads, seed=c.seed, out=None, plots=False, progress=c.progress)
        # timings at every length; peak memory (a fresh process per configuration) only at the longest
        result = run_benchmark(BenchConfig(input_lengths=lengths, summary_length=lengths[-1], repeats=c.bench_repeats,
                                           warmup=1, memory=False, **common))
        if c.bench_memory:
            mem = run_benchmark(BenchConfig(input_lengths=lengths[-1:], repeats=1, warmup=0, memory=True, **common))
            keys = ("peak_rss_bytes", "rss_loaded_bytes", "increment_bytes", "device_peak_bytes",
                    "device_increment_bytes")
            for row in result["rows"]:
                for m in mem["rows"]:
                    if (m["arch"], m["input_length"], m["batch"]) == (row["arch"], row["input_length"], row["batch"]):
                        row.update({k: m.get(k) for k in keys})
            for k in ("memory_ratio", "memory_increment_ratio", "device_memory_ratio"):
                result["summary"][k] = mem["summary"].get(k)
        bench_dir = self.out / "bench"
        bench_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(bench_dir / "bench.json", json.dumps(result, indent=1, default=str) + "\n")
        return {k: v for k, v in result["summary"].items() if not isinstance(v, (dict, list))}

    def run_report(self) -> dict[str, Any]:
        from mu.demo import report

        rep = report.build_report(self)
        files = report.write_report(rep, self.out)
        return {"files": {k: str(v) for k, v in files.items()}}

    # -- estimates --------------------------------------------------------------------------------

    def calibrate(self, roles: list[str]) -> dict[str, float]:
        """Seconds per optimizer step of each role's model on this device (a few real steps on real data)."""
        import torch

        from mu.checkpoint import build_model
        from mu.data.batching import Collator, move_batch
        from mu.train.objectives import seq2seq_loss

        feats = self.train_features()
        rng = random.Random(self.cfg.seed)
        sample = rng.sample(feats, min(len(feats), self.cfg.batch_size))
        out: dict[str, float] = {}
        for role in roles:
            config = self.model_config(role)
            model = build_model(config).to(self.device).train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            batch = move_batch(Collator(config.arch)(sample), self.device)
            times = []
            for i in range(3):
                _sync(self.device)
                t0 = time.perf_counter()
                loss, _ = seq2seq_loss(model, batch)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                _sync(self.device)
                times.append(time.perf_counter() - t0)
            out[role] = min(times[1:])
            if role == "teacher":
                model.eval()
                with torch.no_grad():
                    _sync(self.device)
                    t0 = time.perf_counter()
                    seq2seq_loss(model, batch)
                    _sync(self.device)
                out["teacher_forward"] = time.perf_counter() - t0
            del model, opt
        return out

    def estimates(self, pending: list[str]) -> dict[str, float]:
        c = self.cfg
        need = [r for r, stages in (("teacher", ("teacher", "encdec_kd", "evaluate")), ("encdec", ("encdec", "encdec_kd", "evaluate", "bench")),
                                    ("deconly", ("deconly", "evaluate"))) if any(s in pending for s in stages)]
        step = self.calibrate(need) if need else {}
        overhead = 1.15  # logging, checkpoints, batching
        per_ex = {r: step.get(r, 0.0) / c.batch_size for r in ("teacher", "encdec", "deconly")}

        def evals(role: str, n: int) -> float:  # greedy generation of n examples: ~ a forward + a few decode steps
            return n * per_ex[role] * 0.6

        est: dict[str, float] = {"data": 2.0 + c.n_train * 3e-4}
        t_steps = math.ceil(c.teacher_examples / c.batch_size)
        est["teacher"] = t_steps * step.get("teacher", 0.0) * overhead + (c.evals_per_run + 1) * evals("teacher", c.n_val)
        for role in ("encdec", "deconly"):
            if role in step:
                est[role] = (self._student_steps(role) * step[role] * overhead
                             + (c.evals_per_run + 1) * evals(role, c.n_val))
        if "encdec" in step and "teacher_forward" in step:
            kd_step = step["encdec"] + step["teacher_forward"]
            est["encdec_kd"] = (self._student_steps("encdec") * kd_step * overhead
                                + (c.evals_per_run + 1) * (evals("encdec", c.n_val) + c.n_val * step["teacher_forward"] / c.batch_size))
        if step:
            est["evaluate"] = sum(evals(r, c.n_val + c.n_test) for r in ("teacher", "encdec", "deconly", "encdec")
                                  if per_ex.get(r))
        est["bench"] = self._bench_estimate(step)
        est["report"] = 3.0
        return est

    def _bench_estimate(self, step: dict[str, float]) -> float:
        from mu.bench import generation_flops
        from mu.config import MuConfig

        c = self.cfg
        if "encdec" in step and step["encdec"] > 0:  # this device's training FLOP rate, as a guide for inference
            rate = self.flops_per_example("encdec") * c.batch_size / step["encdec"]
        else:
            rate = 2e10
        total = 0.0
        for arch in ("encdec", "deconly"):
            config = MuConfig.from_name(c.bench_preset, arch)
            for L in c.bench_input_lengths:
                f = generation_flops(config, L, c.bench_new_tokens)
                # prefill at the FLOP rate; decode steps are latency-bound (~1 ms per layer on a CPU)
                run = f["prefill"] / rate + c.bench_new_tokens * max(f["decode"] / c.bench_new_tokens / rate,
                                                                     config.n_decoder_layer * 1e-3)
                total += run * (c.bench_repeats + 0.5)
                if c.bench_memory:
                    total += 4.0 + run  # a fresh python + torch process per configuration
        return total + 5.0

    # -- the run ------------------------------------------------------------------------------------

    def run(self) -> DemoResult:
        c = self.cfg
        t_start = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "demo_config.json", json.dumps(c.to_dict(), indent=1) + "\n")
        done = {s: self.manifest.is_done(s, self.hashes[s]) and self._outputs_exist(s) for s in STAGES}
        pending = [s for s in STAGES if not done[s]]
        ran = {s: ("reused" if done[s] else "ran") for s in STAGES}
        descriptions = self.describe()
        kinds = {"data": "data", "teacher": "train", "encdec": "train", "deconly": "train", "encdec_kd": "train",
                 "evaluate": "eval", "bench": "bench", "report": "report"}
        for s in STAGES:
            self.plan.add(s, descriptions[s], 2.0 + c.n_train * 3e-4 if s == "data" else 1.0, kinds[s])
            if done[s]:
                self.plan.reuse(s)
        if "data" in pending:  # the estimates need the tokenizer and the training features
            self._run_stage("data", self.run_data)
        for s, seconds in self.estimates(pending).items():
            if s in pending and s != "data":
                self.plan.set_estimate(s, seconds)
        self.plan.show(f"mu demo ({c.preset}) -> {self.out}: {len(pending)} of {len(STAGES)} stages to run on "
                       f"{self.device}, {self.torch.get_num_threads()} threads, load average "
                       f"{_load():.1f} on {os.cpu_count()} cores")
        runners = {"teacher": self.run_teacher, "encdec": lambda: self.run_student("encdec"),
                   "deconly": lambda: self.run_student("deconly"), "encdec_kd": self.run_kd,
                   "evaluate": self.run_evaluate, "bench": self.run_bench, "report": self.run_report}
        for s in STAGES[1:]:
            if done[s]:
                continue
            self._run_stage(s, runners[s])
        from mu.demo.report import output_files

        report = json.loads((self.out / "report.json").read_text())
        return DemoResult(self.out, report, output_files(self.out), ran, time.perf_counter() - t_start)

    def _run_stage(self, stage: str, fn: Callable[[], dict[str, Any]]) -> None:
        directory = self.out / stage if stage in MODELS + ("evaluate", "bench") else None
        resumed = self.manifest.begin(stage, self.hashes[stage], directory)
        self.plan.start(stage)
        if resumed:
            self.plan.note(f"  {stage}: resuming an interrupted run with the same settings")
        load0, cpu0, t0 = _load(), time.process_time(), time.perf_counter()
        try:
            summary = fn()
        except BaseException:
            self.manifest.add_seconds(stage, time.perf_counter() - t0)
            raise
        seconds = time.perf_counter() - t0
        summary = dict(summary or {})
        summary["timing"] = {"wall_s": seconds, "cpu_s": time.process_time() - cpu0, "load_start": load0,
                             "load_end": _load(), "threads": self.torch.get_num_threads()}
        self.manifest.finish(stage, seconds, summary)
        self.plan.finish(stage, seconds)

    def _outputs_exist(self, stage: str) -> bool:
        if stage == "data":
            return (self.tokenizer_dir / "tokenizer.json").is_file() and (
                self.cfg.train_data is not None or (self.data_dir / "test.jsonl").is_file())
        if stage in MODELS:
            return (self.out / stage / "final" / "config.json").is_file()
        if stage == "evaluate":
            return (self.out / "evaluate" / "metrics.json").is_file()
        if stage == "bench":
            return (self.out / "bench" / "bench.json").is_file()
        if stage == "report":
            from mu.demo.report import output_files

            return all(p.is_file() for p in output_files(self.out).values())
        return True

    def describe(self) -> dict[str, str]:
        c = self.cfg
        data = ("synthetic reading comprehension" if c.train_data is None else f"squad_v2 {Path(c.train_data).name}")
        return {
            "data": f"{data}: {c.n_train}/{c.n_val}/{c.n_test} train/val/test, BPE {c.vocab_size}",
            "teacher": f"decoder-only teacher, {_shape(c.teacher, 'deconly')}, {c.teacher_examples} examples",
            "encdec": f"encoder-decoder student, {_shape(c.student, 'encdec')}, CE",
            "deconly": "decoder-only student, same widths and parameters, same FLOPs, CE",
            "encdec_kd": f"encoder-decoder student, KD from the teacher (alpha {c.kd_alpha}), same FLOPs",
            "evaluate": f"exact/F1 of the 4 models on test ({c.n_test}) and val ({c.n_val})",
            "bench": f"inference at preset {c.bench_preset}: lengths {','.join(map(str, c.bench_input_lengths))}",
            "report": "report.md, report.json, PNG plots",
        }


# ---------------------------------------------------------------------------------------------
# Helpers


def copy_friendly_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (mu.tokenizer.train_tokenizer) that puts a space before every text it encodes.

    Answers are stored without a leading space while the same words follow a space in the context, so a
    plain byte-level BPE gives them different ids ("Greilburg" -> "Gre", but " Greilburg" -> "ĠGre"): the
    model would have to learn to translate every first token instead of copying it. (SentencePiece
    tokenizers such as the paper's add this prefix space themselves.) Decoded text then starts with a
    space, which evaluation strips.
    """
    from tokenizers import pre_tokenizers

    from mu.tokenizer import train_tokenizer

    tok = train_tokenizer([" " + t for t in texts], vocab_size)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    return tok


def _shape(d: dict[str, Any], arch: str) -> str:
    layers = (f"{d.get('n_encoder_layer')}+{d.get('n_decoder_layer')} layers" if arch == "encdec"
              else f"{d.get('n_decoder_layer')} layers")
    return f"width {d.get('n_embd')}, {layers}"


def _param_count(config) -> int:
    from mu.train.flops import flops_params

    return flops_params(config).total


def _train_summary(result) -> dict[str, Any]:
    keep = ("params", "steps", "epochs", "examples", "enc_tokens", "dec_tokens", "loss_tokens", "flops", "train_loss",
            "val_loss", "stop_reason", "elapsed_s", "tokens_per_s", "resumed_from")
    out = {k: getattr(result, k) for k in keep}
    out["val_metrics"] = {k: v for k, v in result.val_metrics.items() if k in ("f1", "exact", "val_loss")}
    return out


def per_example_f1(examples, predictions: dict[str, str]) -> dict[str, float]:
    """{id: F1 in [0, 1]} with the official SQuAD 2.0 definition (for paired comparisons)."""
    from mu.eval.metrics import squad_v2_metrics

    return {e.id: squad_v2_metrics({e.id: predictions[e.id]}, {e.id: e.references})["f1"] / 100.0
            for e in examples}


def _file_key(path: Optional[str]) -> Optional[dict[str, Any]]:
    if path is None:
        return None
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return {"path": str(p.resolve()), "size": st.st_size, "mtime": int(st.st_mtime)}
    return {"path": str(path)}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def run_demo(cfg: DemoConfig) -> DemoResult:
    """Run (or resume) the demo `cfg` describes; see the module docstring and docs/demo.md."""
    import torch

    from mu.utils import seed_everything

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    return Demo(cfg).run()
