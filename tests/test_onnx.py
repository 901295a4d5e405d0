"""ONNX export (`mu export onnx`, `mu.export.onnx_export`) and the onnxruntime backend (`mu.onnx`).

Tiny models with 2 + 2 layers; every graph is exported once per module (the exporter takes a few
seconds a graph). Logits are compared with the PyTorch model's cached path at every step.
"""

import json

import numpy as np
import pytest
import torch

import mu
from mu.cli import main
from mu.errors import MuError

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import mu.onnx  # noqa: E402
from mu.export.onnx_export import MANIFEST, export_onnx, quantize_export  # noqa: E402

TOL = 1e-4
STEPS = 32


def _model(arch):
    torch.manual_seed(0)
    layers = dict(n_encoder_layer=2, n_decoder_layer=2) if arch == "encdec" else dict(n_decoder_layer=2)
    model = mu.build_model("tiny", arch=arch, weight_init="fan_in", dropout=0.0, **layers).eval()
    model.tokenizer = mu.byte_tokenizer()
    return model


@pytest.fixture(scope="module")
def encdec(tmp_path_factory):
    """A saved tiny encoder-decoder exported through the CLI."""
    root = tmp_path_factory.mktemp("onnx_encdec")
    model = _model("encdec")
    model.save_pretrained(root / "model")
    assert main(["export", "onnx", "--model", str(root / "model"), "--out", str(root / "onnx")]) == 0
    return model, root


@pytest.fixture(scope="module")
def deconly(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx_deconly")
    model = _model("deconly")
    export_onnx(model, root / "onnx")
    return model, root


def _batch():
    """Three prompts of different lengths (right padding), token ids of the byte tokenizer."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 260, (3, 11), generator=g)
    ids[0, 7:] = 0
    ids[2, 3:] = 0
    return ids


def _step_by_step(model, onnx_model, ids):
    """Greedy decoding of both backends in lockstep from the PyTorch tokens; max logit difference per step."""
    from mu.generation import left_pad

    mask = ids != 0
    start = None
    if model.config.arch == "encdec":
        start = torch.ones(ids.shape[0], 1, dtype=torch.long)
        n = 1 + STEPS
    else:
        ids, mask = left_pad(ids, mask, 0)
        n = ids.shape[1] + STEPS
    with torch.inference_mode():
        cache_t, cache_o = model.new_cache(ids.shape[0], n), onnx_model.new_cache(ids.shape[0], n)
        logits_t = model.prefill(ids, mask, cache_t, start)
        logits_o = onnx_model.prefill(ids, mask, cache_o, start)
        diffs, tokens_t, tokens_o = [], [], []
        for _ in range(STEPS):
            diffs.append((logits_t - logits_o).abs().max().item())
            tokens_t.append(logits_t.argmax(-1))
            tokens_o.append(logits_o.argmax(-1))
            step = tokens_t[-1][:, None]
            logits_t = model.decode_step(step, cache_t)
            logits_o = onnx_model.decode_step(step, cache_o)
    return max(diffs), torch.stack(tokens_t, 1), torch.stack(tokens_o, 1)


def test_encoder_graph_outputs_cross_kv(encdec):
    model, root = encdec
    om = mu.onnx.load(root / "onnx", threads=1)
    assert set(om.sessions) == {"encoder", "decoder"}
    ids = _batch()
    cache = om.new_cache(ids.shape[0], 4)
    om.encode(ids, None, cache)
    with torch.no_grad():
        enc_out, _ = model.encode(ids)
        expected = [t for block in model.transformer.h for t in block.cross_kv(enc_out)]
    assert len(cache.cross) == 2 * model.config.n_decoder_layer
    for got, want in zip(cache.cross, expected):
        assert got.shape == tuple(want.shape)  # (B, n_kv_head, S, head_dim)
        valid = (ids != 0)[:, None, :, None].expand_as(want)  # padding positions are masked downstream
        assert np.abs(got - want.numpy())[valid.numpy()].max() <= TOL


@pytest.mark.parametrize("arch", ["encdec", "deconly"])
def test_decoder_step_logits_and_greedy_tokens_match_pytorch(arch, encdec, deconly):
    model, root = encdec if arch == "encdec" else deconly
    om = mu.onnx.load(root / "onnx", threads=1)
    diff, tokens_t, tokens_o = _step_by_step(model, om, _batch())
    assert diff <= TOL
    assert torch.equal(tokens_t, tokens_o)


@pytest.mark.parametrize("arch", ["encdec", "deconly"])
def test_generate_batched_greedy_sampling_beams_match(arch, encdec, deconly):
    model, root = encdec if arch == "encdec" else deconly
    om = mu.onnx.load(root / "onnx", threads=1)
    ids = _batch()
    greedy = model.generate(ids, max_new_tokens=STEPS)
    assert torch.equal(om.generate(ids, max_new_tokens=STEPS), greedy)
    for i in range(ids.shape[0]):  # each row alone gives the row of the padded batch
        alone = ids[i:i + 1, :int((ids[i] != 0).sum())]
        row = om.generate(alone, max_new_tokens=STEPS)[0]
        assert torch.equal(row, greedy[i, -row.shape[0]:])
    sample = dict(max_new_tokens=12, do_sample=True, temperature=0.8, top_k=50, top_p=0.9)
    assert torch.equal(om.generate(ids, generator=torch.Generator().manual_seed(3), **sample),
                       model.generate(ids, generator=torch.Generator().manual_seed(3), **sample))
    eos = int(greedy[0, -5])  # a token the first row emits: generation stops there and pads after
    assert torch.equal(om.generate(ids, max_new_tokens=STEPS, eos_token_id=eos),
                       model.generate(ids, max_new_tokens=STEPS, eos_token_id=eos))
    assert torch.equal(om.generate(ids, max_new_tokens=6, num_beams=3),
                       model.generate(ids, max_new_tokens=6, num_beams=3))


def test_cli_generate_with_onnx_backend(encdec, capsys):
    _, root = encdec
    args = ["generate", "--prompt", "hello there", "--max-new-tokens", "12"]
    assert main(args + ["--model", str(root / "model")]) == 0
    torch_text = capsys.readouterr().out
    assert main(args + ["--model", str(root / "onnx"), "--backend", "onnx"]) == 0
    assert capsys.readouterr().out == torch_text
    assert main(args + ["--model", str(root / "model"), "--backend", "onnx"]) == 2
    assert "export it first" in capsys.readouterr().err


def test_int8_quantization(encdec, tmp_path):
    import onnx

    model, root = encdec
    quantize_export(root / "onnx", tmp_path / "int8")
    manifest = json.loads((tmp_path / "int8" / MANIFEST).read_text())
    assert manifest["quantization"] == "int8"
    ops = {n.op_type for n in onnx.load(str(tmp_path / "int8" / "decoder.onnx")).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops
    om = mu.onnx.load(tmp_path / "int8", threads=1)
    ids = _batch()
    cache = om.new_cache(3, 2)
    logits_q = om.prefill(ids, None, cache, torch.ones(3, 1, dtype=torch.long))
    with torch.no_grad():
        logits = model.prefill(ids, None, model.new_cache(3, 2), torch.ones(3, 1, dtype=torch.long))
    rel = (logits_q - logits).norm() / logits.norm()
    assert 0 < rel < 0.1  # quantized (not bit-identical), and close
    assert om.generate(ids, max_new_tokens=4).shape == (3, 5)
    with pytest.raises(MuError, match="already quantized"):
        quantize_export(tmp_path / "int8", tmp_path / "again")


def test_vlm_graphs_and_generation(tmp_path):
    from mu.vision import VisionTowerConfig, build_vlm

    torch.manual_seed(0)
    tower = VisionTowerConfig(image_size=32, patch_size=8, width=32, depth=1, n_head=2)
    vlm = build_vlm("tiny", tower=tower, n_encoder_layer=2, n_decoder_layer=2, dropout=0.0,
                    weight_init="fan_in").eval()
    export_onnx(vlm, tmp_path / "vlm")
    om = mu.onnx.load(tmp_path / "vlm", threads=1)
    assert set(om.sessions) == {"vision", "embed", "encoder", "decoder"}
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = vlm.encode_images(pixels)
    for got, w in zip(om.encode_images(pixels), want):
        assert (got - w).abs().max() <= TOL
    ids, mask = vlm.tokenize_prompts(["what colour?", "is there a red square here?"])
    expected = vlm.generate(ids, images=pixels, attention_mask=mask, max_new_tokens=STEPS)
    assert torch.equal(om.generate(ids, images=pixels, attention_mask=mask, max_new_tokens=STEPS), expected)


def test_export_refuses_unsupported_models(tmp_path, capsys):
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(MuError, match="model_type 'llama' is not exportable"):
        export_onnx(other, tmp_path / "out")
    quantized = _model("encdec").quantize_("int8")
    with pytest.raises(MuError, match="export the float model and pass --quantize int8"):
        export_onnx(quantized, tmp_path / "out")
    assert main(["export", "onnx", "--model", str(other), "--out", str(tmp_path / "out"), "--opset", "9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--opset 9 is not supported" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    keep = tmp_path / "notes"
    keep.mkdir()
    (keep / "todo.txt").write_text("mine")
    assert main(["export", "onnx", "--model", str(other), "--out", str(keep)]) == 2
    assert "is not an earlier export" in capsys.readouterr().err
    assert (keep / "todo.txt").read_text() == "mine"
