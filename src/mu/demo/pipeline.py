"""`run_demo(DemoConfig)`: the paper's two quality claims measured over seeds, plus the efficiency benchmark.

The demo is a list of `Stage` records (name, what it reads, its settings, a run function, what it writes):

    data    word-level synthetic reading comprehension (mu.data.synthetic_words: train / val / test,
            paragraph-disjoint, ~1/3 unanswerable) and its word-level tokenizer; or squad_v2 files + a BPE
    train   for every task family: a decoder-only teacher; the learning-rate grid (encoder-decoder and
            decoder-only students, seed 0, the same rates for both); the other seeds of both students at
            the rate each chose on the validation split; encoder-decoder students distilled from the
            teacher (off-policy and on-policy) with the same seeds. Students share one FLOP budget.
            Every run is evaluated on val and test right after training. Runs go to `workers` processes.
    bench   inference of the two students' architectures at a larger size (mu.bench.run_benchmark)
    report  report.md, report.json, PNG plots (mu.demo.report, mu.demo.plots: plain data in)

Each run writes DIR/<family>/<model>/seed<k>-lr<rate>/run.json with a hash of everything it depends on;
re-running the same command reuses every run (and the benchmark) whose hash is unchanged, so a changed
setting redoes exactly the runs it affects, and an interrupted run resumes from its checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from mu.demo.config import DemoConfig, settings_hash
from mu.demo.report import fmt_time
from mu.demo.runs import execute_run, load_done, split_examples
from mu.errors import MuError
from mu.atomic import atomic_directory, atomic_write_text

MODELS = ("teacher", "encdec", "deconly", "encdec_kd", "encdec_kd_on")  # report order
STUDENTS = MODELS[1:]
LABELS = {"teacher": "teacher (decoder-only)", "encdec": "encoder-decoder student (CE)",
          "deconly": "decoder-only student (CE)", "encdec_kd": "encoder-decoder student (KD, off-policy)",
          "encdec_kd_on": "encoder-decoder student (KD, on-policy)"}


@dataclass
class Stage:
    name: str
    inputs: tuple[str, ...]  # the stages whose outputs it reads
    settings: dict[str, Any]  # what its outputs depend on (hashed)
    run: Callable[[], dict[str, Any]]
    outputs: tuple[str, ...]  # paths (relative to the demo directory) it writes


@dataclass(frozen=True)
class RunSpec:
    family: str
    model: str  # one of MODELS
    seed: int
    lr: float
    grid: bool = False  # one of the learning-rate grid's runs (seed 0)

    @property
    def key(self) -> str:
        return f"{self.family}/{self.model}/seed{self.seed}-lr{self.lr:g}"

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "model": self.model, "seed": self.seed, "lr": self.lr, "grid": self.grid}


@dataclass
class DemoResult:
    out: Path
    report: dict[str, Any]
    files: dict[str, Path]  # report.md, report.json, the PNGs
    stages: dict[str, str] = field(default_factory=dict)  # stage or run key -> "ran" | "reused"
    seconds: float = 0.0


def _log(enabled: bool, text: str) -> None:
    if enabled:
        print(text, file=sys.stderr, flush=True)


class Demo:
    """One demo directory: its settings, data, runs and report."""

    def __init__(self, cfg: DemoConfig):
        import torch

        from mu.utils import pick_device

        self.cfg = cfg
        self.out = Path(cfg.out)
        self.device = pick_device(cfg.device)
        self.torch = torch
        self.status: dict[str, str] = {}
        self.records: dict[str, dict[str, Any]] = {}  # run key -> run.json record
        self._features: dict[str, list[dict]] = {}
        self.data_hash = settings_hash("data", self.data_settings())
        self.teacher_data_hash = (None if cfg.teacher_synthetic is None else
                                  settings_hash("teacher-data", self.data_hash, cfg.teacher_synthetic))
        self.timing: dict[str, float] = {}

    # -- data ---------------------------------------------------------------------------------------

    def data_settings(self) -> dict[str, Any]:
        c = self.cfg
        return dict(train_data=_file_key(c.train_data), val_data=_file_key(c.val_data), test_data=_file_key(c.test_data),
                    n_train=c.n_train, n_val=c.n_val, n_test=c.n_test, synthetic=c.synthetic,
                    vocab_size=c.vocab_size if c.train_data else None, seed=c.seed,
                    tokenizer="byte-bpe+prefix-space" if c.train_data else "word-level")

    @property
    def data_dir(self) -> Path:
        return self.out / "data"

    @property
    def tokenizer_dir(self) -> Path:
        return self.out / "tokenizer"

    def split_paths(self) -> dict[str, str]:
        return {s: str(self.data_dir / f"{s}.jsonl") for s in ("train", "val", "test")}

    def teacher_split_paths(self) -> dict[str, str]:
        """The teacher's data: the students' splits, with its own training split when `teacher_synthetic` is set."""
        paths = self.split_paths()
        if self.teacher_data_hash is not None:
            paths["train"] = str(self.data_dir / "teacher_train.jsonl")
        return paths

    def run_data(self) -> dict[str, Any]:
        """Write data/{train,val,test}.jsonl and tokenizer/ (reused when data/data.json has the same hash)."""
        info = self.data_dir / "data.json"
        if info.is_file() and (self.tokenizer_dir / "tokenizer.json").is_file():
            summary = json.loads(info.read_text())
            if summary.get("hash") == self.data_hash and summary.get("teacher_hash") == self.teacher_data_hash:
                self.status["data"] = "reused"
                return summary
        c = self.cfg
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if c.train_data is None:
            from mu.data.synthetic_words import word_splits, word_tokenizer

            splits = word_splits(c.n_train, c.n_val, c.n_test, seed=c.seed, **c.synthetic)
            if c.teacher_synthetic is not None:
                held_out = {r["context"] for s in ("val", "test") for r in splits[s]}
                teacher = word_splits(c.n_train, c.n_val, c.n_test, seed=c.seed,
                                      **{**c.synthetic, **c.teacher_synthetic})["train"]
                splits["teacher_train"] = [r for r in teacher if r["context"] not in held_out]
            tok = word_tokenizer()
            tokenizer_note = f"word-level, {len(tok)} tokens (one per word of the generator)"
        else:
            splits = self._user_splits()
            tok = copy_friendly_tokenizer([t for r in splits["train"] for t in (r["context"], r["question"])]
                                          + [a for r in splits["train"] for a in r["answers"]], c.vocab_size)
            tokenizer_note = f"byte-level BPE with a prefix space, {len(tok)} tokens"
        for name, records in splits.items():
            atomic_write_text(self.data_dir / f"{name}.jsonl",
                              "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        with atomic_directory(self.tokenizer_dir) as tmp:
            tok.save_pretrained(tmp)
        summary: dict[str, Any] = {"hash": self.data_hash, "teacher_hash": self.teacher_data_hash,
                                   "tokenizer": tokenizer_note,
                                   "source": (self.split_paths() if c.train_data is None else
                                              {"train": c.train_data, "val": c.val_data or "held out from train",
                                               "test": c.test_data or c.val_data or "held out from train"})}
        self._features.clear()
        for family in c.families:
            block = {}
            for split in ("train", "val", "test"):
                exs = self.examples(family, split)
                src = tok([e.source for e in exs], add_special_tokens=False)["input_ids"]
                tgt = tok([e.target for e in exs], add_special_tokens=False)["input_ids"]
                block[split] = {"examples": len(exs), "unanswerable": sum(not e.references for e in exs),
                                "mean_source_tokens": sum(map(len, src)) / len(src),
                                "mean_target_tokens": sum(map(len, tgt)) / len(tgt) + 1}  # + EOS
            if self.teacher_data_hash is not None:
                exs = split_examples({"data": self.teacher_split_paths(), "family": family}, "train")
                block["teacher_train"] = {"examples": len(exs), "unanswerable": sum(not e.references for e in exs),
                                          "knobs": c.teacher_synthetic}
            block["example"] = {"prompt": self.examples(family, "test")[0].source,
                                "answer": self.examples(family, "test")[0].target}
            summary[family] = block
        atomic_write_text(info, json.dumps(summary, indent=1) + "\n")
        self.status["data"] = "ran"
        return summary

    def _user_splits(self) -> dict[str, list[dict]]:
        """squad_v2 files -> SQuAD-schema records for train / val / test (held out from train when not given)."""
        from mu.data.tasks import iter_jsonl

        c = self.cfg

        def records(path: str, limit: Optional[int] = None) -> list[dict]:
            from mu.data.tasks import load_examples

            exs = load_examples("squad_v2", path, limit=limit)  # validates the file
            rows = []
            for (_, r), e in zip(iter_jsonl(path), exs):
                rows.append({"id": e.id, "context": r["context"], "question": r["question"],
                             "answers": list(e.references)})
            return rows

        train = records(c.train_data)
        carved: dict[str, list[dict]] = {}
        if c.val_data is None:
            carved["val"], train = train[len(train) - c.n_val:], train[:len(train) - c.n_val]
        if c.test_data is None and c.val_data is None:
            carved["test"], train = train[len(train) - c.n_test:], train[:len(train) - c.n_test]
        if len(train) < c.batch_size:
            raise MuError(f"--train-data {c.train_data}: {len(train)} examples left for training after holding "
                          f"out validation/test examples; need at least --batch-size={c.batch_size}")
        val = carved.get("val") or records(c.val_data, c.n_val)
        test = carved.get("test") or records(c.test_data or c.val_data, c.n_test)
        return {"train": train[:c.n_train], "val": val, "test": test}

    def examples(self, family: str, split: str) -> list:
        return split_examples({"data": self.split_paths(), "family": family}, split)

    def features(self, family: str) -> list[dict]:
        if family not in self._features:
            import warnings

            from mu.data.batching import TruncationWarning, encode_examples
            from mu.demo.runs import cached_tokenizer

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", TruncationWarning)
                self._features[family] = encode_examples(self.examples(family, "train"),
                                                         cached_tokenizer(str(self.tokenizer_dir)), self.cfg.max_source_len,
                                                         self.cfg.max_target_len, task="squad_v2")
        return self._features[family]

    def question_kinds(self) -> dict[str, str]:
        """{test question id: its kind} (mu.data.synthetic_words.question_kind) for the built-in data, else {}."""
        if self.cfg.train_data is not None:
            return {}
        from mu.data.synthetic_words import question_kind
        from mu.data.tasks import iter_jsonl

        return {str(r["id"]): question_kind(r) for _, r in iter_jsonl(self.split_paths()["test"])}

    def vocab_size(self) -> int:
        from mu.demo.runs import cached_tokenizer
        from mu.train.trainer import model_vocab_size

        return model_vocab_size(cached_tokenizer(str(self.tokenizer_dir)))

    # -- budgets ------------------------------------------------------------------------------------

    def role(self, model: str) -> str:
        return {"teacher": "teacher", "deconly": "deconly"}.get(model, "encdec")

    def flops_per_example(self, family: str, role: str) -> float:
        from mu.train.flops import training_flops

        f = self.features(family)
        enc = sum(len(x["source_ids"]) for x in f) / len(f)
        dec = sum(len(x["target_ids"]) for x in f) / len(f)
        config = self.cfg.model_config(role, self.vocab_size())
        if config.arch == "deconly":
            return training_flops(config, 0, enc + dec - 1)
        return training_flops(config, enc, dec)

    def student_budget(self, family: str) -> float:
        """The students' FLOP budget: explicit, or what the encoder-decoder spends on the family's
        `student_examples` (`DemoConfig.student_examples_for`)."""
        if self.cfg.student_flops:
            return float(self.cfg.student_flops)
        return self.flops_per_example(family, "encdec") * self.cfg.student_examples_for(family)

    def est_steps(self, spec: RunSpec) -> int:
        c = self.cfg
        if spec.model == "teacher":
            return max(1, math.ceil(c.teacher_examples / c.teacher_batch_size))
        per_step = self.flops_per_example(spec.family, self.role(spec.model)) * c.batch_size
        return max(1, math.ceil(self.student_budget(spec.family) / per_step))

    def est_cost(self, spec: RunSpec) -> float:
        """Relative cost of a run (FLOPs; a KD run adds the teacher's forward passes, an on-policy one its sampled
        rows) for ordering and the ETA."""
        c = self.cfg
        per_ex = self.flops_per_example(spec.family, self.role(spec.model))
        rows = self.est_steps(spec) * self.batch_size(spec)
        cost = rows * per_ex
        if spec.model.startswith("encdec_kd"):
            cost += rows * self.flops_per_example(spec.family, "teacher") / 3
        if spec.model == "encdec_kd_on":  # the sampled rows: a second forward and backward beside the gold ones
            cost += rows * per_ex
        return cost + (c.evals_per_run + 2) * (c.n_val + c.n_test) * per_ex / 3

    # -- runs ---------------------------------------------------------------------------------------

    def run_dir(self, spec: RunSpec) -> Path:
        return self.out / spec.key

    def batch_size(self, spec: RunSpec) -> int:
        return self.cfg.teacher_batch_size if spec.model == "teacher" else self.cfg.batch_size

    def payload(self, spec: RunSpec) -> dict[str, Any]:
        """Everything a worker needs for `spec` (plain data), with the hash of everything the run depends on."""
        c = self.cfg
        config = c.model_config(self.role(spec.model), self.vocab_size())
        steps = self.est_steps(spec)
        every = max(1, steps // c.evals_per_run)
        train = dict(out=str(self.run_dir(spec)), arch=config.arch, preset="tiny",
                     model_overrides={k: v for k, v in config.to_dict().items() if k != "arch"},
                     weight_init=c.weight_init, tokenizer=str(self.tokenizer_dir), task="squad_v2",
                     max_source_len=c.max_source_len, max_target_len=c.max_target_len, batch_size=self.batch_size(spec),
                     lr=spec.lr, warmup=c.warmup, schedule="cosine", weight_decay=c.weight_decay, seed=spec.seed,
                     device=str(self.device), precision=c.precision, val_limit=c.n_val, eval_every=every,
                     save_every=every, keep_checkpoints=1, num_samples=0, best_metric="f1",
                     eval_batch_size=c.eval_batch_size, max_new_tokens=c.max_new_tokens, log_every=max(1, steps // 50),
                     progress=False, resume=True)
        if spec.model == "teacher":
            train["max_steps"] = steps
        else:
            train["max_flops"] = self.student_budget(spec.family)
        payload: dict[str, Any] = {
            "spec": spec.to_dict(), "family": spec.family, "train": train,
            "data": self.teacher_split_paths() if spec.model == "teacher" else self.split_paths(),
            "kind": "kd" if spec.model.startswith("encdec_kd") else "ce", "threads": self.threads_per_worker(),
            "eval": {"batch_size": c.eval_batch_size, "max_new_tokens": c.max_new_tokens,
                     "max_source_len": c.max_source_len}}
        if spec.model == "teacher":
            payload["documents"] = c.teacher_documents and c.train_data is None
            if payload["documents"]:  # batches of like-length documents hold like questions: shuffle plainly
                train["group_by_length"] = False
        depends = [self.data_hash] + ([self.teacher_data_hash] if spec.model == "teacher" and self.teacher_data_hash
                                      else [])
        if payload["kind"] == "kd":
            teacher = self.teacher_spec(spec.family)
            payload["kd"] = dict(teacher=str(self.run_dir(teacher) / "final"), alpha=c.kd_alpha,
                                 temperature=c.kd_temperature, divergence=c.kd_divergence,
                                 on_policy=c.kd_on_policy if spec.model == "encdec_kd_on" else 0.0,
                                 max_sample_tokens=c.max_target_len + 1)
            payload["teacher_params"] = _param_count(c.model_config("teacher", self.vocab_size()))
            depends.append(self.payload(teacher)["hash"])
        hashed = {k: v for k, v in payload.items() if k not in ("threads",)}
        hashed["train"] = {k: v for k, v in train.items() if k not in ("progress", "device", "resume")}
        payload["hash"] = settings_hash("run", hashed, depends)
        return payload

    def threads_per_worker(self) -> int:
        if self.cfg.threads:
            return self.cfg.threads
        return max(1, (os.cpu_count() or 1) // max(1, self.cfg.workers))

    def teacher_specs(self, family: str) -> list[RunSpec]:
        c = self.cfg
        return [RunSpec(family, "teacher", s, c.teacher_lr) for s in range(c.seed, c.seed + c.teacher_seeds)]

    def teacher_spec(self, family: str) -> Optional[RunSpec]:
        """The teacher run with the best validation F1 (ties: lower validation loss, then the lower seed);
        None until every teacher run of the family is done."""
        results = []
        for spec in self.teacher_specs(family):
            rec = self.records.get(spec.key)
            if rec is None:
                return None
            results.append((-rec["val"]["f1"], rec["train"].get("val_loss") or 0.0, spec.seed, spec))
        return min(results, key=lambda r: r[:3])[3]

    def grid_specs(self, family: str) -> list[RunSpec]:
        return [RunSpec(family, m, self.cfg.seed, lr, grid=True) for lr in self.cfg.lr_grid
                for m in ("encdec", "deconly")]

    def chosen_lr(self, family: str, model: str) -> Optional[float]:
        """The grid's rate for `model` ("encdec" or "deconly") with the best validation F1 (ties: lower
        validation loss, then the smaller rate); None until all its grid runs are done."""
        results = []
        for lr in self.cfg.lr_grid:
            rec = self.records.get(RunSpec(family, model, self.cfg.seed, lr, grid=True).key)
            if rec is None:
                return None
            results.append((-rec["val"]["f1"], rec["train"].get("val_loss") or 0.0, lr))
        return min(results)[2]

    def seed_specs(self, family: str) -> list[RunSpec]:
        """The runs that become ready once the grid (and, for KD, the teacher) are done."""
        c = self.cfg
        seeds = range(c.seed, c.seed + c.seeds)
        specs = []
        for model in ("encdec", "deconly"):
            lr = self.chosen_lr(family, model)
            if lr is not None:
                specs += [RunSpec(family, model, s, lr, grid=(s == c.seed)) for s in seeds]
        lr = self.chosen_lr(family, "encdec")
        if lr is not None and self.teacher_spec(family) is not None:
            specs += [RunSpec(family, m, s, lr) for m in ("encdec_kd", "encdec_kd_on") for s in seeds]
        return specs

    def run_all(self) -> None:
        """Every run of every family, on `workers` processes, each started as soon as what it needs is done."""
        c = self.cfg
        pending: dict[str, RunSpec] = {}
        for family in c.families:
            for spec in self.teacher_specs(family) + self.grid_specs(family):
                pending[spec.key] = spec
        submitted: dict[str, Any] = {}
        total_cost = sum(self.est_cost(s) for s in pending.values())
        total_cost += sum(self.est_cost(RunSpec(f, m, c.seed, c.lr_grid[0])) for f in c.families
                          for m in ("encdec", "deconly", "encdec_kd", "encdec_kd_on")) * (c.seeds - 1) + sum(
            self.est_cost(RunSpec(f, m, c.seed, c.lr_grid[0])) for f in c.families for m in ("encdec_kd", "encdec_kd_on"))
        done_cost, busy, t0 = 0.0, 0.0, time.perf_counter()
        pool = None
        try:
            while True:
                for family in c.families:
                    for spec in self.seed_specs(family):
                        if spec.key not in self.records and spec.key not in submitted:
                            pending.setdefault(spec.key, spec)
                # reuse what is finished with the same hash, submit the rest (most expensive first)
                reused = False
                for key in sorted(pending, key=lambda k: -self.est_cost(pending[k]) * (10 if "teacher" in k else 1)):
                    spec = pending.pop(key)
                    payload = self.payload(spec)
                    rec = load_done(self.run_dir(spec), payload["hash"])
                    if rec is not None:
                        self.records[key], self.status[key] = rec, "reused"
                        total_cost -= self.est_cost(spec)  # nothing left to do for it (the ETA)
                        reused = True
                        continue
                    if self.run_dir(spec).exists() and not _same_run(self.run_dir(spec), payload):
                        import shutil

                        shutil.rmtree(self.run_dir(spec))  # settings changed: start that run afresh
                    if c.workers <= 1:
                        submitted[key] = (spec, payload, None)
                    else:
                        if pool is None:
                            pool = _pool(c.workers)
                        atomic_write_text(self.run_dir(spec) / "payload.json", json.dumps(payload) + "\n")
                        submitted[key] = (spec, payload, pool.submit(execute_run, payload))
                if reused:
                    continue  # a reused run may make others ready
                if not submitted:
                    break
                key, rec = self._next_done(submitted)
                spec = submitted.pop(key)[0]
                self.records[key], self.status[key] = rec, "ran"
                done_cost += self.est_cost(spec)
                busy += rec["seconds"]
                elapsed = time.perf_counter() - t0
                # remaining cost at the finished runs' rate, shared by the workers (a rough guide)
                eta = busy / done_cost * max(0.0, total_cost - done_cost) / max(1, c.workers)
                _log(c.progress, f"  [{fmt_time(elapsed)}] {key}: {rec['train']['steps']} steps, val F1 "
                                 f"{rec['val']['f1']:.1f}, test F1 {rec['test']['f1']:.1f} (HasAns "
                                 f"{rec['test'].get('HasAns_f1', float('nan')):.1f}) in {fmt_time(rec['seconds'])}; "
                                 f"~{fmt_time(eta)} of training left")
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def _next_done(self, submitted: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        for key, (spec, payload, future) in submitted.items():
            if future is None:  # in-process (workers=1)
                return key, execute_run(payload)
        from concurrent.futures import FIRST_COMPLETED, wait

        futures = {future: key for key, (_, _, future) in submitted.items()}
        done, _ = wait(list(futures), return_when=FIRST_COMPLETED)
        future = next(iter(done))
        return futures[future], future.result()

    # -- bench ----------------------------------------------------------------------------------------

    def bench_settings(self) -> dict[str, Any]:
        c = self.cfg
        return dict(preset=c.bench_preset, lengths=list(c.bench_input_lengths), new_tokens=c.bench_new_tokens,
                    repeats=c.bench_repeats, memory=c.bench_memory, seed=c.seed, device=str(self.device.type))

    def run_bench(self) -> dict[str, Any]:
        from mu.bench import BenchConfig, run_benchmark

        c = self.cfg
        path = self.out / "bench" / "bench.json"
        h = settings_hash("bench", self.bench_settings())
        if path.is_file():
            old = json.loads(path.read_text())
            if old.get("hash") == h:
                self.status["bench"] = "reused"
                return old
        lengths = tuple(sorted(c.bench_input_lengths))
        common = dict(preset=c.bench_preset, archs=("encdec", "deconly"), new_tokens=c.bench_new_tokens,
                      batch_sizes=(1,), dtypes=("fp32",), device=str(self.device), flop_check=False,
                      threads=None, seed=c.seed, out=None, plots=False, progress=False)
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
        result["hash"] = h
        atomic_write_text(path, json.dumps(result, indent=1, default=str) + "\n")
        self.status["bench"] = "ran"
        return result

    # -- the run ----------------------------------------------------------------------------------------

    def stages(self) -> list[Stage]:
        c = self.cfg
        return [
            Stage("data", (), self.data_settings(), self.run_data, ("data/", "tokenizer/")),
            Stage("train", ("data",), dict(families=list(c.families), seeds=c.seeds, lr_grid=list(c.lr_grid)),
                  self.run_all, tuple(f"{f}/" for f in c.families)),
            Stage("bench", (), self.bench_settings(), self.run_bench, ("bench/bench.json",)),
            Stage("report", ("data", "train", "bench"), {}, self.run_report, ("report.md", "report.json", "*.png")),
        ]

    def run(self) -> DemoResult:
        from mu.utils import cpu_isa

        c = self.cfg
        t_start = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "demo_config.json", json.dumps(c.to_dict(), indent=1) + "\n")
        _log(c.progress, f"mu demo ({c.preset}) -> {self.out}: families {', '.join(c.families)}, {c.seeds} seeds, "
                         f"learning rates {', '.join(f'{x:g}' for x in c.lr_grid)}; {c.workers} worker(s) x "
                         f"{self.threads_per_worker()} thread(s) on {self.device} ({cpu_isa()}, {os.cpu_count()} "
                         f"cores, load average {_load():.1f})")
        self.outputs: dict[str, Any] = {}
        for stage in self.stages():
            t0 = time.perf_counter()
            _log(c.progress, f"[{fmt_time(t0 - t_start)}] {stage.name}")
            self.outputs[stage.name] = stage.run()
            self.timing[stage.name] = time.perf_counter() - t0
        from mu.demo.report import output_files

        report = json.loads((self.out / "report.json").read_text())
        return DemoResult(self.out, report, output_files(self.out), dict(self.status), time.perf_counter() - t_start)

    def run_report(self) -> dict[str, Any]:
        from mu.demo import report
        from mu.utils import cpu_isa

        c = self.cfg
        inputs = {
            "config": c.to_dict(), "device": str(self.device), "data": self.outputs["data"],
            "runs": list(self.records.values()), "bench": self.outputs["bench"],
            "chosen_lr": {f: {m: self.chosen_lr(f, m) for m in ("encdec", "deconly")} for f in c.families},
            "teacher_seed": {f: self.teacher_spec(f).seed for f in c.families},
            "budgets": {f: self.student_budget(f) for f in c.families},
            "question_kinds": self.question_kinds(),
            "labels": LABELS, "models": list(MODELS),
            "timing": {**self.timing, "status": dict(self.status)},
            "machine": {"cpu_count": os.cpu_count(), "isa": cpu_isa(), "workers": c.workers,
                        "threads_per_worker": self.threads_per_worker(), "load_average": _loadavg()},
        }
        rep = report.build_report(inputs)
        files = report.write_report(rep, self.out)
        self.status["report"] = "ran"
        return {"files": {k: str(v) for k, v in files.items()}}


# ---------------------------------------------------------------------------------------------
# Helpers


def _pool(workers: int):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def _same_run(run_dir: Path, payload: dict[str, Any]) -> bool:
    """True when `run_dir` holds an interrupted run of the same payload (so the trainer may resume it)."""
    path = run_dir / "payload.json"
    try:
        return json.loads(path.read_text()).get("hash") == payload["hash"]
    except (OSError, ValueError):
        return False


def copy_friendly_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (mu.tokenizer.train_tokenizer) that puts a space before every text it encodes, so an
    answer's tokens equal its tokens inside the context (for --train-data; the built-in data is word-level)."""
    from tokenizers import pre_tokenizers

    from mu.tokenizer import train_tokenizer

    tok = train_tokenizer([" " + t for t in texts], vocab_size)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    return tok


def _param_count(config) -> int:
    from mu.train.flops import flops_params

    return flops_params(config).total


def _file_key(path: Optional[str]) -> Optional[dict[str, Any]]:
    if path is None:
        return None
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return {"path": str(p.resolve()), "size": st.st_size, "mtime": int(st.st_mtime)}
    return {"path": str(path)}


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def _loadavg() -> Optional[list[float]]:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def run_demo(cfg: DemoConfig) -> DemoResult:
    """Run (or resume) the demo `cfg` describes; see the module docstring and docs/demo.md."""
    import torch

    from mu.utils import seed_everything

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    return Demo(cfg).run()
