"""Save/load round trips, the paper's .pt format, tokenizers, and clear CLI errors."""

import json
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

import mu
from mu.cli import main as cli_main
from mu.tokenizer import byte_tokenizer, load_tokenizer, train_tokenizer


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randint(4, 300, (2, 9), generator=g), torch.randint(4, 300, (2, 4), generator=g)


@pytest.mark.parametrize("arch", ["encdec", "deconly"])
def test_save_load_round_trip(tmp_path, arch):
    torch.manual_seed(0)
    model = mu.build_model("tiny", arch=arch).eval()
    model.tokenizer = byte_tokenizer()
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir() if p.name.startswith(("config", "model"))) == \
        ["config.json", "model.safetensors"]
    loaded = mu.load_model(tmp_path / "m")
    assert loaded.config == model.config and not loaded.training
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    enc, dec = _inputs()
    with torch.no_grad():
        if arch == "encdec":
            a, b = model(encoder_input_ids=enc, decoder_input_ids=dec).logits, loaded(encoder_input_ids=enc, decoder_input_ids=dec).logits
        else:
            a, b = model(input_ids=enc).logits, loaded(input_ids=enc).logits
    assert torch.equal(a, b)
    assert loaded.tokenizer is not None and loaded.tokenizer("hi")["input_ids"] == model.tokenizer("hi")["input_ids"]
    # saving again over the same directory replaces it cleanly
    loaded.save_pretrained(tmp_path / "m")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_paper_checkpoint_loads_with_identical_logits(tmp_path):
    """A file in the paper's format (torch.save of model_state_dict + asdict(MuConfig), bf16)."""
    torch.manual_seed(0)
    model = mu.build_model("tiny").to(torch.bfloat16).eval()
    paper_config = {k: v for k, v in asdict(model.config).items() if k != "arch"}  # the paper's fields only
    torch.save({"model_state_dict": model.state_dict(), "model_config": paper_config}, tmp_path / "model.pt")
    loaded = mu.load_model(tmp_path / "model.pt")
    assert loaded.dtype == torch.bfloat16 and loaded.config == model.config
    enc, dec = _inputs()
    with torch.no_grad():
        assert torch.equal(model(encoder_input_ids=enc, decoder_input_ids=dec).logits,
                           loaded(encoder_input_ids=enc, decoder_input_ids=dec).logits)
    # convert-reference writes our format with the same weights
    assert cli_main(["convert-reference", str(tmp_path / "model.pt"), str(tmp_path / "conv"), "--dtype", "fp32"]) == 0
    conv = mu.load_model(tmp_path / "conv")
    assert conv.dtype == torch.float32
    torch.testing.assert_close(conv.transformer.wte.weight, model.transformer.wte.weight.float())


def test_builtin_tokenizers_round_trip(tmp_path):
    tok = byte_tokenizer()
    text = "Caf\u00e9 \u2014 42!\n###Answer\n"
    ids = tok(text)["input_ids"]
    assert len(tok) == 260 and min(ids) >= 4 and tok.decode(ids) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    bpe = train_tokenizer(["the cat sat on the mat"] * 50 + ["a dog ran"] * 50, vocab_size=300)
    assert bpe.pad_token_id == 0 and bpe.bos_token_id == 1 and bpe.eos_token_id == 2
    assert len(bpe("the cat sat")["input_ids"]) < len(tok("the cat sat")["input_ids"])
    bpe.save_pretrained(tmp_path / "t")
    again = load_tokenizer(tmp_path / "t")
    assert again("the mat")["input_ids"] == bpe("the mat")["input_ids"] and again.pad_token_id == 0


def test_paper_tokenizer_conventions(shared_data):
    tok = load_tokenizer(shared_data / "phi3_tokenizer")
    assert (tok.pad_token_id, tok.bos_token_id, tok.padding_side) == (0, 1, "right")
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 32000
    assert tok("Hello")["input_ids"][0] != 1  # no BOS added to encoder inputs


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "mu", *args], capture_output=True, text=True, timeout=120)


def test_cli_missing_and_corrupt_checkpoints(tmp_path):
    r = _run_cli("generate", "--model", str(tmp_path / "nope"), "--prompt", "hi")
    assert r.returncode == 2 and "no model at" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"this is not a checkpoint")
    r = _run_cli("info", str(bad))
    assert r.returncode == 2 and "not a readable PyTorch checkpoint" in r.stderr and "Traceback" not in r.stderr
    d = tmp_path / "dir"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(mu.MuConfig.from_name("tiny").to_dict()))
    (d / "model.safetensors").write_bytes(b"\x00" * 10)
    r = _run_cli("info", str(d))
    assert r.returncode == 2 and "model.safetensors" in r.stderr and "Traceback" not in r.stderr
    (d / "config.json").write_text(json.dumps({"n_layers": 2}))
    r = _run_cli("info", str(d))
    assert r.returncode == 2 and "n_layers" in r.stderr


def test_cli_mismatched_weights(tmp_path):
    model = mu.build_model("tiny")
    torch.save({"model_state_dict": model.state_dict(), "model_config": {**model.config.to_dict(), "n_embd": 128}}, tmp_path / "m.pt")
    r = _run_cli("info", str(tmp_path / "m.pt"))
    assert r.returncode == 2 and "do not match the config" in r.stderr and "Traceback" not in r.stderr


def test_cli_info_and_generate(tmp_path, capsys):
    assert cli_main(["info", "330m", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == 332_042_240 and info["config"]["n_encoder_layer"] == 20
    torch.manual_seed(0)
    model = mu.build_model("tiny")
    model.tokenizer = byte_tokenizer()
    model.save_pretrained(tmp_path / "m")
    assert cli_main(["generate", "--model", str(tmp_path / "m"), "--prompt", "hello", "--max-new-tokens", "5"]) == 0


def test_cli_generate_compiled_equals_eager(tmp_path, capsys):
    """`mu generate --compile` (a torch.compile'd decode step, int8 weights) prints the eager command's text."""
    torch.manual_seed(0)
    model = mu.build_model("tiny")
    model.tokenizer = byte_tokenizer()
    model.save_pretrained(tmp_path / "m")
    argv = ["generate", "--model", str(tmp_path / "m"), "--prompt", "hello", "--max-new-tokens", "8", "--dtype", "int8"]
    assert cli_main(argv) == 0
    eager = capsys.readouterr().out
    assert cli_main(argv + ["--compile"]) == 0
    assert capsys.readouterr().out == eager
    assert cli_main(argv[:-2] + ["--compile", "--backend", "onnx"]) == 2
    assert "--compile applies to --backend torch" in capsys.readouterr().err


def test_seed_entry_point_without_model(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mu.generate_text2text", "--model_path", str(tmp_path / "model.pt"),
                        "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no model at" in r.stderr and "mu train" in r.stderr and "Traceback" not in r.stderr


def test_seed_entry_point_runs_the_paper_example(tmp_path):
    from mu.generate_text2text import main

    torch.manual_seed(0)
    model = mu.build_model("tiny")
    model.tokenizer = byte_tokenizer()
    model.save_pretrained(tmp_path / "m")
    assert main(["--model_path", str(tmp_path / "m"), "--max_new_tokens", "4"]) == 0
