"""Issue 15, category 1: bad model files get one clear error, and no pickle ever runs code.

Every verb that reads a `.pt` (generate, info, eval, convert-reference, train --init, distill --teacher and
--student, the seed entry points) is given a checkpoint whose pickle would create a marker file if it were
unpickled; it must refuse the file by name and the marker must not appear.
"""

import json
import pickle
import shutil

import pytest
import torch

import mu
from mu.model.io import load_model, safe_torch_load
from tests.reliability_util import (MU_BIN, PAYLOAD_KINDS, Payload, assert_refused, run_cli, run_subprocess,
                                    save_tiny, write_payload)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    enc, dec = save_tiny(d / "enc"), save_tiny(d / "dec", arch="deconly")
    data = d / "train.jsonl"
    data.write_text("".join(json.dumps({"source": f"what is {i} plus 1?", "target": str(i + 1)}) + "\n"
                            for i in range(6)))
    return {"enc": enc, "dec": dec, "data": data, "config": json.loads((enc / "config.json").read_text())}


def test_the_payload_is_live(tmp_path, tiny):
    """The test pickles really run code when unpickled without safeguards (so the checks below can fail)."""
    marker = tmp_path / "ran"
    path = write_payload(tmp_path / "p.pt", "plain", marker, tiny["config"])
    pickle.loads(path.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("kind", PAYLOAD_KINDS)
def test_safe_torch_load_refuses_code(tmp_path, tiny, kind):
    marker = tmp_path / "ran"
    path = write_payload(tmp_path / f"{kind}.pt", kind, marker, tiny["config"])
    with pytest.raises(mu.MuError, match="refused to unpickle") as e:
        safe_torch_load(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


VERBS = ["generate", "info", "eval", "convert-reference", "train --init", "distill --teacher", "distill --student",
         "generate_text2text", "train_text2text_by_kd --student_path", "train_text2text_by_kd --teacher_path"]


@pytest.mark.parametrize("verb", VERBS)
@pytest.mark.parametrize("kind", ["zip", "plain"])
def test_every_verb_refuses_a_code_payload(tmp_path, tiny, capsys, kind, verb):
    marker = tmp_path / "ran"
    pt = write_payload(tmp_path / f"payload_{kind}.pt", kind, marker, tiny["config"])
    enc, dec, data, out = tiny["enc"], tiny["dec"], tiny["data"], tmp_path / "out"
    common_train = ["--task", "seq2seq", "--train-data", data, "--max-steps", "1", "--batch-size", "2",
                    "--no-progress", "--device", "cpu", "--num-samples", "0", "--out", out]
    seed_kd = ["--train_data_path", data, "--val_data_path", data, "--max_steps", "1", "--batch_size", "2",
               "--global_batch_size", "2", "--no_progress", "--device", "cpu", "--output_path", out]
    argv = {
        "generate": ["generate", "--model", pt, "--tokenizer", enc, "--prompt", "hi", "--device", "cpu"],
        "info": ["info", pt],
        "eval": ["eval", "--model", pt, "--tokenizer", enc, "--task", "seq2seq", "--data", data, "--quiet",
                 "--device", "cpu", "--out", out / "r.json"],
        "convert-reference": ["convert-reference", pt, out],
        "train --init": ["train", "--init", pt, "--tokenizer", "byte", *common_train],
        "distill --teacher": ["distill", "--teacher", pt, "--student", enc, *common_train],
        "distill --student": ["distill", "--teacher", dec, "--student", pt, *common_train],
    }
    if verb in argv:
        rc, err = run_cli(capsys, *argv[verb])
        assert_refused(rc, err, str(pt), "refused to unpickle")
    elif verb == "generate_text2text":
        from mu.generate_text2text import main

        rc = main(["--model_path", str(pt), "--tokenizer_path", str(enc), "--max_new_tokens", "2"])
        assert_refused(rc, capsys.readouterr().err, str(pt), "refused to unpickle")
    else:
        from mu.train_text2text_by_kd import main

        student, teacher = (pt, dec) if verb.endswith("student_path") else (enc, pt)
        rc = main([str(a) for a in ["--student_path", student, "--teacher_path", teacher, *seed_kd]])
        assert_refused(rc, capsys.readouterr().err, str(pt), "refused to unpickle")
    assert not marker.exists(), "the pickle payload ran"
    assert not (out / "final").exists() and not (out / "config.json").exists() and not (out / "r.json").exists()


def test_real_processes_refuse_a_payload(tmp_path, tiny):
    """From outside: exit status 2, one line, no traceback, payload not run (mu and a seed entry point)."""
    marker = tmp_path / "ran"
    pt = write_payload(tmp_path / "legacy.pt", "legacy", marker, tiny["config"])
    rc, err = run_subprocess(MU_BIN, "generate", "--model", pt, "--tokenizer", tiny["enc"], "--prompt", "hi")
    assert_refused(rc, err, str(pt), "refused to unpickle", "posix.system")
    rc, err = run_subprocess(__import__("sys").executable, "-m", "mu.generate_text2text", "--model_path", pt,
                             "--tokenizer_path", tiny["enc"])
    assert_refused(rc, err, str(pt), "refused to unpickle")
    assert not marker.exists()


def _model_dir(tmp_path, tiny, name, config=None, weights=None, raw=None):
    d = tmp_path / name
    shutil.copytree(tiny["enc"], d)
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    if raw is not None:
        (d / "config.json").write_text(raw)
    if weights is not None:
        (d / "model.safetensors").write_bytes(weights)
    return d


CONFIG_CASES = [  # (change to a good config.json, words the error must contain)
    ({"n_head": 5}, ["'n_head'", "5"]),
    ({"n_embd": 0}, ["'n_embd'", "0", "positive integer"]),
    ({"n_head": -4}, ["'n_head'", "-4"]),
    ({"n_kv_head": 0}, ["'n_kv_head'", "0"]),
    ({"n_decoder_layer": -1}, ["'n_decoder_layer'", "-1"]),
    ({"vocab_size": 0}, ["'vocab_size'"]),
    ({"n_embd": "64"}, ["'n_embd'", "'64'"]),
    ({"dropout": 1.5}, ["'dropout'", "1.5", "[0, 1)"]),
    ({"arch": "gpt2"}, ["'arch'", "gpt2"]),
    ({"is_interleaved": "no"}, ["'is_interleaved'"]),
    ({"pad_token_id": 9999}, ["'pad_token_id'", "9999"]),
    ({"n_layers": 3}, ["n_layers", "unknown"]),
]


@pytest.mark.parametrize("change,words", CONFIG_CASES, ids=[str(c[0]) for c in CONFIG_CASES])
def test_impossible_config_values_name_the_field(tmp_path, tiny, change, words):
    d = _model_dir(tmp_path, tiny, "m", config={**tiny["config"], **change})
    with pytest.raises(mu.MuError) as e:
        load_model(d)
    message = str(e.value)
    assert str(d / "config.json") in message and "\n" not in message
    for w in words:
        assert w in message, (w, message)


def test_broken_model_directories(tmp_path, tiny, capsys):
    weights = (tiny["enc"] / "model.safetensors").read_bytes()
    missing_width = {k: v for k, v in tiny["config"].items() if k != "n_embd"}
    cases = [
        (tmp_path / "nope", ["no model at", "nope"]),
        (_model_dir(tmp_path, tiny, "trunc", weights=weights[:len(weights) // 2]), ["model.safetensors"]),
        (_model_dir(tmp_path, tiny, "garbage", weights=b"\x00" * 64), ["model.safetensors"]),
        (_model_dir(tmp_path, tiny, "notjson", raw='{"n_embd": 64,'), ["config.json", "not valid JSON"]),
        (_model_dir(tmp_path, tiny, "list", raw="[1, 2]"), ["config.json", "JSON object"]),
        (_model_dir(tmp_path, tiny, "nowidth", config=missing_width), ["config.json", "missing", "n_embd"]),
        (_model_dir(tmp_path, tiny, "mismatch", config={**tiny["config"], "hidden_dim": 128}),
         ["mismatch", "do not match", "mlp.fc1.weight"]),
    ]
    (tmp_path / "empty").mkdir()
    cases.append((tmp_path / "empty", ["empty", "missing config.json"]))
    for path, words in cases:
        rc, err = run_cli(capsys, "generate", "--model", path, "--prompt", "hi", "--device", "cpu")
        assert_refused(rc, err, *words)


def test_broken_paper_checkpoints(tmp_path, tiny, capsys):
    model = load_model(tiny["enc"])
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    good, cfg = tmp_path / "good.pt", model.config.to_dict()
    torch.save({"model_state_dict": state, "model_config": cfg}, good)
    assert load_model(good).config == model.config  # the control loads
    (tmp_path / "trunc.pt").write_bytes(good.read_bytes()[:2000])
    torch.save([1, 2], tmp_path / "list.pt")
    torch.save({"model_state_dict": state}, tmp_path / "nocfg.pt")
    torch.save({"model_state_dict": state, "model_config": {**cfg, "n_kv_head": 0}}, tmp_path / "kv.pt")
    shutil.copy(good, tmp_path / "model.pkl")
    for name, words in [("trunc.pt", ["not a readable PyTorch checkpoint"]), ("list.pt", ["model_state_dict"]),
                        ("nocfg.pt", ["no 'model_config'"]), ("kv.pt", ["model_config", "'n_kv_head'"]),
                        ("model.pkl", [".pt"])]:
        for argv in (["info", tmp_path / name], ["convert-reference", tmp_path / name, tmp_path / f"out_{name}"],
                     ["train", "--init", tmp_path / name, "--tokenizer", "byte", "--train-data", tiny["data"],
                      "--out", tmp_path / f"run_{name}", "--max-steps", "1", "--no-progress", "--device", "cpu"]):
            rc, err = run_cli(capsys, *argv)
            assert_refused(rc, err, name, *words)
        assert not (tmp_path / f"out_{name}").exists() and not (tmp_path / f"run_{name}" / "final").exists()
    rc, err = run_cli(capsys, "convert-reference", tiny["enc"], tmp_path / "out_dir")
    assert_refused(rc, err, "is a directory")


def test_a_tokenizer_asking_for_remote_code_is_refused_and_not_run(tmp_path, tiny, capsys):
    tok_dir = tmp_path / "tok"
    mu.byte_tokenizer().save_pretrained(tok_dir)
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    cfg.update(auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}, tokenizer_class="EvilTokenizer")
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    marker = tmp_path / "ran"
    (tok_dir / "tokenization_evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    rc, err = run_cli(capsys, "generate", "--model", tiny["enc"], "--tokenizer", tok_dir, "--prompt", "hi")
    assert_refused(rc, err, str(tok_dir), "run code")
    assert not marker.exists()


def test_a_hugging_face_teacher_with_a_payload_in_its_bin_file(tmp_path, tiny, capsys):
    """distill --teacher DIR: transformers reads pytorch_model.bin weights-only; mu reports the refusal in one line."""
    from transformers import LlamaConfig

    teacher, marker = tmp_path / "teacher", tmp_path / "ran"
    LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1).save_pretrained(teacher)
    mu.byte_tokenizer().save_pretrained(teacher)
    torch.save({"model.embed_tokens.weight": Payload(marker)}, teacher / "pytorch_model.bin")
    rc, err = run_cli(capsys, "distill", "--teacher", teacher, "--student-preset", "tiny", "--train-data",
                      tiny["data"], "--out", tmp_path / "kd", "--max-steps", "1", "--device", "cpu", "--no-progress")
    assert_refused(rc, err, str(teacher), "refused to unpickle", "posix.system")
    assert not marker.exists() and not (tmp_path / "kd" / "final").exists()
