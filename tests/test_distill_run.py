"""Distillation end to end on the trainer: a tiny Phi-3 teacher (the paper's 32064-logit vocabulary) with a LoRA
adapter -> a tiny Mu student (32128 logits); `mu distill`, the seed-compatible torchrun entry point (1 and 2
processes, gloo), `mu finetune-teacher`, and the clear errors."""

import json
import os
import subprocess
import sys

import pytest
import torch

import mu
from mu.cli import main as cli_main
from mu.distill import DistillConfig, distill, load_teacher
from mu.train import TrainConfig

from tests.conftest import REPO, SHARED_DATA
from tests.test_distill import phi3_teacher_dirs, phi3_tokenizer  # noqa: F401  (fixtures)

PROMPT = "Answer the question.\n###Question\n{}\n###Context\n{}\n###Answer\n"
QA = [(PROMPT.format("Where does Ana live?", "Ana lives in Porto."), "Porto"),
      (PROMPT.format("Who plays the harp?", "Bo plays the harp."), "Bo"),
      (PROMPT.format("What is Cy's pet?", "Cy has a cat."), "a cat"),
      (PROMPT.format("When was Di born?", "Di was born in 1990."), "1990")]


@pytest.fixture(autouse=True)
def one_thread():
    """These tiny models gain nothing from a second thread; on a shared CPU it only adds contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _write_jsonl(path, pairs, repeat=1):
    path.write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in pairs * repeat))
    return path


@pytest.fixture
def student_dir(tmp_path, phi3_tokenizer):  # noqa: F811
    torch.manual_seed(0)
    model = mu.build_model("tiny", arch="encdec", vocab_size=32128, dropout=0.0)
    model.tokenizer = phi3_tokenizer
    return model.save_pretrained(tmp_path / "student")


def _train_config(out, data, **kw):
    base = dict(out=str(out), task="seq2seq", train_data=str(data), val_data=str(data), max_source_len=64,
                max_target_len=8, batch_size=4, lr=5e-3, warmup=0, schedule="constant", device="cpu",
                eval_every=0, save_every=0, log_every=1, num_samples=0, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _train_records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["event"] == "train"]


def test_kd_loss_falls_and_student_checkpoint_loads(tmp_path, phi3_teacher_dirs, student_dir):  # noqa: F811
    data = _write_jsonl(tmp_path / "train.jsonl", QA)
    cfg = DistillConfig(train=_train_config(tmp_path / "run", data, max_steps=8),
                        teacher=str(phi3_teacher_dirs["base"]), teacher_adapter=str(phi3_teacher_dirs["adapter"]),
                        student=str(student_dir), alpha=1.0, temperature=2.0)
    result = distill(cfg)
    records = _train_records(tmp_path / "run")
    first, last = records[0]["kd_loss"], records[-1]["kd_loss"]
    assert last < 0.5 * first, (first, last)  # the student moves to the teacher's distributions
    student = mu.load_model(result.final_dir)
    assert student.config.arch == "encdec" and student.config.vocab_size == 32128
    assert student.tokenizer is not None and len(student.tokenizer) == 32011
    saved = json.loads((tmp_path / "run" / "distill_config.json").read_text())
    assert saved["common_vocab"] == 32064 and saved["teacher_vocab"] == 32064 and saved["teacher_kind"] == "hf"
    # the same run resumes from its checkpoint
    more = DistillConfig(**{**cfg.__dict__, "train": cfg.train.replace(max_steps=9)})
    assert distill(more).resumed_from == 8


def test_on_policy_and_topk_cache_runs_on_the_trainer(tmp_path, phi3_teacher_dirs, phi3_tokenizer):  # noqa: F811
    data = _write_jsonl(tmp_path / "train.jsonl", QA)
    cfg = DistillConfig(train=_train_config(tmp_path / "run", data, max_steps=4, model_overrides={"dropout": 0.0}),
                        teacher=str(phi3_teacher_dirs["adapter"]), student_preset="tiny", on_policy=0.5, topk=16)
    result = distill(cfg)
    records = _train_records(tmp_path / "run")
    assert {r["on_policy"] for r in records} == {0.0, 1.0}  # both kinds of batches happened (seeded)
    assert (tmp_path / "run" / "teacher_topk.safetensors").is_file()
    assert mu.load_model(result.final_dir).config.vocab_size == 32128  # a fresh student sized for the tokenizer


def _torchrun(nproc, args, cwd, module="mu.train_text2text_by_kd"):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", module, *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("nproc", [1, 2])
def test_seed_compatible_command_runs_under_torchrun(tmp_path, phi3_teacher_dirs, student_dir, nproc):  # noqa: F811
    examples = SHARED_DATA / "examples"
    if not examples.is_dir():
        pytest.skip(f"shared data folder {examples} is absent")
    out = tmp_path / "outputs"
    args = ["--student_path", str(student_dir), "--teacher_path", str(phi3_teacher_dirs["adapter"]),
            "--train_data_path", str(examples / "train.jsonl"), "--val_data_path", str(examples / "val.jsonl"),
            "--encoder_seq_len", "64", "--decoder_seq_len", "12", "--batch_size", "2", "--global_batch_size", "4",
            "--max_steps", "2", "--val_loss_frequency", "2", "--output_path", str(out), "--device", "cpu",
            "--no_progress"]
    proc = _torchrun(nproc, args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    start = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert start["world_size"] == nproc and start["global_batch_size"] == 4
    records = _train_records(out)
    assert [r["step"] for r in records] == [1, 2] and all(r["on_policy"] == 1.0 for r in records)  # the paper's KD
    assert mu.load_model(out / "final").config.arch == "encdec"
    assert (out / "best" / "config.json").is_file()


def test_mu_distill_with_topk_cache_under_torchrun_2_processes(tmp_path, phi3_teacher_dirs):  # noqa: F811
    """`torchrun -m mu distill`: each rank builds its shard of the top-k cache, rank 0 merges them."""
    data = _write_jsonl(tmp_path / "train.jsonl", QA, repeat=2)
    out = tmp_path / "run"
    args = ["distill", "--teacher", str(phi3_teacher_dirs["adapter"]), "--student-preset", "tiny", "--train-data",
            str(data), "--topk", "8", "--max-steps", "2", "--batch-size", "2", "--max-source-len", "64",
            "--max-target-len", "8", "--out", str(out), "--device", "cpu", "--no-progress", "--log-every", "1"]
    proc = _torchrun(2, args, tmp_path, module="mu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    from mu.distill.topk import TopKCache

    cache = TopKCache.load(out / "teacher_topk.safetensors")
    assert cache.n_examples == 8 and bool((cache.lengths > 0).all()) and cache.k == 8
    assert not list(out.glob(".teacher_topk*"))  # shards cleaned up
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["world_size"] == 2


def test_clear_errors_for_other_tokenizers_and_vocab_mismatch(tmp_path, phi3_tokenizer, capsys):  # noqa: F811
    from mu.tokenizer import byte_tokenizer

    data = _write_jsonl(tmp_path / "train.jsonl", QA)
    byte_teacher = mu.build_model("tiny", arch="deconly")
    byte_teacher.tokenizer = byte_tokenizer()
    byte_teacher.save_pretrained(tmp_path / "byte_teacher")
    small_vocab = mu.build_model("tiny", arch="deconly")  # 512 logits, but the Phi-3 tokenizer has 32011 tokens
    small_vocab.tokenizer = phi3_tokenizer
    small_vocab.save_pretrained(tmp_path / "small_vocab_teacher")
    common = ["distill", "--student-preset", "tiny", "--tokenizer", str(SHARED_DATA / "phi3_tokenizer"),
              "--train-data", str(data), "--max-steps", "1", "--no-progress", "--device", "cpu"]
    assert cli_main([*common, "--teacher", str(tmp_path / "byte_teacher"), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "same tokenizer" in err and "Traceback" not in err
    assert cli_main([*common, "--teacher", str(tmp_path / "small_vocab_teacher"), "--out", str(tmp_path / "b")]) == 2
    assert "vocabulary mismatch" in capsys.readouterr().err
    assert cli_main([*common, "--teacher", str(tmp_path / "nowhere"), "--out", str(tmp_path / "c")]) == 2
    assert "no teacher" in capsys.readouterr().err


def test_finetune_teacher_lora_phi3_and_mu(tmp_path, phi3_teacher_dirs):  # noqa: F811
    data = _write_jsonl(tmp_path / "train.jsonl", QA, repeat=2)
    out = tmp_path / "lora"
    rc = cli_main(["finetune-teacher", "--model", str(phi3_teacher_dirs["base"]), "--train-data", str(data),
                   "--out", str(out), "--max-steps", "12", "--batch-size", "4", "--lr", "3e-2", "--merge",
                   "--no-progress", "--device", "cpu", "--max-source-len", "64", "--max-target-len", "8",
                   "--precision", "fp32"])
    assert rc == 0
    result = json.loads((out / "result.json").read_text())
    assert result["target_modules"] == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert result["precision"] == "fp32 (--precision fp32)"
    assert result["config"]["lora_r"] == 16 and result["config"]["lora_alpha"] == 32
    assert result["train_loss"] < result["first_loss"] - 0.1  # the adapter learns
    via_adapter, merged = load_teacher(out / "adapter", dtype="fp32"), load_teacher(out / "merged", dtype="fp32")
    ids = torch.randint(3, 30000, (1, 6))
    mask, pos = torch.ones_like(ids, dtype=torch.bool), torch.arange(6)[None]
    assert torch.allclose(via_adapter.target_logits(ids, mask, pos), merged.target_logits(ids, mask, pos), atol=1e-4)
    # mu's own decoder-only model as the base
    from mu.distill.lora import FinetuneTeacherConfig, finetune_teacher
    from mu.tokenizer import byte_tokenizer

    base = mu.build_model("tiny", arch="deconly")
    base.tokenizer = byte_tokenizer()
    base.save_pretrained(tmp_path / "mu_base")
    res = finetune_teacher(FinetuneTeacherConfig(model=str(tmp_path / "mu_base"), out=str(tmp_path / "mu_lora"),
                                                 train_data=str(data), max_steps=3, progress=False, device="cpu",
                                                 merge=True, max_source_len=64, max_target_len=8))
    assert res["target_modules"] == ["q_linear", "k_linear", "v_linear", "out_linear", "fc1", "fc2"]
    t = load_teacher(tmp_path / "mu_lora" / "adapter")
    assert t.kind == "mu" and mu.load_model(tmp_path / "mu_lora" / "merged").config.arch == "deconly"


def test_seed_entry_point_help_lists_the_papers_arguments():
    proc = subprocess.run([sys.executable, "-m", "mu.train_text2text_by_kd", "--help"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0
    for name in ("--student_path", "--teacher_path", "--train_data_path", "--val_data_path", "--encoder_seq_len",
                 "--decoder_seq_len", "--batch_size", "--global_batch_size", "--num_epochs", "--learning_rate",
                 "--weight_decay", "--warmup_steps", "--max_grad_norm", "--generate_temperature", "--generate_top_k",
                 "--generate_frequency", "--val_loss_frequency", "--kd_alpha", "--output_path"):
        assert name in proc.stdout
    from mu.train_text2text_by_kd import global_batch, parse_args

    a = parse_args([])
    assert (a.encoder_seq_len, a.decoder_seq_len, a.batch_size, a.global_batch_size) == (1024, 256, 6, 128)
    assert (a.num_epochs, a.learning_rate, a.weight_decay, a.warmup_steps) == (128, 1e-4, 0.01, 4)
    assert (a.max_grad_norm, a.generate_temperature, a.generate_top_k, a.kd_alpha) == (1.0, 0.9, 128, 0.9)
    assert (a.generate_frequency, a.val_loss_frequency, a.output_path) == (32, 32, "outputs")
    assert global_batch(6, 128, 1) == 126  # rounded as the paper's code did
