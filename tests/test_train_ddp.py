"""2-process training on CPU (torchrun, gloo) matches 1 process with doubled gradient accumulation."""

import json
import os
import subprocess
import sys

import pytest
import torch

import mu
from mu.train import TrainConfig, train

ARGS = ["--arch", "encdec", "--preset", "tiny", "--dropout", "0", "--tokenizer", "byte", "--max-steps", "4",
        "--batch-size", "4", "--global-batch-size", "16", "--lr", "3e-3", "--log-every", "1", "--no-progress",
        "--save-every", "0", "--val-limit", "8", "--num-samples", "0"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddp") / "train.jsonl"
    lines = [json.dumps({"source": f"question {i}: what is {i} times {i % 7}?", "target": str(i * (i % 7))})
             for i in range(40)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def single(data_file, tmp_path_factory):
    """1 process, 4 accumulated micro-batches of 4 (in-process)."""
    out = tmp_path_factory.mktemp("single") / "run"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(TrainConfig(out=str(out), arch="encdec", preset="tiny", model_overrides={"dropout": 0.0},
                          tokenizer="byte", train_data=str(data_file), val_data=str(data_file), max_steps=4,
                          batch_size=4, global_batch_size=16, lr=3e-3, log_every=1, progress=False, save_every=0,
                          val_limit=8, num_samples=0))
    finally:
        torch.set_num_threads(n)
    return out


def _torchrun(data_file, out, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mu", "train",
           *ARGS, "--train-data", str(data_file), "--val-data", str(data_file), "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _losses(run):
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r.get("event") == "train"]


def _assert_same_run(a, b):
    assert _losses(b) == pytest.approx(_losses(a), abs=1e-5)
    ra, rb = (json.loads((r / "result.json").read_text()) for r in (a, b))
    assert (ra["enc_tokens"], ra["dec_tokens"], ra["flops"]) == (rb["enc_tokens"], rb["dec_tokens"], rb["flops"])
    assert rb["val_loss"] == pytest.approx(ra["val_loss"], abs=1e-5)
    ma, mb = mu.load_model(a / "final"), mu.load_model(b / "final")
    for (name, p), q in zip(ma.named_parameters(), mb.parameters()):
        torch.testing.assert_close(p, q, atol=2e-5, rtol=1e-4, msg=name)


def test_ddp_two_processes_match_one_process_with_doubled_accumulation(data_file, single, tmp_path):
    proc = _torchrun(data_file, tmp_path / "ddp")
    assert "4 x 2 accumulation x 2 process(es)" in proc.stderr and ", ddp" in proc.stderr
    assert proc.stderr.count("done (max_steps)") == 1  # rank 0 reports alone
    _assert_same_run(single, tmp_path / "ddp")


@pytest.mark.skipif(os.environ.get("MU_TEST_FSDP") != "1",
                    reason="FSDP on CPU takes ~20-40 s more; run with MU_TEST_FSDP=1 (it passes on gloo)")
def test_fsdp_two_processes_match_too(data_file, single, tmp_path):
    proc = _torchrun(data_file, tmp_path / "fsdp", "--distributed", "fsdp")
    assert ", fsdp" in proc.stderr
    _assert_same_run(single, tmp_path / "fsdp")


def test_vqa_two_processes_match_one(tmp_path):
    """`mu train --task vqa` under torchrun (DDP, each process half of every batch) gives the same losses as one
    process (no augmentation, no contrastive stage: its negatives would come from each process's half)."""
    from mu.vision import synthetic_shapes_vqa, write_vqa_jsonl

    data = write_vqa_jsonl(synthetic_shapes_vqa(16, seed=0, image_size=32, max_shapes=1), tmp_path / "vqa.jsonl")
    args = ["train", "--task", "vqa", "--train-data", str(data), "--preset", "tiny", "--tokenizer", "byte",
            "--image-size", "32", "--vit-width", "32", "--vit-depth", "1", "--pool", "4", "--contrastive-steps", "0",
            "--align-steps", "2", "--max-steps", "4", "--batch-size", "8", "--no-augment", "--log-every", "1",
            "--save-every", "3", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    proc = subprocess.run([sys.executable, "-m", "mu", *args, "--out", str(one)], capture_output=True, text=True,
                          env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                           "mu", *args, "--out", str(two)], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(_losses(one)) == 6 and _losses(two) == pytest.approx(_losses(one), abs=1e-4)
    assert [p.name for p in sorted((two / "checkpoints").iterdir())] == ["step_00000003", "step_00000006"]
