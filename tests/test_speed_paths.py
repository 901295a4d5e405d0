"""The inference fast paths give the same answers as the plain model: fused projections, RoPE tables,
bf16, int8 (`model.quantize_`), within each path's tolerance."""

import copy

import pytest
import torch
import torch.nn.functional as F

import mu
from mu.model import quantize as q8
from mu.model import layers


def _ids(B, T, seed=0):
    return torch.randint(4, 500, (B, T), generator=torch.Generator().manual_seed(seed))


def _logits(model, enc, dec):
    if model.config.arch == "encdec":
        return model(encoder_input_ids=enc, decoder_input_ids=dec).logits
    return model(input_ids=torch.cat([enc, dec], 1)).logits


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _assert_cached_decode_matches_forward(m):
    """A quantized model's cached decode (prefill + one decode_step per token) against its own uncached forward."""
    prompt = _ids(1, 10, seed=2)
    out = m.generate(prompt, max_new_tokens=6)
    cache = m.new_cache(1, 20)
    with torch.no_grad():
        if m.config.arch == "encdec":
            full = m(encoder_input_ids=prompt, decoder_input_ids=out).logits[0]
            steps = [m.prefill(prompt, None, cache, out[:, :1])]
            steps += [m.decode_step(out[:, t:t + 1], cache) for t in range(1, out.shape[1])]
        else:
            full = m(input_ids=out).logits[0, 9:]
            steps = [m.prefill(prompt, None, cache)]
            steps += [m.decode_step(out[:, t:t + 1], cache) for t in range(10, out.shape[1])]
    assert _rel(torch.cat(steps), full) < 0.05


@pytest.fixture(params=["encdec", "deconly"])
def model(request):
    torch.manual_seed(0)
    return mu.build_model("tiny", arch=request.param).eval()


def _padded_inputs():
    enc, dec = _ids(2, 11), _ids(2, 6, seed=1)
    enc[1, 8:] = 0
    dec[:, 0] = 1
    return enc, dec


def test_fused_inference_path_equals_training_path(model):
    """Without autograd, q/k/v (and cross k/v) run as one fused GEMM; with it, the paper's three linears."""
    enc, dec = _padded_inputs()
    with torch.enable_grad():
        plain = _logits(model, enc, dec)
    with torch.no_grad():
        fused = _logits(model, enc, dec)
    attn = next(m for m in model.modules() if isinstance(m, layers.Attention))
    assert "qkv" in attn._fused  # the fused path really ran
    valid = torch.cat([enc, dec], 1) != 0 if model.config.arch == "deconly" else dec != 0
    torch.testing.assert_close(fused[valid], plain.detach()[valid], atol=1e-5, rtol=1e-5)


def test_fused_weights_follow_parameter_updates(model):
    """Training between generations (in-place updates) or loading weights never leaves stale fused copies."""
    enc, dec = _padded_inputs()
    attn = model.decoder_blocks()[0].causal_attn if model.config.arch == "encdec" else model.decoder_blocks()[0].attn
    with torch.no_grad():
        before = _logits(model, enc, dec)
        fused = attn.fused_linear("qkv")
        assert attn.fused_linear("qkv") is fused  # cached while nothing changes
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    out = model(encoder_input_ids=enc, decoder_input_ids=dec, targets=dec) if model.config.arch == "encdec" \
        else model(input_ids=enc, targets=enc)
    out.loss.backward()
    opt.step()  # in-place parameter updates
    model.eval()
    with torch.no_grad():
        after = _logits(model, enc, dec)
        assert attn.fused_linear("qkv") is not fused
    with torch.enable_grad():
        expected = _logits(model, enc, dec).detach()
    assert not torch.allclose(after, before, atol=1e-3)
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=1e-5)
    # load_state_dict copies into the parameters in place: the fused weights follow again
    torch.manual_seed(1)
    other = mu.build_model("tiny", arch=model.config.arch).eval()
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(_logits(model, enc, dec), _logits(other, enc, dec), atol=1e-6, rtol=1e-6)
    assert set(model.state_dict()) == set(other.state_dict())  # nothing fused leaks into the state dict


def test_rope_table_equals_direct_computation():
    """A decode step indexes a per-request table, except when NTK scaling makes the base length-dependent."""
    for factor in (1.0, 4.0):
        torch.manual_seed(0)
        m = mu.build_model("tiny", arch="deconly", rope_factor=factor, block_size=8).eval()
        cache = m.new_cache(2, 20)
        positions = torch.tensor([[3], [7]])
        for end in (5, 8, 12):  # below, at and above block_size
            got = m._step_rope(cache, positions, end)
            want = layers.rope_cos_sin(m.config, positions, end, m.dtype)
            torch.testing.assert_close(got[0], want[0].expand_as(got[0]), atol=1e-6, rtol=0)
            torch.testing.assert_close(got[1], want[1].expand_as(got[1]), atol=1e-6, rtol=0)


def test_cached_decoding_past_block_size_with_ntk_scaling():
    """With rope_factor > 1, steps beyond block_size recompute RoPE (as before the table existed)."""
    torch.manual_seed(0)
    m = mu.build_model("tiny", arch="deconly", rope_factor=2.0, block_size=8).eval()
    prompt = _ids(1, 6)
    out = m.generate(prompt, max_new_tokens=6)
    cache = m.new_cache(1, 12)
    with torch.no_grad():
        steps = [m.prefill(prompt, None, cache)]
        steps += [m.decode_step(out[:, t:t + 1], cache) for t in range(6, 11)]
    # the same steps, computing RoPE directly every time
    cache2 = m.new_cache(1, 12)
    with torch.no_grad():
        ref = [m.prefill(prompt, None, cache2)]
        for t in range(6, 11):
            cache2.rope = None
            ref.append(m.decode_step(out[:, t:t + 1], cache2))
    torch.testing.assert_close(torch.stack(steps), torch.stack(ref), atol=1e-6, rtol=0)
    assert out[0, 6:].tolist() == torch.stack(steps).argmax(-1)[:, 0].tolist()


def test_bf16_cached_matches_uncached_and_fp32(model):
    prompt = _ids(1, 9, seed=3)
    m16 = mu.build_model("tiny", arch=model.config.arch)
    m16.load_state_dict(model.state_dict())
    m16 = m16.to(torch.bfloat16).eval()
    out = m16.generate(prompt, max_new_tokens=5)
    w = 1 if model.config.arch == "encdec" else prompt.shape[1]
    with torch.no_grad():
        for t in range(5):
            if model.config.arch == "encdec":
                ref16 = m16(encoder_input_ids=prompt, decoder_input_ids=out[:, :w + t]).logits[0, -1]
                ref32 = model(encoder_input_ids=prompt, decoder_input_ids=out[:, :w + t]).logits[0, -1]
            else:
                ref16 = m16(input_ids=out[:, :w + t]).logits[0, -1]
                ref32 = model(input_ids=out[:, :w + t]).logits[0, -1]
            assert ref16.argmax().item() == out[0, w + t].item()
            assert _rel(ref16, ref32) < 0.05


def _quantized_copy(model, **kw):
    m = mu.build_model("tiny", arch=model.config.arch)
    m.load_state_dict(model.state_dict())
    return m.eval().quantize_("int8", **kw)


def test_int8_logits_close_to_float_and_cached_close_to_uncached(model):
    m8 = _quantized_copy(model)
    assert not any(isinstance(m, torch.nn.Linear) for m in m8.modules())
    assert isinstance(m8.lm_head, q8.Int8Linear) and m8.transformer.wte.weight.dtype == torch.float32
    enc, dec = _padded_inputs()
    with torch.no_grad():
        ref, got = _logits(model, enc, dec), _logits(m8, enc, dec)
    valid = torch.cat([enc, dec], 1) != 0 if model.config.arch == "deconly" else dec != 0
    assert _rel(got[valid], ref[valid]) < 0.08
    # the cached decode of the int8 model against its own uncached forward
    _assert_cached_decode_matches_forward(m8)


def test_int8_decoder_only_quantization_keeps_the_encoder_exact():
    torch.manual_seed(0)
    model = mu.build_model("tiny").eval()
    m8 = _quantized_copy(model, include_encoder=False)
    assert isinstance(m8.transformer.e[0].mlp.fc1, torch.nn.Linear)
    assert isinstance(m8.transformer.h[0].mlp.fc1, q8.Int8Linear)
    ids = _ids(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(m8.encode(ids)[0], model.encode(ids)[0], atol=0, rtol=0)


def test_int8_dequant_fallback_matches_fbgemm(monkeypatch):
    monkeypatch.setattr(q8.native, "int8_available", lambda: False)  # fbgemm's kernels, not mu's own
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(3, 5, 64)
    fast = q8.Int8Linear(lin.weight, lin.bias)
    with monkeypatch.context() as m:  # torch without the tensor-only op: fbgemm's dynamic-quantization op
        m.setattr(q8, "_linear_int8", None)
        dynamic = q8.Int8Linear(lin.weight, lin.bias)
    monkeypatch.setattr(q8, "_fbgemm_available", lambda: False)
    slow = q8.Int8Linear(lin.weight, lin.bias)
    assert slow.backend == "dequant"
    with torch.no_grad():
        ref = lin(x)
        assert _rel(slow(x), ref) < 0.02
        for quantized in (fast, dynamic):
            if quantized.backend.startswith("fbgemm"):
                assert _rel(quantized(x), ref) < 0.03  # activations are quantized too (per call)
            assert quantized(x).shape == ref.shape == (3, 5, 48)
        assert dynamic.backend in ("fbgemm-dynamic", "dequant")


def test_int8_model_refuses_training_saving_and_double_quantization(model, tmp_path):
    m8 = _quantized_copy(model)
    with pytest.raises(mu.MuError, match="save"):
        m8.save_pretrained(tmp_path / "q")
    with pytest.raises(mu.MuError, match="already quantized"):
        m8.quantize_("int8")
    with pytest.raises(mu.MuError, match="unknown mode"):
        model.quantize_("int3")
    m8.train()
    x = m8.transformer.wte(_ids(1, 4)).requires_grad_(True)
    with pytest.raises(mu.MuError, match="inference only"):
        m8.decoder_blocks()[0].mlp(x)


def test_int8_generation_batched_and_beam(model):
    """The quantized model runs every generation mode of the one loop."""
    m8 = _quantized_copy(model)
    prompt = _ids(2, 8, seed=4)
    prompt[1, 6:] = 0
    greedy = m8.generate(prompt, max_new_tokens=5)
    beam = m8.generate(prompt, max_new_tokens=5, num_beams=3)
    sampled = m8.generate(prompt, max_new_tokens=5, do_sample=True, top_k=5, generator=torch.Generator().manual_seed(0))
    assert greedy.shape == beam.shape == sampled.shape


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("arch", ["encdec", "deconly"])
def test_single_token_attention_both_gqa_mappings(arch, interleaved):
    """The decode step regroups heads by view, per GQA mapping: cached steps equal the full forward."""
    torch.manual_seed(0)
    m = mu.build_model("tiny", arch=arch, is_interleaved=interleaved).eval()
    prompt = _ids(2, 9, seed=7)
    prompt[0, 7:] = 0
    out = m.generate(prompt, max_new_tokens=5)
    cache = m.new_cache(2, 20)
    with torch.no_grad():
        if arch == "encdec":
            full = m(encoder_input_ids=prompt, decoder_input_ids=out).logits
            steps = [m.prefill(prompt, None, cache, out[:, :1])]
            steps += [m.decode_step(out[:, t:t + 1], cache) for t in range(1, out.shape[1])]
            torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=1e-5)
        else:
            row = out[1:]  # row 1 has no padding: positions 0..T-1
            full = m(input_ids=row).logits
            steps = [m.prefill(row[:, :9], None, cache := m.new_cache(1, 20))]
            steps += [m.decode_step(row[:, t:t + 1], cache) for t in range(9, row.shape[1])]
            torch.testing.assert_close(torch.stack(steps, 1), full[:, 8:], atol=1e-5, rtol=1e-5)


def test_lora_adapters_are_not_bypassed_by_the_fused_path():
    """peft wraps q/k/v_linear; without autograd the model must still run the adapters, not the bare weights."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = mu.build_model("tiny").eval()
    enc, dec = _padded_inputs()
    with torch.no_grad():
        base = _logits(model, enc, dec)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_linear", "k_linear",
                                                                                            "v_linear"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a non-zero adapter
    lora.eval()
    with torch.enable_grad():
        expected = _logits(model, enc, dec).detach()
    with torch.no_grad():
        got = _logits(model, enc, dec)
        gen = model.generate(enc, max_new_tokens=3)  # and generation runs through the adapters too
    assert not torch.allclose(expected, base, atol=1e-3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(mu.MuError, match="LoRA"):
        model.quantize_("int8")
    assert gen.shape == (2, 4)


def _replay(model, prompt, out, static):
    """Prefill + step through `out` with a normal or a fixed-shape (static) cache -> logits (B, steps, V)."""
    encdec = model.config.arch == "encdec"
    w = 1 if encdec else prompt.shape[1]
    cache = model.new_cache(prompt.shape[0], 64)
    with torch.no_grad():
        steps = [model.prefill(prompt, None, cache, out[:, :1] if encdec else None)]
        cache.static = static
        steps += [model.decode_step(out[:, t:t + 1], cache) for t in range(w, out.shape[1] - 1)]
    return torch.stack(steps, 1)


def test_static_cache_steps_equal_growing_cache_steps(model):
    """The fixed-shape steps (write at a slot, attend over every slot with the validity mask) that
    generate(compile=True) compiles give the usual steps' logits, with padding and beam reordering."""
    prompt = _ids(2, 9, seed=8)
    prompt[1, 6:] = 0
    out = model.generate(prompt, max_new_tokens=6)
    torch.testing.assert_close(_replay(model, prompt, out, True), _replay(model, prompt, out, False),
                               atol=1e-5, rtol=1e-5)
    # beam search reorders the cache between steps (decoder-only prompts are left-padded, as generate does)
    from mu.generation import beam_search, left_pad
    if model.config.arch == "deconly":
        prompt, _ = left_pad(prompt, prompt != 0, 0)
    cache = model.new_cache(2, 64)
    with torch.no_grad():
        start = torch.ones(2, 1, dtype=torch.long) if model.config.arch == "encdec" else None
        logits = model.prefill(prompt, None, cache, start)
        cache.static = True
        beams_static = beam_search(model, logits, cache, num_beams=3, max_new_tokens=5, eos=None, pad=0)
    w = 1 if model.config.arch == "encdec" else prompt.shape[1]
    assert beams_static.tolist() == model.generate(prompt, max_new_tokens=5, num_beams=3)[:, w:].tolist()


def test_compile_refuses_weight_only_quantized_models(model):
    m4 = mu.build_model("tiny", arch=model.config.arch).eval().quantize_("int4")
    with pytest.raises(mu.MuError, match="float and int8"):
        m4.generate(_ids(1, 5), max_new_tokens=3, compile=True)


@pytest.mark.skipif(not q8._fbgemm_available(), reason="needs fbgemm")
def test_int8_op_for_compiled_graphs_equals_the_eager_kernel():
    """`mu::int8_linear` (what a compiled decode step calls) is fbgemm's GEMM over the same packed weights,
    and torch.compile traces it as one op (aot_eager: tracing only, no C++ compiler needed)."""
    import copy
    import gc

    torch.manual_seed(0)
    lin = q8.Int8Linear(torch.randn(48, 32), torch.randn(48))
    x = torch.randn(2, 1, 32)

    def op(layer):
        y = torch.ops.mu.int8_linear(x, layer._gemm.handle, 48)
        return y * layer.scale if layer._gemm.scale_outside else y

    with torch.no_grad():
        eager = lin(x)
        assert torch.equal(op(lin), eager)
        traced = torch.compile(lin, backend="aot_eager", fullgraph=True)(x)
    assert torch.equal(traced, eager)
    twin = copy.deepcopy(lin)
    handle = lin._gemm.handle
    del lin
    gc.collect()
    assert twin._gemm.handle in q8._PACKED  # a copy keeps packed weights it can reach (its own or shared)
    with torch.no_grad():
        assert torch.equal(op(twin), eager)
        assert torch.equal(twin(x), eager)
    if twin._gemm.handle != handle:
        assert handle not in q8._PACKED  # the original's own packing left with it
    del twin
    gc.collect()
    assert handle not in q8._PACKED


def test_fbgemm_int8_kernel_matches_float_and_does_not_saturate(monkeypatch):
    """The tensor-only fbgemm kernel (8-bit activation codes, 7-bit weight codes) against the float product,
    on random data and on the worst case for AVX2's int16 pair sums: every weight at its channel's maximum and
    activations at the top of their range. Its bias goes in divided by the per-channel scales."""
    if q8._linear_int8 is None or not q8._fbgemm_available():
        pytest.skip("needs fbgemm's tensor-only int8 op")
    monkeypatch.setattr(q8.native, "int8_available", lambda: False)
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 64)
    fast = q8.Int8Linear(lin.weight, lin.bias)
    assert fast.backend == "fbgemm"
    x = torch.randn(4, 3, 256)
    with torch.no_grad():
        assert _rel(fast(x), lin(x)) < 0.02
        assert _rel(fast(x[:1, :1]), lin(x[:1, :1])) < 0.02  # one row (decode)
        assert fast(x[:0]).shape == (0, 3, 64)
        worst = q8.Int8Linear(torch.full((16, 256), 0.5))
        xs = torch.rand(1, 256) * 0.1 + 0.9
        xs[0, 0] = -1.0  # activation codes: -1 -> 0, the rest near 255
        assert _rel(worst(xs), xs @ torch.full((256, 16), 0.5)) < 0.01
        assert _rel(worst(xs.double()).float(), xs @ torch.full((256, 16), 0.5)) < 0.01  # other dtypes: converted


def test_onednn_prefill_kernel_matches_fbgemm_and_does_not_saturate(monkeypatch):
    """A prefill-only int8 layer runs oneDNN's int8 matmul from `ONEDNN_MIN_ROWS` rows on: the same 7-bit weight
    codes and 8-bit activation codes as fbgemm's kernel, so nearly the same outputs, also on AVX2's worst case."""
    if q8._linear_int8 is None or not q8._fbgemm_available() or not q8._onednn_available():
        pytest.skip("needs fbgemm's tensor-only int8 op and oneDNN")
    monkeypatch.setattr(q8.native, "int8_available", lambda: False)  # oneDNN's kernel, not mu's own
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 64)
    both = q8.Int8Linear(lin.weight, lin.bias, prefill=True)
    assert both.backend.startswith("fbgemm + onednn") and q8.Int8Linear(lin.weight, lin.bias).backend == "fbgemm"
    x = torch.randn(4, 3, 256)
    with torch.no_grad():
        fbgemm = both(x)  # 12 rows: below ONEDNN_MIN_ROWS
        monkeypatch.setattr(q8, "ONEDNN_MIN_ROWS", 2)
        onednn = both(x)
        assert onednn.shape == (4, 3, 64) and _rel(onednn, fbgemm) < 2e-3 and _rel(onednn, lin(x)) < 0.02
        one = x[:1, :1]
        assert both(one).equal(both._gemm.raw(one) * both.scale)  # one row: fbgemm
        assert both(torch.zeros(3, 256)).allclose(lin.bias.expand(3, 64), atol=1e-6)  # zero range: a valid scale
        worst = q8.Int8Linear(torch.full((16, 256), 0.5), prefill=True)
        xs = torch.rand(2, 256) * 0.1 + 0.9
        xs[:, 0] = -1.0  # activation codes: -1 -> 0, the rest near 255
        assert _rel(worst(xs), xs @ torch.full((256, 16), 0.5)) < 0.01
        traced = torch.compile(both, backend="aot_eager", fullgraph=True)(x)  # one `mu::int8_linear`, no break
    assert torch.equal(traced, onednn)


def test_onednn_prefill_kernel_drops_the_zero_point(monkeypatch):
    """Every product runs without an activation zero point, its share taken off the bias: the same outputs as
    fbgemm's kernel (which keeps the zero point), also for inputs of one sign (zero point 0 or 255), for wide and
    odd widths, and the opaque op under torch.compile hands back the strides its fake gives."""
    if q8._linear_int8 is None or not q8._fbgemm_available() or not q8._onednn_available():
        pytest.skip("needs fbgemm's tensor-only int8 op and oneDNN")
    monkeypatch.setattr(q8.native, "int8_available", lambda: False)
    monkeypatch.setattr(q8, "ONEDNN_MIN_ROWS", 2)
    torch.manual_seed(0)
    for out in (2048, 1024, 3000):
        lin = torch.nn.Linear(64, out)
        both = q8.Int8Linear(lin.weight, lin.bias, prefill=True)
        for x in (torch.randn(2, 5, 64), torch.rand(2, 5, 64) + 0.5, -torch.rand(2, 5, 64) - 0.5):
            with torch.no_grad():
                y = both(x)
                fbgemm = (both._gemm.raw(x.reshape(10, 64)) * both.scale).view(2, 5, out)  # the same codes
            assert y.shape == (2, 5, out) and _rel(y, fbgemm) < 1e-5 and _rel(y, lin(x).detach()) < 0.02
        with torch.no_grad():
            traced = torch.compile(both, backend="aot_eager", fullgraph=True)(x)
        assert traced.is_contiguous() and torch.equal(traced, y)


def test_onednn_encoder_mlp_runs_the_gelu_inside_the_first_product(monkeypatch):
    """Where the encoder's MLP products run oneDNN's matmul, an int8 prefill applies the tanh-GELU as the first
    product's post-op (`_fused_mlp`): the outputs of the two products with the eager GELU between them, to rounding;
    fewer rows take the plain path; training declines."""
    if q8._linear_int8 is None or not q8._fbgemm_available() or not q8._onednn_available():
        pytest.skip("needs fbgemm's tensor-only int8 op and oneDNN")
    monkeypatch.setattr(q8.native, "int8_available", lambda: False)
    torch.manual_seed(0)
    model = mu.build_model("tiny", n_embd=64, hidden_dim=2048).eval()
    model.quantize_("int8")
    mlp = model.transformer.e[0].mlp
    assert mlp.fused_forward is q8._fused_mlp
    x = torch.randn(2, 9, 64)
    posts = []
    real = torch.ops.onednn.qlinear_pointwise
    monkeypatch.setattr(q8.torch.ops.onednn, "qlinear_pointwise", lambda *a: posts.append(a[-3]) or real(*a),
                        raising=False)
    with torch.inference_mode():
        unfused = mlp.fc2(layers.gelu_tanh(mlp.fc1(x)))  # 18 rows < ONEDNN_MIN_ROWS: fbgemm's products
        assert torch.equal(mlp(x), unfused) and posts == []
        monkeypatch.setattr(q8, "ONEDNN_MIN_ROWS", 2)
        unfused = mlp.fc2(layers.gelu_tanh(mlp.fc1(x)))
        posts.clear()
        fused = mlp(x)
        assert posts == ["gelu", "none"] and fused.shape == (2, 9, 64)
        assert _rel(fused, unfused) < 1e-5
        assert q8._fused_mlp(mlp.train(), x) is None


@pytest.mark.parametrize("kernel", ["onednn", "native"])
def test_int8_encoder_layers_get_the_prefill_kernel_and_agree_with_fbgemm(monkeypatch, kernel):
    """With fbgemm, `quantize_("int8")` gives the encoder's products and the cross-attention's k/v oneDNN's matmul for
    many rows (the same codes: encoding through it matches encoding through fbgemm alone), the decoder's per-token
    products not. With mu's own kernels (where they run) every int8 layer has those alone, GEMV and GEMM: their
    7-bit activation codes keep each block and the whole encoder about as close to the float model as fbgemm's."""
    if not (q8._fbgemm_available() and q8._linear_int8 is not None and q8._onednn_available()):
        pytest.skip("needs fbgemm's tensor-only int8 op and oneDNN")
    if kernel == "native" and not q8.native.int8_available():
        pytest.skip("mu's int8 kernels need an x86 CPU with AVX2 but no VNNI and a C compiler")
    torch.manual_seed(0)
    model = mu.build_model("tiny").eval()
    ids = _ids(2, 12)
    if kernel == "native":
        m8 = _quantized_copy(model)
        with monkeypatch.context() as m:
            m.setattr(q8.native, "int8_available", lambda: False)
            fb = _quantized_copy(model)
    else:
        monkeypatch.setattr(q8.native, "int8_available", lambda: False)
        m8 = fb = _quantized_copy(model)
    block, dec = m8.transformer.e[0], m8.transformer.h[0]
    with torch.no_grad():
        if kernel == "onednn":
            assert isinstance(block.mlp.fc1._many, q8._OnednnInt8) and block.attn.out_linear._many is not None
            assert block.attn.fused_linear("qkv")._many is not None
            assert dec.cross_attn.fused_linear("kv")._many is not None
            assert dec.mlp.fc1._many is None and dec.causal_attn.fused_linear("qkv")._many is None
        else:
            assert all(isinstance(m._gemm, q8._NativeInt8) and m._many is None
                       for m in m8.modules() if isinstance(m, q8.Int8Linear))
            assert m8.lm_head.backend.startswith("native")
        assert block.attn.q_linear._many is None  # the unfused projections run only with autograd (refused)
        fbgemm = fb.encode(ids)[0]
        x = m8.transformer.wte(ids)
        rope = layers.rope_cos_sin(m8.config, layers.encoder_positions(12), 12, x.dtype)
        by_fbgemm = [block(x, rope) for block in fb.transformer.e]
        monkeypatch.setattr(q8, "ONEDNN_MIN_ROWS", 1)
        monkeypatch.setattr(q8, "NATIVE_MIN_ROWS", 1)
        prefill = m8.encode(ids)[0]
        exact = model.encode(ids)[0]
        # block by block (the same input) oneDNN's kernel agrees with fbgemm's (the same codes); mu's is as close to
        # the float block as the coarser activation codes allow. Through the stack a rounding flip of one activation
        # code grows, so the whole encoder is held to the float model against fbgemm's encoding
        same_codes = kernel == "onednn"
        by_float = [block(x, rope) for block in model.transformer.e]
        for block, y, y_float in zip(m8.transformer.e, by_fbgemm, by_float):
            if same_codes:
                assert _rel(block(x, rope), y) < 2e-3
            else:
                assert _rel(block(x, rope), y_float) < 1.6 * _rel(y, y_float)
        assert _rel(prefill, exact) < (1.2 if same_codes else 1.6) * _rel(fbgemm, exact) and _rel(fbgemm, exact) < 0.05
        _assert_cached_decode_matches_forward(m8)


def test_single_query_attention_equals_sdpa():
    """The compiled decode step's attention (products and sums) against SDPA: grouped queries, with and without a
    key mask, one row's keys partly masked."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 2, 16), torch.randn(2, 3, 7, 16), torch.randn(2, 3, 7, 16)
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, 4:] = False
    for mask in (None, layers.key_padding_mask(valid)):
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        torch.testing.assert_close(layers.single_query_attention(q, k, v, mask), expected)
    # the masked keys do not count: row 1 equals attention over its first 4 keys alone
    torch.testing.assert_close(layers.single_query_attention(q, k, v, layers.key_padding_mask(valid))[1],
                               F.scaled_dot_product_attention(q[1:], k[1:, :, :4], v[1:, :, :4])[0])


def test_exported_decode_attention_keeps_sdpa():
    """torch.export (the ONNX exporter's tracer) also reports compiling; a one-position attention it traces stays
    SDPA, not the written-out form meant for inductor."""
    attn = mu.build_model("tiny").eval().decoder_blocks()[0].cross_attn

    class Step(torch.nn.Module):
        def forward(self, q, k, v):
            return attn.attend(q, k, v)

    q = torch.randn(1, 1, attn.n_head, attn.head_dim)
    k, v = torch.randn(1, attn.n_kv_head, 5, attn.head_dim), torch.randn(1, attn.n_kv_head, 5, attn.head_dim)
    with torch.no_grad():
        graph = torch.export.export(Step(), (q, k, v)).graph_module.code
    assert "scaled_dot_product_attention" in graph and "softmax" not in graph


@pytest.mark.skipif(not __import__("os").environ.get("MU_TEST_COMPILE"),
                    reason="torch.compile takes ~1 min per graph on a small CPU; set MU_TEST_COMPILE=1 to run")
def test_compiled_generation_equals_eager(model):
    prompt = _ids(2, 9, seed=9)
    prompt[0, 7:] = 0
    eager = model.generate(prompt, max_new_tokens=6)
    compiled = model.generate(prompt, max_new_tokens=6, compile=True)
    assert compiled.tolist() == eager.tolist()
    assert model.generate(prompt, max_new_tokens=6, compile=True, num_beams=2).shape == eager.shape


@pytest.mark.skipif(not __import__("os").environ.get("MU_TEST_COMPILE"),
                    reason="torch.compile takes ~1 min per graph on a small CPU; set MU_TEST_COMPILE=1 to run")
@pytest.mark.skipif(not q8._fbgemm_available(), reason="needs fbgemm")
def test_compiled_int8_generation_equals_eager_int8(model):
    m8 = _quantized_copy(model)
    prompt = _ids(2, 9, seed=9)
    prompt[0, 7:] = 0
    eager = m8.generate(prompt, max_new_tokens=6)
    assert m8.generate(prompt, max_new_tokens=6, compile=True).tolist() == eager.tolist()


def _compiled_step_logits(model, prompt, compiled: bool):
    """The logits of the first fixed-shape step after a prefill, as `generate(compile=...)` makes it."""
    from mu.generation import prepare

    run = prepare(model, prompt, 3, compile=True)
    with torch.inference_mode():
        logits = model.prefill(run.input_ids, run.attention_mask, run.cache, run.start)
        run.cache.static, run.cache.compiled = True, compiled
        return model.decode_step(logits.argmax(-1, keepdim=True), run.cache)


def test_compiled_step_multiplies_by_the_fused_projections(model, monkeypatch):
    """A compiled decode step runs the self-attention's q/k/v as one product over the concatenation the eager
    prefill made or refreshed (not three), and follows in-place weight updates between generations. Dynamo only
    (its graph runs as traced), so no C++ compile."""
    counts = []
    compile_ = torch.compile

    def record(gm, example_inputs):
        # the products: split_linear's batched ones, or mu's native GEMV where the CPU has AVX-512
        counts.append(sum(n.target in (torch.baddbmm, torch.ops.mu.gemv.default) for n in gm.graph.nodes))
        return gm.forward

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, backend=record, dynamic=False))
    torch._dynamo.reset()
    try:
        prompt = _ids(1, 7, seed=3)
        torch.testing.assert_close(_compiled_step_logits(model, prompt, True),
                                   _compiled_step_logits(model, prompt, False), atol=1e-5, rtol=1e-5)
        blocks = model.decoder_blocks()
        per_block = 6 if model.config.arch == "encdec" else 4  # q/k/v, out, [cross q, cross out,] fc1, fc2
        assert counts == [per_block * len(blocks) + 1]  # and the lm_head
        before = _compiled_step_logits(model, prompt, False)
        with torch.no_grad():
            for block in blocks:
                attn = block.causal_attn if model.config.arch == "encdec" else block.attn
                attn.v_linear.weight.mul_(-2.0)
        after = _compiled_step_logits(model, prompt, True)
        torch.testing.assert_close(after, _compiled_step_logits(model, prompt, False), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(after, before, atol=1e-3)
    finally:
        torch._dynamo.reset()


def test_split_linear_equals_linear_and_falls_back():
    from mu.model.fast import split_linear

    torch.manual_seed(0)
    weight, bias = torch.randn(96, 40), torch.randn(96)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            for shape in ((1, 1, 40), (3, 1, 40), (5, 40), (2, 12, 40)):  # the last is too many rows: plain linear
                x = torch.randn(shape)
                torch.testing.assert_close(split_linear(x, weight, bias), F.linear(x, weight, bias))
                torch.testing.assert_close(split_linear(x, weight, None), F.linear(x, weight))
            odd = torch.randn(7, 40)  # 7 output rows cannot be split: plain linear
            assert split_linear(torch.randn(1, 40), odd, None).shape == (1, 7)
        x = torch.randn(1, 1, 40, requires_grad=True)  # autograd on: the training path, gradients flow
        split_linear(x, weight, bias).sum().backward()
        assert x.grad is not None
    finally:
        torch.set_num_threads(threads)


def test_compiled_graphs_keep_the_split_product_and_export_does_not():
    """Inside torch.compile a few-row fp32 product is the batched product over row blocks of the weight (one
    `baddbmm`, which inductor calls as MKL's on both cores; its own 1-row product, what `F.linear` becomes, runs on
    one), or mu's native GEMV (`mu::gemv`) where the CPU has AVX-512, in one graph (no break); torch.export (the
    ONNX exporter's tracer) sees a plain linear."""
    from mu.model import native
    from mu.model.fast import SplitLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(40, 96)
    lin.__class__ = SplitLinear
    graphs = []

    def record(gm, example_inputs):
        graphs.append([n.target for n in gm.graph.nodes if n.op == "call_function"])
        return gm.forward

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            x = torch.randn(1, 1, 40)
            torch._dynamo.reset()
            out = torch.compile(lin, backend=record, fullgraph=True)(x)
            torch.testing.assert_close(out, F.linear(x, lin.weight, lin.bias))
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()
    product = torch.ops.mu.gemv.default if native.gemv_available(torch.float32) else torch.baddbmm
    assert len(graphs) == 1 and product in graphs[0] and F.linear not in graphs[0]
    with torch.no_grad():  # as the ONNX export traces
        exported = torch.export.export(lin, (torch.randn(1, 1, 40),))
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.baddbmm.default not in targets and torch.ops.aten.linear.default in targets


@pytest.mark.parametrize("mode,tol", [("int8wo", 0.08), ("int4", 0.3)])
def test_weight_only_modes_close_to_float_and_cached_close_to_uncached(model, mode, tol):
    """Weight-only int8 and group-wise int4: decode kernel for few rows, dynamic int8 for the prefill."""
    m = mu.build_model("tiny", arch=model.config.arch)
    m.load_state_dict(model.state_dict())
    mq = m.eval().quantize_(mode)
    assert mq.quantization == mode and not any(isinstance(x, torch.nn.Linear) for x in mq.modules())
    enc, dec = _padded_inputs()
    with torch.no_grad():
        ref, got = _logits(model, enc, dec), _logits(mq, enc, dec)
    valid = torch.cat([enc, dec], 1) != 0 if model.config.arch == "deconly" else dec != 0
    assert _rel(got[valid], ref[valid]) < tol
    _assert_cached_decode_matches_forward(mq)  # decode (weight-only kernel) vs prefill (dynamic int8) path


def test_weight_only_kernels_equal_their_dequantized_weights():
    """The decode kernels compute x @ dequant(W)^T (bf16 activations); the prefill path agrees to int8 rounding."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 48)
    with torch.no_grad():
        x = torch.randn(1, 1, 128)
        q, scale = q8._per_channel_int8(lin.weight)
        w8 = q.float() * scale[:, None]
        m8 = q8.Int8WeightOnlyLinear(lin.weight, lin.bias)
        assert _rel(m8(x), F.linear(x, w8, lin.bias)) < 0.01
        assert _rel(m8(x.expand(1, 12, 128)), F.linear(x.expand(1, 12, 128), w8, lin.bias)) < 0.03
        m4 = q8.Int4Linear(lin.weight, lin.bias, group_size=64)
        codes, s, z = q8._int4_groups(lin.weight, 64)
        w4 = ((codes.view(48, 2, 64) - 8) * s[..., None] + z[..., None]).view(48, 128)
        assert m4.group_size == 64 and _rel(w4, lin.weight) < 0.15
        assert _rel(m4(x), F.linear(x, w4, lin.bias)) < 0.01
        assert _rel(m4(x.expand(1, 12, 128)), F.linear(x.expand(1, 12, 128), w4, lin.bias)) < 0.03
        assert m4(x).dtype == torch.float32 and m4(x).shape == (1, 1, 48)
    with pytest.raises(mu.MuError, match="multiple of 32"):
        q8.Int4Linear(torch.randn(16, 40))


def test_auto_format_and_split_format():
    assert q8.split_format("int4") == ("fp32", "int4")
    assert q8.split_format("bf16") == ("bf16", None)
    assert q8.split_format(None) == (None, None)
    auto = q8.auto_format("cpu")
    assert auto == ("int8" if q8._fbgemm_available() else "fp32")
    assert q8.split_format("auto", "cpu") == q8.split_format(auto)
    with pytest.raises(mu.MuError, match="unknown dtype 'int3'"):
        q8.check_format("int3")


def test_load_model_quantizes_on_request_and_auto_picks_this_machines_format(tmp_path):
    torch.manual_seed(0)
    mu.build_model("tiny").save_pretrained(tmp_path / "m")
    m4 = mu.load_model(tmp_path / "m", dtype="int4")
    assert m4.quantization == "int4" and isinstance(m4.lm_head, q8.Int4Linear)
    auto = mu.load_model(tmp_path / "m", dtype="auto")
    picked = q8.auto_format("cpu")
    assert (auto.quantization or "fp32") == picked
    assert auto.generate(_ids(1, 5), max_new_tokens=3).shape == (1, 4)
    with pytest.raises(mu.MuError, match="unknown dtype"):
        mu.load_model(tmp_path / "m", dtype="int3")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu_check.sh runs these)")
def test_cuda_generation_matches_cpu_and_bf16_runs():
    torch.manual_seed(0)
    cpu = mu.build_model("tiny").eval()
    gpu = mu.build_model("tiny").eval()
    gpu.load_state_dict(cpu.state_dict())
    gpu.to("cuda")
    prompt = _ids(2, 9, seed=5)
    assert gpu.generate(prompt.cuda(), max_new_tokens=6).cpu().tolist() == cpu.generate(prompt, max_new_tokens=6).tolist()
    assert gpu.to(torch.bfloat16).generate(prompt.cuda(), max_new_tokens=6).shape == (2, 7)
    assert q8.auto_format("cuda") in ("bf16", "fp32")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu_check.sh runs these)")
def test_cuda_bench_runs_bf16():
    from mu.bench import BenchConfig, run_benchmark

    r = run_benchmark(BenchConfig(preset="tiny", input_lengths=(16,), new_tokens=3, batch_sizes=(1, 4), dtypes=("bf16",),
                                  device="cuda", repeats=1, warmup=1, memory=False, flop_check=False, out=None,
                                  plots=False, progress=False))
    assert all(row["decode_tok_s"] > 0 for row in r["rows"])


def test_inference_rmsnorm_of_many_rows_equals_the_fused_kernel():
    """Without autograd, a prefill-sized input (>= 65536 values) is normalized through `vector_norm`; the same
    numbers as F.rms_norm (and as the autograd path) to fp32 rounding, the input untouched."""
    norm = layers.RMSNorm(256)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 300, 256) * 3
    before = x.clone()
    with torch.no_grad():
        fast = norm(x)
        small = norm(x[:, :5])  # below the size: F.rms_norm
    torch.testing.assert_close(fast, F.rms_norm(x, (256,), norm.weight, 1e-6), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(fast, norm(x).detach(), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(small, fast[:, :5], atol=2e-6, rtol=1e-5)
    assert torch.equal(x, before)


def test_folded_grouped_query_attention_equals_the_expanded_one():
    """A non-causal multi-query attention without autograd folds each KV head's queries into one query axis;
    with and without a key-padding mask it gives what SDPA's grouped-query expansion gives."""
    torch.manual_seed(0)
    attn = layers.Attention(mu.MuConfig(**{**mu.config.PRESETS["tiny"], "dropout": 0.0})).eval()
    assert attn.groups > 1
    q = torch.randn(2, 7, attn.n_head, attn.head_dim)
    k, v = (torch.randn(2, attn.n_kv_head, 9, attn.head_dim) for _ in range(2))
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, 6:] = False
    heads = [h % attn.n_kv_head for h in range(attn.n_head)]  # the tiled mapping (`is_interleaved=False`)
    for mask in (None, layers.key_padding_mask(valid)):
        with torch.no_grad():
            folded = attn.attend(q, k, v, mask)
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k[:, heads], v[:, heads], attn_mask=mask)
            expanded = attn.out_linear(o.transpose(1, 2).reshape(2, 7, -1))
        torch.testing.assert_close(folded, expanded, atol=1e-5, rtol=1e-5)


def test_inference_gelu_equals_tanh_gelu_and_training_uses_f_gelu():
    """The no-autograd GELU (x * sigmoid(2z)) is the paper's tanh-GELU; with autograd it is F.gelu itself."""
    x = torch.randn(3, 5, 4096) * 4
    expected, before = layers.gelu_tanh_reference(x), x.clone()
    with torch.no_grad():
        fast = layers.gelu_tanh(x)
    torch.testing.assert_close(fast, expected, atol=2e-6, rtol=1e-5)
    assert torch.equal(x, before)  # the input is not modified
    xg = x.clone().requires_grad_()
    y = layers.gelu_tanh(xg)
    assert y.grad_fn is not None and "Gelu" in type(y.grad_fn).__name__
    with torch.no_grad():
        xb = x.bfloat16()
        torch.testing.assert_close(layers.gelu_tanh(xb), torch.nn.functional.gelu(xb, approximate="tanh"), atol=0, rtol=0)


def _advised_for_huge_pages(address: int) -> bool:
    """Whether the mapping holding `address` is advised for transparent huge pages (`hg` in /proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return "hg" in line.split()
    return False


def test_huge_pages_move_the_weights_not_the_parameters(monkeypatch, tmp_path):
    """`huge_pages_` (which `generate` on a CPU does) moves the parameters' data onto memory advised for huge pages:
    the same Parameter objects and values, the tied head still tied, moved once; the model then still trains,
    saves and loads. Where huge pages cannot be asked for, nothing moves."""
    from mu.model import fast
    from mu.utils import huge_page_bytes

    monkeypatch.setattr(fast, "HUGE_PAGES_MIN_BYTES", 0)
    torch.manual_seed(0)
    model = mu.build_model("tiny")
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    if huge_page_bytes(1) is None:
        pytest.skip("this system gives no transparent huge pages")
    model.generate(_ids(1, 5), max_new_tokens=2)
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert all(_advised_for_huge_pages(p.data_ptr()) for p in params)
    where = [p.data_ptr() for p in params]
    fast.huge_pages_(model)
    assert [p.data_ptr() for p in params] == where  # once
    other = copy.deepcopy(model).to(torch.bfloat16)  # (its record of where the tensors lie is the original's)
    fast.huge_pages_(other)
    assert all(_advised_for_huge_pages(p.data_ptr()) for p in other.parameters())  # new tensors: moved as well
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    enc, dec = _padded_inputs()
    model.train()
    model(encoder_input_ids=enc, decoder_input_ids=dec, targets=dec).loss.backward()
    optimizer.step()
    assert not torch.equal(params[1], before[1])
    model.save_pretrained(tmp_path / "m")
    loaded = mu.load_model(tmp_path / "m")
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), model.parameters()))
    monkeypatch.setattr(fast, "huge_page_bytes", lambda nbytes: None)
    other = mu.build_model("tiny")
    where = [p.data_ptr() for p in other.parameters()]
    fast.huge_pages_(other)
    assert [p.data_ptr() for p in other.parameters()] == where
