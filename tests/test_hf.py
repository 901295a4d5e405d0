"""Hugging Face transformers interop (`mu.hf`): Auto classes on mu's directories, greedy parity, round
trips, the text2text pipeline, and `mu export hf` loading where mu is not importable."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import mu
from mu.cli import main
from mu.config import MuConfig
from mu.generation import left_pad

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("mu's transformers classes target transformers 5", allow_module_level=True)

from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, pipeline  # noqa: E402

STEPS = 32


def _model(arch):
    torch.manual_seed(0)
    layers = dict(n_encoder_layer=2, n_decoder_layer=2) if arch == "encdec" else dict(n_decoder_layer=2)
    model = mu.build_model("tiny", arch=arch, weight_init="fan_in", dropout=0.0, **layers).eval()
    model.tokenizer = mu.byte_tokenizer()
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Both architectures saved by mu's save_pretrained."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for arch in ("encdec", "deconly"):
        model = _model(arch)
        model.save_pretrained(root / arch)
        out[arch] = (model, root / arch)
    return out


def _batch(arch):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 260, (3, 10), generator=g)
    ids[0, 6:] = 0
    ids[2, 3:] = 0
    mask = ids != 0
    if arch == "deconly":  # transformers' decoder-only generation wants left padding; mu aligns the same way
        ids, mask = left_pad(ids, mask, 0)
    return ids, mask.long()


AUTO = {"encdec": AutoModelForSeq2SeqLM, "deconly": AutoModelForCausalLM}


def test_config_fields_follow_mu():
    from mu.hf.configuration_mu import MU_FIELDS

    assert MU_FIELDS == {f.name: f.default for f in dataclasses.fields(MuConfig)}


@pytest.mark.parametrize("arch", ["encdec", "deconly"])
def test_auto_classes_load_the_same_files_and_match_logits(arch, saved):
    model, path = saved[arch]
    files = sorted(p.name for p in path.iterdir())
    config = AutoConfig.from_pretrained(path)
    assert type(config).__name__ == "MuHFConfig" and config.arch == arch
    hf = AUTO[arch].from_pretrained(path).eval()
    assert type(hf).__name__ == ("MuForConditionalGeneration" if arch == "encdec" else "MuForCausalLM")
    assert sorted(p.name for p in path.iterdir()) == files  # nothing converted or written
    state = hf.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v), k
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied, as in mu
    ids, mask = _batch(arch)
    with torch.no_grad():
        if arch == "encdec":
            dec = torch.randint(4, 260, (3, 7))
            want = model(ids, dec, encoder_attention_mask=mask).logits
            got = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, use_cache=False).logits
        else:
            right = _batch("encdec")[0]  # mu's uncached forward takes right padding
            want = model(right).logits
            got = hf(input_ids=right, use_cache=False).logits
    valid = (ids if arch == "encdec" else right) != 0
    if arch == "deconly":
        want, got = want[valid], got[valid]  # outputs at padding positions are unused
    assert (got - want).abs().max() <= 1e-4


@pytest.mark.parametrize("arch", ["encdec", "deconly"])
def test_generate_greedy_matches_mu(arch, saved):
    model, path = saved[arch]
    hf = AUTO[arch].from_pretrained(path).eval()
    ids, mask = _batch(arch)
    want = model.generate(ids, attention_mask=mask, max_new_tokens=STEPS)
    got = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=STEPS, do_sample=False)
    assert torch.equal(got, want)
    eos = int(want[0, -4])  # stop early on a token the first row emits
    want = model.generate(ids, attention_mask=mask, max_new_tokens=STEPS, eos_token_id=eos)
    got = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=STEPS, do_sample=False, eos_token_id=eos)
    assert torch.equal(got, want[:, :got.shape[1]]) and bool((want[:, got.shape[1]:] == 0).all())


@pytest.mark.parametrize("arch", ["encdec", "deconly"])
def test_round_trip_mu_to_transformers_to_mu(arch, saved, tmp_path):
    model, path = saved[arch]
    hf = AUTO[arch].from_pretrained(path)
    hf.save_pretrained(tmp_path / "hf")
    back = mu.load_model(tmp_path / "hf")
    assert back.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    # and a model made by transformers (random init) loads in mu with the same outputs
    fresh = AUTO[arch].from_config(hf.config).eval()
    fresh.save_pretrained(tmp_path / "fresh")
    loaded = mu.load_model(tmp_path / "fresh")
    ids, mask = _batch(arch)
    assert torch.equal(loaded.generate(ids, attention_mask=mask, max_new_tokens=8),
                       fresh.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False))


def test_wrong_auto_class_says_which_to_use(saved):
    with pytest.raises(ValueError, match="load it with AutoModelForSeq2SeqLM"):
        AutoModelForCausalLM.from_pretrained(saved["encdec"][1])


def test_pipelines(saved):
    model, path = saved["encdec"]
    pipe = pipeline("text2text-generation", model=str(path))
    text = "the cat sat"
    ids = model.tokenizer(text, return_tensors="pt")["input_ids"]
    want = model.tokenizer.decode(model.generate(ids, max_new_tokens=12)[0], skip_special_tokens=True)
    assert pipe(text, max_new_tokens=12) == [{"generated_text": want}]
    assert pipe([text, text], max_new_tokens=12) == [{"generated_text": want}] * 2
    model, path = saved["deconly"]  # decoder-only: transformers' own text-generation pipeline
    gen = pipeline("text-generation", model=str(path))
    want = model.tokenizer.decode(model.generate(ids, max_new_tokens=8)[0], skip_special_tokens=True)
    assert gen(text, max_new_tokens=8, do_sample=False)[0]["generated_text"] == want


REMOTE = r"""
import json, os, sys, importlib.util
sys.path[:] = [p for p in sys.path if not os.path.isfile(os.path.join(p or ".", "mu", "__init__.py"))]
assert importlib.util.find_spec("mu") is None, "mu is importable"
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, pipeline
args = json.loads(sys.argv[1])
out = {}
for arch, auto in (("encdec", AutoModelForSeq2SeqLM), ("deconly", AutoModelForCausalLM)):
    import torch
    model = auto.from_pretrained(args[arch], trust_remote_code=True).eval()
    ids = torch.tensor(args["ids"][arch])
    out[arch] = model.generate(input_ids=ids, attention_mask=(ids != 0).long(), max_new_tokens=16,
                               do_sample=False, eos_token_id=None).tolist()
tok = AutoTokenizer.from_pretrained(args["encdec"], trust_remote_code=True)
pipe = pipeline("text2text-generation", model=args["encdec"], trust_remote_code=True)
out["pipeline"] = pipe("the cat sat", max_new_tokens=12, eos_token_id=None)[0]["generated_text"]
out["mu_imported"] = "mu" in sys.modules
print(json.dumps(out))
"""


def test_export_hf_loads_with_remote_code_without_mu(saved, tmp_path):
    run = tmp_path / "run"  # a `mu train` run directory: records beside the model
    model, path = saved["encdec"]
    model.save_pretrained(run / "final")
    (run / "train_config.json").write_text(json.dumps({"task": "squad_v2", "objective": "seq2seq",
                                                       "train_data": "synthetic:train", "val_data": "synthetic:val",
                                                       "val_limit": 64, "preset": "tiny", "seed": 0}))
    (run / "result.json").write_text(json.dumps({"steps": 100, "examples": 800, "flops": 1.5e12,
                                                 "stop_reason": "max_steps", "val_loss": 1.25,
                                                 "val_metrics": {"f1": 0.5}}))
    evals = tmp_path / "eval.json"
    evals.write_text(json.dumps({"task": "squad_v2", "data": "dev.jsonl", "metrics": {"f1": 0.47, "exact": 0.4}}))
    out = {"encdec": tmp_path / "hf-encdec", "deconly": tmp_path / "hf-deconly"}
    assert main(["export", "hf", "--model", str(run / "final"), "--out", str(out["encdec"]), "--eval", str(evals)]) == 0
    assert main(["export", "hf", "--model", str(saved["deconly"][1]), "--out", str(out["deconly"])]) == 0

    card = (out["encdec"] / "README.md").read_text()
    n = model.num_parameters()
    assert f"{n:,}" in card and "synthetic:train" in card and "val_loss 1.25" in card and "f1 0.47" in card
    card = (out["deconly"] / "README.md").read_text()
    assert "Training data\n\n- not recorded" in card and "Measured scores\n\n- not recorded" in card
    assert mu.load_model(out["encdec"]).config == model.config  # mu reads the export too

    ids = {arch: _batch(arch)[0].tolist() for arch in ("encdec", "deconly")}
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", PYTHONPATH="")
    proc = subprocess.run([sys.executable, "-c", REMOTE, json.dumps({**{k: str(v) for k, v in out.items()},
                                                                     "ids": ids})],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["mu_imported"] is False
    for arch in ("encdec", "deconly"):
        m = saved[arch][0]
        ids_t, mask = _batch(arch)
        assert got[arch] == m.generate(ids_t, attention_mask=mask, max_new_tokens=16).tolist()
    text_ids = model.tokenizer("the cat sat", return_tensors="pt")["input_ids"]
    assert got["pipeline"] == model.tokenizer.decode(model.generate(text_ids, max_new_tokens=12)[0],
                                                     skip_special_tokens=True)


def test_export_hf_refuses_other_models(tmp_path, capsys):
    other = tmp_path / "vlm"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "mu-vlm"}))
    assert main(["export", "hf", "--model", str(other), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "model_type 'mu-vlm' cannot be exported to transformers" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_pipeline_registered_when_its_module_is_imported_first():
    code = ("import mu.hf.pipeline_mu\nfrom transformers.pipelines import PIPELINE_REGISTRY\n"
            "print('text2text-generation' in PIPELINE_REGISTRY.get_supported_tasks())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "True"
