"""Automatic precision: the MU_CPU_BF16 switch, and the bf16 paths an AVX-512-BF16 CPU takes by itself.

`MU_CPU_BF16=1` makes the automatic choice pick bf16 on any CPU (torch computes bf16 in software where the CPU
lacks it), so these tests exercise on an AVX2 machine what a bf16-native CPU runs under `--precision auto`.
Numeric comparisons elsewhere in the suite pin fp32.
"""

import json

import pytest
import torch

import mu
from mu.data.tasks import Example
from mu.distill import DistillConfig, distill, load_teacher
from mu.errors import MuError
from mu.tokenizer import byte_tokenizer
from mu.train import TrainConfig, train
from mu.utils import CPU_BF16_ENV, auto_precision, cpu_bf16_native

EXAMPLES = [Example("0", "colour of the sky?", "blue", ["blue"]),
            Example("1", "two plus two?", "four", ["four"]),
            Example("2", "capital of France?", "Paris", ["Paris"]),
            Example("3", "opposite of hot?", "cold", ["cold"])]
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_switch_forces_either_choice_and_refuses_other_values(monkeypatch):
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    assert auto_precision(CPU) == (torch.bfloat16, "MU_CPU_BF16=1")
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    assert auto_precision(CPU) == (None, "MU_CPU_BF16=0")
    monkeypatch.setenv(CPU_BF16_ENV, "yes")
    with pytest.raises(MuError, match="MU_CPU_BF16='yes'"):
        auto_precision(CPU)
    monkeypatch.delenv(CPU_BF16_ENV)
    native, why = cpu_bf16_native()  # detection: whatever this CPU is, the reason says which way it went
    assert auto_precision(CPU) == (torch.bfloat16 if native else None, why)
    assert ("has native" if native else "lacks native") in why


def _train(tmp_path, name, steps, **kw):
    cfg = TrainConfig(out=str(tmp_path / name), arch="encdec", preset="tiny", model_overrides={"dropout": 0.0},
                      tokenizer="byte", batch_size=4, lr=5e-3, warmup=5, max_steps=steps, log_every=1, eval_every=0,
                      save_every=0, num_samples=0, progress=False, **kw)
    result = train(cfg, train_examples=EXAMPLES, val_examples=EXAMPLES)
    start = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])
    return result, start


def test_auto_training_precision_follows_the_cpu_and_is_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    result, start = _train(tmp_path, "fp32", 2)
    assert result.precision == start["precision"] == "fp32 (auto: MU_CPU_BF16=0)"
    assert json.loads((tmp_path / "fp32" / "result.json").read_text())["precision"] == result.precision

    monkeypatch.setenv(CPU_BF16_ENV, "1")
    seen = []
    orig = torch.nn.functional.linear

    def linear(x, w, b=None):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return orig(x, w, b)

    monkeypatch.setattr(torch.nn.functional, "linear", linear)
    result, start = _train(tmp_path, "bf16", 2, precision="auto")
    assert result.precision == start["precision"] == "bf16 (auto: MU_CPU_BF16=1)"
    assert seen and all(seen)  # every linear layer of the training step ran under bf16 autocast
    assert mu.load_model(result.final_dir).dtype == torch.float32  # master weights stay fp32


def test_bf16_autocast_training_overfits(tmp_path, monkeypatch):
    """The bf16 training path learns, with a tolerance that fits bf16: on this tiny overfit fp32 reaches a
    validation loss < 0.1 in 100 steps (test_train.py), bf16 autocast ~0.17 (its gradients carry 8 bits)."""
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    result, _ = _train(tmp_path, "run", 100)
    assert result.precision.startswith("bf16")
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if r.get("event") == "train"]
    assert losses[-1] < 0.1 * losses[0], losses
    assert result.val_loss < 0.35, result.val_loss


def test_teacher_loads_in_bf16_where_automatic_choice_says_so(tmp_path, monkeypatch):
    torch.manual_seed(0)
    mu.build_model("tiny", arch="deconly").save_pretrained(tmp_path / "dec")
    ids = torch.randint(3, 500, (2, 12))
    mask = torch.ones_like(ids, dtype=torch.bool)
    pos = torch.arange(12).expand(2, -1)
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    fp32 = load_teacher(tmp_path / "dec")
    assert fp32.dtype == torch.float32 and fp32.precision == "fp32 (auto: MU_CPU_BF16=0)"
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    bf16 = load_teacher(tmp_path / "dec")
    assert bf16.dtype == torch.bfloat16 and bf16.precision == "bf16 (auto: MU_CPU_BF16=1)"
    assert load_teacher(tmp_path / "dec", dtype="fp32").dtype == torch.float32  # asking always wins
    ref, got = fp32.target_logits(ids, mask, pos), bf16.target_logits(ids, mask, pos)
    assert got.dtype == torch.float32  # target logits are returned in fp32 whatever the teacher's dtype
    scale = ref.abs().max()
    assert (got - ref).abs().max() < 0.05 * scale  # bf16 rounding, not a different function
    assert (got.softmax(-1) - ref.softmax(-1)).abs().sum(-1).max() < 0.1


def test_distillation_records_both_precisions(tmp_path, monkeypatch):
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    torch.manual_seed(0)
    teacher = mu.build_model("tiny", arch="deconly", vocab_size=384)
    teacher.tokenizer = byte_tokenizer()
    teacher.save_pretrained(tmp_path / "teacher")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"source": e.source, "target": e.target}) + "\n" for e in EXAMPLES))
    tc = TrainConfig(out=str(tmp_path / "kd"), task="seq2seq", train_data=str(data),
                     tokenizer=str(tmp_path / "teacher"), max_source_len=32,
                     max_target_len=8, batch_size=4, lr=3e-3, warmup=0, max_steps=2, eval_every=0, save_every=0,
                     log_every=1, num_samples=0, progress=False, device="cpu")
    result = distill(DistillConfig(train=tc, teacher=str(tmp_path / "teacher"), student_preset="tiny", alpha=0.9))
    saved = json.loads((tmp_path / "kd" / "distill_config.json").read_text())
    assert saved["teacher_precision"] == "bf16 (auto: MU_CPU_BF16=1)"
    assert result.precision == "bf16 (auto: MU_CPU_BF16=1)"
