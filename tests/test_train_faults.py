"""Faults during training (issue 15, category 5), for VQA, text and LoRA training alike: real signals to a real
`mu train` child process (SIGTERM, SIGINT, SIGKILL) and a re-run of the same command; a corrupt newest checkpoint;
a full disk while saving (a patched writer raising ENOSPC); a NaN loss. Tiny configs."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mu.errors import MuError
from mu.train import checkpoint as ckpt
from mu.train.rundir import RunDir
from mu.train.step import TrainingDiverged

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vqa_file(tmp_path_factory) -> Path:
    from mu.vision import synthetic_shapes_vqa, write_vqa_jsonl

    path = tmp_path_factory.mktemp("vqa") / "train.jsonl"
    return write_vqa_jsonl(synthetic_shapes_vqa(24, seed=0, image_size=32, max_shapes=1), path)


def _vqa_args(data: Path, out: Path, steps: int = 40) -> list[str]:
    return ["train", "--task", "vqa", "--train-data", str(data), "--out", str(out), "--preset", "tiny",
            "--tokenizer", "byte", "--image-size", "32", "--vit-width", "32", "--vit-depth", "1", "--pool", "4",
            "--contrastive-steps", "3", "--align-steps", "3", "--max-steps", str(steps), "--batch-size", "4",
            "--save-every", "3", "--log-every", "1", "--no-progress"]


def _mu(args: list[str], **kw) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "mu", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _run(args: list[str], timeout: float = 600) -> tuple[int, str, str]:
    p = _mu(args)
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def _signal_after_checkpoint(args: list[str], out: Path, sig: int, min_checkpoints: int = 1,
                             timeout: float = 300) -> tuple[int, str, str]:
    """Start `mu ARGS`, wait until it has written a checkpoint, send `sig`, return (status, stdout, stderr)."""
    p = _mu(args)
    t0 = time.monotonic()
    while len(ckpt.list_checkpoints(out)) < min_checkpoints:
        assert p.poll() is None, f"the run ended before its checkpoint: {p.communicate()[1][-2000:]}"
        assert time.monotonic() - t0 < timeout, "no checkpoint written in time"
        time.sleep(0.05)
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=timeout)
    return p.returncode, stdout, stderr


def _no_traceback(err: str) -> None:
    assert "Traceback" not in err, err[-3000:]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


# -- VQA -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_vqa_signal_writes_a_checkpoint_and_the_rerun_resumes_to_the_same_weights(tmp_path, vqa_file, sig):
    ref = tmp_path / "ref"
    code, out, err = _run(_vqa_args(vqa_file, ref, steps=20))
    assert code == 0, err[-2000:]
    run = tmp_path / "run"
    code, _, err = _signal_after_checkpoint(_vqa_args(vqa_file, run, steps=20), run, sig)
    _no_traceback(err)
    name = signal.Signals(sig).name
    assert code == 128 + sig and f"{name} received: stopped after step" in err, err[-2000:]
    stopped = int(err.split("stopped after step ")[1].split(",")[0])
    assert ckpt.list_checkpoints(run)[-1][0] == stopped  # the checkpoint is of the step it stopped at
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "interrupted" and events[-1]["step"] == stopped
    assert not (run / "final").exists()

    code, out, err = _run(_vqa_args(vqa_file, run, steps=20))
    assert code == 0, err[-2000:]
    assert f"resuming from {run / 'checkpoints' / f'step_{stopped:08d}'} (step {stopped}" in err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["steps"] == 26 and summary["resumed_from"] == stopped
    # the data order, augmentation, optimizer and RNG states came back: the same weights as an uninterrupted run
    a, b = _weights(ref / "final"), _weights(run / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line).get("event") == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 26  # no step logged twice, none missing at the end


def test_vqa_sigkill_then_rerun_resumes_from_the_last_checkpoint(tmp_path, vqa_file):
    run = tmp_path / "run"
    code, _, _ = _signal_after_checkpoint(_vqa_args(vqa_file, run), run, signal.SIGKILL, min_checkpoints=2)
    assert code == -signal.SIGKILL
    last = ckpt.list_checkpoints(run)[-1][0]
    code, out, err = _run(_vqa_args(vqa_file, run))
    assert code == 0, err[-2000:]
    assert f"(step {last}," in err and "resuming from" in err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["steps"] == 46 and summary["resumed_from"] == last
    assert (run / "final" / "model.safetensors").is_file() and (run / "summary.json").is_file()


def test_vqa_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, vqa_file):
    run = tmp_path / "run"
    code, _, err = _run(_vqa_args(vqa_file, run, steps=6))  # 12 steps: checkpoints 9 and 12 kept
    assert code == 0, err[-2000:]
    (_, older), (_, newest) = ckpt.list_checkpoints(run)[-2:]
    weights = newest / ckpt.MODEL_DIR / ckpt.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    code, out, err = _run(_vqa_args(vqa_file, run, steps=6))
    assert code == 0, err[-2000:]
    assert f"checkpoint {newest} is unreadable" in err and f"resuming from {older}" in err
    assert json.loads(out.strip().splitlines()[-1])["resumed_from"] == 9

    for _, path in ckpt.list_checkpoints(run):  # every checkpoint unreadable: stop, naming them
        (path / ckpt.STATE_FILE).write_bytes(b"not a checkpoint")
    code, _, err = _run(_vqa_args(vqa_file, run, steps=6))
    _no_traceback(err)
    assert code == 2 and "no readable checkpoint" in err and ckpt.STATE_FILE in err


def _tiny_vlm():
    from mu.tokenizer import byte_tokenizer
    from mu.vision import VisionTowerConfig, build_vlm

    torch.manual_seed(0)
    return build_vlm("tiny", tower=VisionTowerConfig(image_size=32, patch_size=8, width=32, depth=1, n_head=1),
                     tokenizer=byte_tokenizer(), n_encoder_layer=1, n_decoder_layer=1)


def test_vqa_disk_full_while_saving_names_the_directory_and_keeps_the_previous_checkpoint(tmp_path, vqa_file,
                                                                                          monkeypatch):
    from mu.vision import train_vqa

    run = tmp_path / "run"
    real_save, saves = torch.save, {"n": 0}

    def full_disk(obj, f, *a, **k):  # the third checkpoint (step 6) finds the disk full
        if str(f).endswith(ckpt.STATE_FILE):
            saves["n"] += 1
            if saves["n"] == 3:
                raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(MuError) as e:
        train_vqa(_tiny_vlm(), vqa_file, run, steps=8, save_every=2, batch_size=4, progress=False)
    msg = str(e.value)
    previous = run / ckpt.CHECKPOINTS / "step_00000004"
    assert "no space left" in msg and str(run / ckpt.CHECKPOINTS) in msg and f"{previous} is intact" in msg
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2, 4]  # intact; nothing new that looks like one
    assert not [p for p in (run / ckpt.CHECKPOINTS).iterdir() if p.name.startswith(".tmp")]  # no partial file left
    monkeypatch.setattr(torch, "save", real_save)
    summary = train_vqa(_tiny_vlm(), vqa_file, run, steps=8, save_every=2, batch_size=4, progress=False)
    assert summary["resumed_from"] == 4 and summary["steps"] == 8


def test_vqa_nan_loss_stops_naming_the_step_and_the_last_good_checkpoint(tmp_path, vqa_file, monkeypatch):
    from mu.vision import train_vqa
    from mu.vision.model import MuVLM

    forward, calls = MuVLM.forward, {"n": 0}

    def poisoned(self, *a, **k):
        out = forward(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 5 and out.loss is not None:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MuVLM, "forward", poisoned)
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as e:
        train_vqa(_tiny_vlm(), vqa_file, run, steps=8, save_every=2, batch_size=4, progress=False)
    msg = str(e.value)
    assert "loss is nan at step 5" in msg and str(run / ckpt.CHECKPOINTS / "step_00000004") in msg
    assert ckpt.list_checkpoints(run)[-1][0] == 4 and not (run / "final").exists()

    calls["n"] = -10**9  # poisoned at the first step: no checkpoint, so nothing is left that looks like a run
    monkeypatch.setattr(MuVLM, "forward", lambda self, *a, **k: _nan(forward(self, *a, **k)))
    with pytest.raises(TrainingDiverged, match="at step 1 .*no checkpoint was saved yet"):
        train_vqa(_tiny_vlm(), vqa_file, tmp_path / "r2", steps=8, save_every=2, batch_size=4, progress=False)
    assert not (tmp_path / "r2" / "train_config.json").exists() and not (tmp_path / "r2" / "metrics.jsonl").exists()


def _nan(out):
    out.loss = out.loss * float("nan")
    return out


# -- text (and distillation, which runs on the same trainer) -----------------------------------------


def _text_args(data: Path, out: Path) -> list[str]:
    return ["train", "--arch", "encdec", "--preset", "tiny", "--tokenizer", "byte", "--train-data", str(data),
            "--out", str(out), "--batch-size", "2", "--max-steps", "400", "--save-every", "5", "--eval-every", "0",
            "--num-samples", "0", "--no-progress"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "train.jsonl"
    path.write_text("".join(json.dumps({"source": f"what is {i} plus {i}?", "target": str(2 * i)}) + "\n"
                            for i in range(40)))
    return path


def test_text_sigterm_checkpoints_and_resumes_and_falls_back_past_a_corrupt_checkpoint(tmp_path, text_file):
    run = tmp_path / "run"
    code, _, err = _signal_after_checkpoint(_text_args(text_file, run), run, signal.SIGTERM, min_checkpoints=2)
    _no_traceback(err)
    assert code == 128 + signal.SIGTERM and "SIGTERM received: stopped after step" in err, err[-2000:]
    stopped = int(err.split("stopped after step ")[1].split(",")[0])
    found = ckpt.list_checkpoints(run)
    assert found[-1][0] == stopped
    (found[-1][1] / ckpt.STATE_FILE).write_bytes(b"\x00" * 10)  # the newest corrupt: the previous one is used
    args = _text_args(text_file, run)
    args[args.index("--max-steps") + 1] = str(stopped + 2)
    code, out, err = _run(args)
    assert code == 0, err[-2000:]
    assert f"checkpoint {found[-1][1]} is unreadable" in err and f"resuming from {found[-2][1]}" in err
    assert json.loads(out.strip().splitlines()[-1])["steps"] == stopped + 2


def test_text_config_is_written_only_once_the_data_loads(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"source": "a", "target": "b"}\n{"source": 3}\n')
    code, _, err = _run(_text_args(bad, tmp_path / "run"))
    _no_traceback(err)
    assert code == 2 and not (tmp_path / "run" / "train_config.json").exists()


def test_rundir_save_failure_that_is_not_disk_full_is_raised_as_is(tmp_path):
    run = RunDir(tmp_path / "run")

    def broken(d: Path) -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError):
        run.save_checkpoint(1, broken, {"step": 1})
    assert run.checkpoints() == [] and not list((tmp_path / "run" / ckpt.CHECKPOINTS).iterdir())


def test_vqa_data_lines_have_the_text_data_line_cap(tmp_path, monkeypatch):
    from mu.data import tasks
    from mu.vision import load_vqa_jsonl

    monkeypatch.setattr(tasks, "MAX_LINE_CHARS", 1000)
    path = tmp_path / "big.jsonl"
    row = {"id": "a", "image": "x.png", "question": "q", "answers": ["y"]}
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "id": "b", "question": "q" * 5000}) + "\n")
    with pytest.raises(MuError, match="big.jsonl:2: longer than 1,000 characters"):
        load_vqa_jsonl(path, check_images=False)
    with pytest.raises(MuError, match="is a directory"):
        load_vqa_jsonl(tmp_path)


def test_distill_sigterm_checkpoints_and_the_rerun_resumes(tmp_path, text_file):
    sys.path.insert(0, str(Path(__file__).parent))
    from reliability_util import save_tiny

    teacher = save_tiny(tmp_path / "teacher", arch="deconly")
    run = tmp_path / "kd"
    args = ["distill", "--teacher", str(teacher), "--student-preset", "tiny", "--task", "seq2seq", "--train-data",
            str(text_file), "--out", str(run), "--max-steps", "400", "--batch-size", "2", "--save-every", "3",
            "--no-progress"]
    code, _, err = _signal_after_checkpoint(args, run, signal.SIGTERM)
    _no_traceback(err)
    assert code == 128 + signal.SIGTERM and "SIGTERM received: stopped after step" in err, err[-2000:]
    stopped = int(err.split("stopped after step ")[1].split(",")[0])
    args[args.index("--max-steps") + 1] = str(stopped + 1)
    code, out, err = _run(args)
    assert code == 0 and f"resuming from {run / 'checkpoints' / f'step_{stopped:08d}'}" in err, err[-2000:]
    assert json.loads(out.strip().splitlines()[-1])["steps"] == stopped + 1


def test_lora_finetune_resumes_from_its_checkpoint_to_the_same_adapter(tmp_path, text_file):
    """LoRA training runs on the same run directory: a run that dies after its step-4 checkpoint (as a SIGKILL
    would leave it) and is continued by the same call gives the adapter of an uninterrupted run."""
    import mu
    from mu.distill.lora import ADAPTER_WEIGHTS, FinetuneTeacherConfig, finetune_teacher
    from mu.tokenizer import byte_tokenizer

    torch.manual_seed(0)
    base = mu.build_model("tiny", arch="deconly", n_decoder_layer=1, block_size=64, dropout=0.0)
    base.tokenizer = byte_tokenizer()
    base.save_pretrained(tmp_path / "base")

    def cfg(out: str, steps: int) -> FinetuneTeacherConfig:
        return FinetuneTeacherConfig(model=str(tmp_path / "base"), out=str(tmp_path / out), train_data=str(text_file),
                                     task="seq2seq", max_steps=steps, save_every=2, lora_dropout=0.0, progress=False,
                                     device="cpu", max_source_len=32, max_target_len=8, lr=1e-2, warmup=0)

    ref = finetune_teacher(cfg("ref", 6))
    save = RunDir.save_checkpoint

    def killed_after_step_4(self, step, *a, **k):
        path = save(self, step, *a, **k)
        if step == 4:
            raise KeyboardInterrupt  # the process dies right after its step-4 checkpoint
        return path

    RunDir.save_checkpoint = killed_after_step_4
    try:
        with pytest.raises(KeyboardInterrupt):
            finetune_teacher(cfg("run", 6))
    finally:
        RunDir.save_checkpoint = save
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [2, 4]
    assert not (tmp_path / "run" / "adapter").exists()
    res = finetune_teacher(cfg("run", 6))
    assert res["resumed_from"] == 4 and res["steps"] == 6
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / r / "adapter" / ADAPTER_WEIGHTS) for r in ("ref", "run"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert res["train_loss"] == pytest.approx(ref["train_loss"], abs=1e-6)
