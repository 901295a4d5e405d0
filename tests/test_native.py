"""mu's native kernels (`mu.model.native`): the int8 GEMM's and GEMV's exact integer products, activation codes, the
fused GELU, the MLP that uses them; the float GEMVs and the decode that uses them; the decoder step as one call; the
fallback when they cannot be built."""

import copy
import warnings

import pytest
import torch

import mu
from mu.model import layers, native
from mu.model.cache import KVCache
from mu.model import quantize as q8



def _avx2_build(monkeypatch):
    """Make the library the one an AVX2 CPU builds and chooses (`native.AVX2_ENV`), on any x86 CPU with AVX2 and FMA;
    skip where there is none (or no compiler)."""
    if not {"avx2", "fma"} <= mu.utils.cpu_flags():
        pytest.skip("mu's AVX2 kernels need an x86 CPU with AVX2 and FMA")
    monkeypatch.setenv(native.AVX2_ENV, "1")
    native.library.cache_clear()
    if not native.int8_available():
        pytest.skip("mu's native kernels need a C compiler")


@pytest.fixture
def avx2(monkeypatch):
    """mu's int8 kernels of AVX2 CPUs without VNNI (`native.int8_available()`), here whatever the CPU's extensions."""
    _avx2_build(monkeypatch)
    yield
    native.library.cache_clear()


@pytest.fixture(params=["this CPU", "AVX2"])
def build(request, monkeypatch):
    """The native library as this CPU builds it, then as an AVX2 CPU's (`avx2`): each step test runs on both."""
    if request.param == "AVX2":
        _avx2_build(monkeypatch)
    yield request.param
    native.library.cache_clear()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _rows_used(mlp, x):
    """Rows the native GEMM multiplied in `mlp(x)` (the two products' calls counted)."""
    calls = []
    gemm = native.gemm
    native.gemm = lambda codes, sx, *a, **k: calls.append(sx.numel()) or gemm(codes, sx, *a, **k)
    try:
        mlp(x)
    finally:
        native.gemm = gemm
    return sum(calls) // 2


def test_gemm_is_the_integer_product_then_scale_offset_and_gelu(avx2):
    """Odd shapes (rows, inner dimension and outputs not multiples of the kernel's tiles, so padding is exercised),
    and the worst case for the int16 sums: every code at its maximum (127 x 63, four products per int16). Each row
    has its own activation scale and zero point; the GELU's range comes back per row."""
    torch.manual_seed(0)
    for rows, k, n, worst in ((5, 20, 37, False), (67, 136, 48, False), (3, 64, 16, True)):
        a = (torch.full((rows, k), 127, dtype=torch.uint8) if worst
             else torch.randint(0, 128, (rows, k), dtype=torch.uint8))
        w = torch.full((n, k), 63, dtype=torch.int8) if worst else torch.randint(-63, 64, (n, k), dtype=torch.int8)
        n_pad = -(-n // native.N_MULTIPLE) * native.N_MULTIPLE
        scale, bias = torch.nn.functional.pad(torch.rand(n) * 1e-3, (0, n_pad - n)), torch.randn(n_pad)
        sums = torch.nn.functional.pad(w.sum(1, dtype=torch.int32) * scale[:n], (0, n_pad - n))
        sx, zx = torch.rand(rows) * 0.1, torch.randint(0, 128, (rows,)).float()
        codes = torch.zeros(-(-rows // 2) * 2, -(-k // 8) * 8, dtype=torch.uint8)
        codes[:rows, :k] = a
        exact = ((a.double() - zx.double()[:, None]) @ w.double().t()) * sx.double()[:, None] * scale[:n].double() \
            + bias[:n].double()
        packed = native.pack_weights(w)
        y, no_ranges = native.gemm(codes, sx, zx, packed, scale, bias, sums)
        assert y.shape == (rows, n_pad) and no_ranges is None
        torch.testing.assert_close(y[:, :n].double(), exact, rtol=1e-5, atol=1e-4)
        g, ranges = native.gemm(codes, sx, zx, packed, scale, bias, sums, gelu=True)
        torch.testing.assert_close(g[:, :n], layers.gelu_tanh(exact.float()), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(ranges[:, 0], g.amin(1).clamp(max=0))
        torch.testing.assert_close(ranges[:, 1], g.amax(1).clamp(min=0))


def test_gemv_is_the_integer_product_of_each_rows_own_8bit_codes(monkeypatch, avx2):
    """A few rows (decode): each row gets its own 8-bit codes (scale and zero point over min(x, 0)..max(x, 0)), so
    a row equals the dequantized integer product exactly (to fp32 rounding) whatever the other rows hold; more rows
    than one pass takes (`GEMV_ROWS`), odd shapes, and AVX2's worst case (codes 255 x weights 63). One row gives
    fbgemm's numbers (the same codes)."""
    torch.manual_seed(0)
    for rows, k, n, worst in ((1, 20, 37, False), (13, 136, 48, False), (3, 64, 16, True)):
        x = torch.full((rows, k), 1.0) if worst else torch.randn(rows, k) * torch.rand(rows, 1) * 10
        if worst:
            x[:, 0] = -0.001  # zero point 0, every other code 255
        q = torch.full((n, k), 63, dtype=torch.int8) if worst else torch.randint(-63, 64, (n, k), dtype=torch.int8)
        n_pad = -(-n // native.N_MULTIPLE) * native.N_MULTIPLE
        scale, bias = torch.rand(n_pad) * 1e-2, torch.randn(n_pad)
        sums = torch.nn.functional.pad(q.sum(1, dtype=torch.int32) * scale[:n], (0, n_pad - n))
        y = native.gemv(x, native.layer(native.pack_weights(q), k, scale, bias, sums))
        lo, hi = x.clamp(max=0).amin(1, keepdim=True).double(), x.clamp(min=0).amax(1, keepdim=True).double()
        s = ((hi - lo) / 255).float().double()
        z = torch.round(-lo / s).clamp(0, 255)
        codes = (torch.round(x.double() * (1 / s).float().double()) + z).clamp(0, 255)
        exact = ((codes - z) @ q.double().t()) * s * scale[:n].double() + bias[:n].double()
        assert y.shape == (rows, n_pad)
        torch.testing.assert_close(y[:, :n].double(), exact, rtol=1e-5, atol=1e-4)
    if q8._fbgemm_available() and q8._linear_int8 is not None:
        w, b, x = torch.randn(40, 24), torch.randn(40), torch.randn(1, 24)
        ours = q8.Int8Linear(w, b)
        monkeypatch.setattr(native, "int8_available", lambda: False)
        theirs = q8.Int8Linear(w, b)
        assert ours.backend.startswith("native") and theirs.backend == "fbgemm"
        with torch.no_grad():
            torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_activation_codes_round_each_row_to_seven_bits_and_pad_with_zeros(avx2):
    torch.manual_seed(0)
    x = torch.randn(7, 50) * torch.arange(1, 8).float()[:, None] + 1  # rows of different ranges
    x[3] = 0.0
    codes, sx, zx = native.activation_codes(x)
    assert codes.shape == (8, 56) and codes[:7].max() <= native.ACTIVATION_MAX and (codes[:7, 50:] == 0).all()
    lo, hi = x.amin(1).clamp(max=0), x.amax(1).clamp(min=0)
    live = torch.arange(7) != 3
    torch.testing.assert_close(sx[live], ((hi - lo) / 127)[live])
    assert torch.equal(zx[live], torch.round(-lo / sx)[live]) and (sx[3], zx[3]) == (1.0, 0.0)  # all zeros: valid
    assert ((codes[:7, :50].float() - zx[:, None]) * sx[:, None] - x).abs().le(sx[:, None] / 2 + 1e-6).all()
    strided = torch.randn(7, 64)[:, :50]  # a view of a wider buffer (the GELU's padded output)
    assert native.activation_codes(strided)[0][:7].equal(native.activation_codes(strided.contiguous())[0][:7])
    known = native.activation_codes(x, torch.stack([lo, hi], 1))  # known ranges skip the pass, same codes
    assert known[0][:7].equal(codes[:7]) and known[1].equal(sx) and known[2].equal(zx)


def test_encoder_mlp_runs_the_gelu_inside_the_first_product(monkeypatch, avx2):
    """`quantize_("int8")` gives every int8 MLP `_fused_mlp`: from `NATIVE_MIN_ROWS` rows the same outputs as its two
    products with the eager GELU between them (to a flipped activation code), as close to the float MLP as that
    composition; below (a decode) the plain path through the GEMV; a compiled layer calls the native product through
    `mu::int8_linear`."""
    torch.manual_seed(0)
    model = mu.build_model("tiny").eval()
    m8 = mu.build_model("tiny").eval()
    m8.load_state_dict(model.state_dict())
    m8.quantize_("int8")
    mlp, mlp_float = m8.transformer.e[0].mlp, model.transformer.e[0].mlp
    assert mlp.fused_forward is q8._fused_mlp and m8.transformer.h[0].mlp.fused_forward is q8._fused_mlp
    assert isinstance(mlp.fc1._gemm, q8._NativeInt8) and mlp.fc1.backend.startswith("native")
    x = torch.randn(3, 7, model.config.n_embd)
    with torch.inference_mode():  # fewer rows than NATIVE_MIN_ROWS: the GEMV's products and the eager GELU
        assert _rows_used(mlp, x) == 0 and torch.equal(mlp(x), mlp.fc2(layers.gelu_tanh(mlp.fc1(x))))
    monkeypatch.setattr(q8, "NATIVE_MIN_ROWS", 1)
    with torch.inference_mode():
        assert _rows_used(mlp, x) == 21
        assert q8._fused_mlp(mlp.train(), x) is None  # training mode: the plain path (it applies dropout)
        mlp.eval()
        fused = mlp(x)
        unfused = mlp.fc2(layers.gelu_tanh(mlp.fc1(x)))
        exact = mlp_float(x)
        assert fused.shape == x.shape and _rel(fused, unfused) < 2e-3
        assert _rel(fused, exact) < 1.2 * _rel(unfused, exact) < 0.05
        compiled = torch.compile(mlp.fc1, backend="aot_eager", fullgraph=True)(x)
    assert torch.equal(compiled, mlp.fc1(x))
    with torch.enable_grad():  # training refuses a quantized model; the fused path must not hide that
        with pytest.raises(mu.MuError, match="quantized"):
            mlp(x.requires_grad_())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_gemv_is_the_fp32_sum(dtype):
    """Odd shapes (inner dimension not a multiple of the vector or of four of them, outputs not a multiple of 16: the
    masked tails), one to eight rows, with and without a bias: fp32 equals an fp32 product of the same values to
    rounding; bf16 is the fp32 sum of the exact products rounded once, within one bf16 step of the rounded product."""
    if not native.gemv_available(dtype):
        pytest.skip(f"mu's {dtype} GEMV needs an x86 CPU with AVX-512 (bf16: AVX-512-BF16) and a C compiler")
    torch.manual_seed(0)
    for rows, k, n, bias in ((1, 70, 37, True), (3, 1024, 64, False), (8, 33, 1000, True), (2, 300, 16, True)):
        x, w = torch.randn(rows, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
        b = torch.randn(n, dtype=dtype) if bias else None
        ref = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
        got = native.gemv_float(x, w, b)
        assert got.dtype == dtype and got.shape == (rows, n)
        if dtype == torch.float32:
            assert torch.allclose(got, ref, rtol=1e-5, atol=1e-4)
            continue
        step = 2.0 ** (torch.floor(torch.log2(ref.abs().clamp_min(1e-30))) - 7)  # one bf16 step at each value
        assert ((got.float() - ref).abs() <= step).all()
        assert (got == ref.bfloat16()).float().mean() > 0.98  # rounded once: nearly always the nearest value


def test_u8_codes_are_pytorchs_quantized_codes(monkeypatch):
    """The prefill's per-tensor activation codes for oneDNN's int8 matmul: the native pass gives the scale, zero point
    and every code PyTorch's aminmax + quantize_per_tensor give (the same rounding, ties included), over lengths with
    vector tails, ranges of all signs, all zeros and a non-finite value; the model's `_u8_codes` takes it."""
    if not native.u8_codes_available():
        pytest.skip("mu's u8 codes need an x86 CPU with AVX-512 and a C compiler")
    torch.manual_seed(0)
    cases = [torch.randn(n) * s + o for n in (1, 15, 17, 1000, 3 * 4096 + 5) for s, o in ((1, 0), (1e-3, 2), (50, -3))]
    cases += [torch.rand(333), -torch.rand(333), torch.zeros(40), torch.tensor([1.0, float("inf"), -2.0])]
    cases += [torch.randn(64, 96)[:, :80]]  # not contiguous
    ties = torch.arange(-255, 256, dtype=torch.float32) / 2  # x / scale lands on .5 for half of them
    cases.append(ties * ((ties.max() - ties.min()) / 255))
    monkeypatch.setattr(native, "u8_codes_available", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (quantize_per_tensor's deprecation)
        want = [q8._u8_codes(x) for x in cases]
    monkeypatch.undo()
    for x, (codes, scale, zero) in zip(cases, want):
        got, got_scale, got_zero = q8._u8_codes(x)
        assert (got_scale, got_zero) == (scale, zero)
        assert got.dtype == torch.uint8 and got.shape == x.shape and torch.equal(got, codes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_float_decode_runs_the_native_gemv_eagerly_and_compiled(monkeypatch, dtype):
    """Every few-row product of a decode step (fused q/k/v, out, MLP, lm_head) goes through the GEMV: in eager mode
    directly (inside the native decoder step, where that runs, lm_head included), in a compiled step as the
    `mu::gemv` op; the tokens equal those of PyTorch's kernels (so all are the same function to rounding) on a tiny
    model."""
    if not native.gemv_available(dtype):
        pytest.skip(f"mu's {dtype} GEMV needs an x86 CPU with AVX-512 (bf16: AVX-512-BF16) and a C compiler")
    torch.manual_seed(0)
    model = mu.MuEncoderDecoder(mu.MuConfig.from_name("tiny")).eval().to(dtype)
    ids = torch.randint(3, model.config.vocab_size, (1, 12))
    calls = []
    gemv = native.gemv_float
    monkeypatch.setattr(native, "gemv_float", lambda x, w, b=None: calls.append(tuple(w.shape)) or gemv(x, w, b))
    lm_head = tuple(model.lm_head.weight.shape)
    with torch.inference_mode():
        fast = model.generate(ids, max_new_tokens=6)
        assert not calls  # (every product ran in the native decoder step)
        calls.clear()
        compiled = model.generate(ids, max_new_tokens=6, compile=True)
        assert calls.count(lm_head) == 5  # the op's in five compiled steps (the eager first step: the native one)
        monkeypatch.setattr(native, "decoder_step_available", lambda dtype: False)
        calls.clear()
        modules = model.generate(ids, max_new_tokens=6)
        assert calls.count(lm_head) == 6 and len(calls) > 6 * len(model.decoder_blocks())
        monkeypatch.setattr(native, "gemv_available", lambda dtype: False)
        calls.clear()
        plain = model.generate(ids, max_new_tokens=6)
    assert not calls and torch.equal(fast, plain) and torch.equal(compiled, plain) and torch.equal(modules, plain)


def _needs_native_step(what) -> None:
    """Skip the test unless mu's native decoder step runs `what` (a float dtype, or "int8") on this machine."""
    if not native.decoder_step_available(what):
        pytest.skip(f"mu's decoder step for {what} needs an x86 CPU with AVX-512 or AVX2 (bf16: AVX-512-BF16; int8 "
                    "on AVX-512: VNNI) and a C compiler")


def _step_model(dtype, interleaved=False):
    """A small encoder-decoder with every weight non-trivial (random norms and biases), widths that are not
    multiples of the kernels' 16 (heads of 16, an MLP of 200)."""
    config = mu.MuConfig(n_encoder_layer=2, n_decoder_layer=2, n_embd=96, qkv_embd=64, hidden_dim=200, n_head=4,
                         n_kv_head=2, vocab_size=300, is_interleaved=interleaved, dropout=0.0)
    model = mu.MuEncoderDecoder(config).eval()
    model.init_weights("fan_in")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.to(dtype)


def _decode(model, ids, attention_mask=None, steps=12, static=False, tokens=None):
    """Logits of the start step and `steps` steps, (steps + 1, B, vocab) in fp32: greedy, or fed `tokens` (steps,
    B) (so that two models see the same inputs)."""
    with torch.inference_mode():
        cache = model.new_cache(ids.shape[0], 40)
        cache.static = static
        logits = [model.prefill(ids, attention_mask, cache, torch.ones(ids.shape[0], 1, dtype=torch.long))]
        for i in range(steps):
            token = logits[-1].argmax(-1) if tokens is None else tokens[i]
            logits.append(model.decode_step(token[:, None], cache))
    return torch.stack(logits).float()


def _counted(monkeypatch, name: str, record=lambda *a: 1) -> list:
    """A list that gets `record(*args)` at each call of `native.<name>` from now on (the function still runs)."""
    calls, run = [], getattr(native, name)
    monkeypatch.setattr(native, name, lambda *a: calls.append(record(*a)) or run(*a))
    return calls


def _module_path(model):
    """The model with its native decode step switched off (the PyTorch modules run)."""
    model.fused_decode = None
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
def test_native_decoder_step_is_the_block(monkeypatch, build, dtype, interleaved):
    """One call per step, for both GQA head orders, with and without padded encoder positions (or only padding: all
    attended), growing and fixed-shape caches, fed the same tokens: fp32 equals the modules' logits to rounding; bf16
    (rounded where PyTorch's ops round) stays within a few bf16 steps of them; both pick the same tokens (bf16: nearly
    always)."""
    _needs_native_step(dtype)
    torch.manual_seed(0)
    model = _step_model(dtype, interleaved)
    ids = torch.randint(3, 300, (1, 37))
    padded = torch.ones_like(ids)
    padded[0, :20] = 0  # (a thread's whole share of the keys, with two threads)
    calls = _counted(monkeypatch, "decoder_step")
    for mask, static in ((None, False), (padded, False), (padded, True), (torch.zeros_like(ids), False)):
        want = _decode(_module_path(copy.deepcopy(model)), ids, mask, static=static)
        calls.clear()
        got = _decode(model, ids, mask, static=static, tokens=want.argmax(-1)[:-1].long())
        assert len(calls) == 13
        tol = 1e-5 if dtype == torch.float32 else 0.1
        assert torch.allclose(got, want, rtol=tol, atol=tol), (got - want).abs().max()
        same = (got.argmax(-1) == want.argmax(-1)).float().mean()
        assert same == 1 if dtype == torch.float32 else same >= 0.9  # (bf16: a near tie of a random model may flip)


def test_native_decoder_step_keeps_the_cache_as_the_modules_do(monkeypatch):
    """The step's bookkeeping runs in the call too: a pad token fed mid-sequence is masked as a key from then on, the
    position and length advance, the valid slots are the modules'; a token id outside the embedding is an
    IndexError that leaves the cache as it was; past `block_size` with NTK-scaled RoPE (its base depends on the
    length) the modules run."""
    _needs_native_step(torch.float32)
    torch.manual_seed(0)
    model = _step_model(torch.float32)
    calls = _counted(monkeypatch, "decoder_step")
    ids = torch.randint(3, 300, (1, 15))
    tokens = torch.randint(3, 300, (12, 1))
    tokens[4] = tokens[9] = model.config.pad_token_id

    def run(m):
        with torch.inference_mode():
            cache = m.new_cache(1, 40)
            logits = [m.prefill(ids, None, cache, torch.ones(1, 1, dtype=torch.long))]
            logits += [m.decode_step(t[:, None], cache) for t in tokens]
        return torch.stack(logits), cache

    want, modules = run(_module_path(copy.deepcopy(model)))
    calls.clear()
    got, cache = run(model)
    assert len(calls) == 13 and torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert torch.equal(cache.valid, modules.valid) and not cache.all_valid and not bool(cache.valid[0, 5])
    assert torch.equal(cache.positions, modules.positions) and cache.length == modules.length == 13
    with torch.inference_mode(), pytest.raises(IndexError, match="token id 300 is outside the embedding's 300 rows"):
        model.decode_step(torch.tensor([[300]]), cache)
    assert cache.length == 13 and int(cache.positions[0]) == 13 and not bool(cache.valid[0, 13])
    scaled = _step_model(torch.float32)
    scaled.config.rope_factor, scaled.config.block_size = 2.0, 6
    scaled.load_state_dict(model.state_dict())
    calls.clear()
    got, _ = run(scaled)
    assert len(calls) == 6  # the steps up to block_size positions (the start token's and 5 more), not past it
    assert torch.allclose(got, run(_module_path(copy.deepcopy(scaled)))[0], atol=1e-5)


@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_native_step_reads_cross_kv_set_again_in_place(monkeypatch, kind):
    """A cache whose cross-attention K/V are written over in place and set again (as `SlotCache` does when a row
    joins), here another prompt's, of another width: the next native step reads the new ones (an int8 model: new bf16
    copies), its logits the modules' with the same cache (int8: to the copies' rounding), not those of the first
    prompt's K/V."""
    _needs_native_step(torch.float32 if kind == "fp32" else "int8")
    torch.manual_seed(0)
    model = _step_model(torch.float32)
    if kind == "int8":
        model.quantize_("int8")
    calls = _counted(monkeypatch, "decoder_step")
    first, second = torch.randint(3, 300, (1, 20)), torch.randint(3, 300, (1, 20))
    second[0, 12:] = model.config.pad_token_id  # (its encoder output covers 12 positions: a mask now)
    token = torch.tensor([[7]])

    def run(m, swap=True):
        with torch.inference_mode():
            cache = m.new_cache(1, 8)
            m.prefill(first, None, cache, torch.ones(1, 1, dtype=torch.long))
            m.decode_step(token, cache)
            if swap:
                enc, valid = m.encode(second)
                for block, (k, v) in zip(m.decoder_blocks(), cache.cross_kv):
                    new_k, new_v = block.cross_kv(enc)
                    k.copy_(new_k)
                    v.copy_(new_v)
                cache.set_cross(cache.cross_kv, valid)
            return m.decode_step(token, cache)

    want = run(_module_path(copy.deepcopy(model)))
    stale = run(_module_path(copy.deepcopy(model)), swap=False)
    calls.clear()
    got = run(model)
    assert len(calls) == 3
    error = ((got - want).norm() / want.norm()).item()
    assert error < (1e-5 if kind == "fp32" else 3e-2) and ((stale - want).norm() / want.norm()).item() > 0.2


def test_native_decoder_step_picks_as_argmax(monkeypatch):
    """The step's greedy pick is `torch.argmax`'s of its logits: the first of equal largest logits (here one in each
    thread's share of the vocabulary), a NaN before any number."""
    _needs_native_step(torch.float32)
    torch.manual_seed(0)
    model = _step_model(torch.float32)
    ids = torch.randint(3, 300, (1, 15))
    calls = _counted(monkeypatch, "decoder_step")

    def picks(m):
        with torch.inference_mode():
            cache = m.new_cache(1, 20)
            m.prefill(ids, None, cache, torch.ones(1, 1, dtype=torch.long))
            steps = [m.greedy_step(torch.tensor([[t]]), cache) for t in (5, 17, 42)]
        return [(int(pick), int(logits.argmax(-1))) for logits, pick in steps]

    with torch.no_grad():
        model.lm_head.weight[150:] = model.lm_head.weight[:150]  # every logit twice, 150 apart
    got = picks(model)
    assert len(calls) == 4 and all(pick == want < 150 for pick, want in got), got
    with torch.no_grad():
        model.lm_head.weight[260] = float("nan")
    assert picks(model) == [(260, 260)] * 3


@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_native_greedy_loop_is_the_steps(monkeypatch, kind):
    """`generate`'s greedy tokens of one sequence come from one native call (`greedy_tokens`): the tokens the steps
    give (the modules' for fp32; int8's own step one at a time), stopping at the EOS, a streamer fed each token in
    turn; an exception a streamer raises stops the call and reaches the caller, the cache holding the steps done."""
    _needs_native_step(torch.float32 if kind == "fp32" else "int8")
    torch.manual_seed(0)
    model = _step_model(torch.float32)
    if kind == "int8":
        model.quantize_("int8")
    loops = _counted(monkeypatch, "greedy_tokens", lambda *a: a[4])
    ids = torch.randint(3, 300, (1, 15))

    def stepped(**kw):  # the same generation a step at a time
        m = copy.deepcopy(model)
        m.greedy_tokens = lambda *a: None
        return m.generate(ids, max_new_tokens=12, **kw)

    want = stepped()
    assert torch.equal(model.generate(ids, max_new_tokens=12), want) and loops == [11]
    if kind == "fp32":
        assert torch.equal(want, _module_path(copy.deepcopy(model)).generate(ids, max_new_tokens=12))
    eos = int(want[0, 6])  # a token picked in the middle: the tokens end at its first pick
    stop = want[0].tolist().index(eos, 1)
    assert torch.equal(model.generate(ids, max_new_tokens=12, eos_token_id=eos), want[:, :stop + 1])

    class Streamer:
        def __init__(self, fail_at=None):
            self.got, self.ended, self.fail_at = [], False, fail_at

        def put(self, tokens):
            assert tokens.shape == (1,)
            self.got.append(int(tokens[0]))
            if len(self.got) == self.fail_at:
                raise KeyboardInterrupt

        def end(self):
            self.ended = True

    streamer = Streamer()
    assert torch.equal(model.generate(ids, max_new_tokens=12, streamer=streamer), want)
    assert streamer.got == want[0, 1:].tolist() and streamer.ended
    with torch.inference_mode():
        cache = model.new_cache(1, 20)
        start = model.prefill(ids, None, cache, torch.ones(1, 1, dtype=torch.long)).argmax(-1)
        streamer = Streamer(fail_at=4)
        with pytest.raises(KeyboardInterrupt):
            model.greedy_tokens(start[:, None], cache, 10, on_token=streamer.put)
        assert streamer.got == want[0, 2:6].tolist() and cache.length == 5 and int(cache.positions[0]) == 5
        assert model.greedy_tokens(torch.tensor([[5], [6]]), cache, 3) is None  # two rows: the caller steps


def test_native_decoder_step_steps_aside(monkeypatch):
    """Batches of several rows, autograd, a projection that is not a plain linear layer (an adapter, in any block)
    and quantized layers run the modules; a weight changed in place is read again."""
    _needs_native_step(torch.float32)
    torch.manual_seed(0)
    model = _step_model(torch.float32)
    calls = _counted(monkeypatch, "decoder_step")
    ids = torch.randint(3, 300, (2, 20))
    want = _decode(_module_path(copy.deepcopy(model)), ids)
    assert torch.allclose(_decode(model, ids), want, atol=1e-5) and not calls  # two rows: the modules
    with torch.enable_grad():
        assert model.fused_decode(torch.ones(1, 1, dtype=torch.long), model.new_cache(1, 4)) is None
    one = ids[:1]
    with torch.no_grad():
        model.decoder_blocks()[1].mlp.fc2.weight.mul_(-1)  # in place, after the native arguments were built
    _decode(model, one, steps=1)
    calls.clear()
    assert torch.allclose(_decode(model, one), _decode(_module_path(copy.deepcopy(model)), one), atol=1e-5)
    assert calls
    with torch.inference_mode():  # a token id that is not an int64 (the modules take any integer type)
        cache = model.new_cache(1, 30)
        model.prefill(one, None, cache, torch.ones(1, 1, dtype=torch.long))
        calls.clear()
        model.decode_step(torch.tensor([[5]], dtype=torch.int32), cache)
    assert not calls
    renorm = copy.deepcopy(model)
    renorm.transformer.wte.max_norm = 1.0  # an embedding that changes its rows on lookup (in place: copy first)
    plain = _module_path(copy.deepcopy(renorm))
    assert torch.allclose(_decode(renorm, one), _decode(plain, one), atol=1e-5)
    assert not calls
    adapter = copy.deepcopy(model)

    class Adapter(torch.nn.Linear):  # an output that is more than the weight's product
        def forward(self, x):
            return super().forward(x) + 1.0

    adapter.decoder_blocks()[0].mlp.fc1.__class__ = Adapter
    calls.clear()
    plain = copy.deepcopy(adapter)
    assert torch.allclose(_decode(adapter, one), _decode(_module_path(plain), one), atol=1e-5)
    assert not calls
    for mode in ("int8", "int8wo"):  # int8: the step's own kernel where the CPU has VNNI; int8wo: the modules
        quantized = copy.deepcopy(model).quantize_(mode)
        calls.clear()
        _decode(quantized, one)
        assert len(calls) == (13 if mode == "int8" and native.decoder_step_available("int8") else 0)


@pytest.mark.parametrize("interleaved", [False, True])
def test_int8_decoder_step_is_the_int8_block(monkeypatch, build, interleaved):
    """An int8 model's decoder: one call per step over the layers' and the lm_head's 7-bit codes (VNNI CPUs: kept
    row-major for it; AVX2 CPUs: the packed ones of mu's own kernels), each product's input with its own 8-bit codes,
    as the layers' kernels make them, the cross-attention K/V read from bf16 copies: the logits equal the int8
    modules' over K/V rounded to bf16 to float rounding (and the odd activation code that rounding moves), the same
    tokens; a layer the step cannot read (quantized elsewhere) makes the step run the modules."""
    _needs_native_step("int8")
    torch.manual_seed(0)
    model = _step_model(torch.float32, interleaved).quantize_("int8")
    layout = native.step_int8_layout()
    assert layout == ("rows" if native.build_isa() == "AVX-512" else "panels")  # (an AVX2 CPU's own build: panels)
    for m in model.decoder_blocks()[0].mlp.modules():
        if isinstance(m, q8.Int8Linear):
            assert (m.codes is not None) == (layout == "rows") and m.step_weights() is not None
    calls = _counted(monkeypatch, "decoder_step")
    ids = torch.randint(3, 300, (1, 37))
    set_cross = KVCache.set_cross
    monkeypatch.setattr(KVCache, "set_cross", lambda cache, kv, valid: set_cross(
        cache, [(k.bfloat16().float(), v.bfloat16().float()) for k, v in kv], valid))
    want = _decode(_module_path(copy.deepcopy(model)), ids)
    monkeypatch.setattr(KVCache, "set_cross", set_cross)
    calls.clear()
    got = _decode(model, ids, tokens=want.argmax(-1)[:-1].long())
    assert len(calls) == 13
    error = ((got - want).flatten(1).norm(dim=1) / want.flatten(1).norm(dim=1))  # per step
    assert (error < 1e-5).sum() >= 11 and error.max() < 2e-2  # (float rounding may move an activation code a step)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    model.decoder_blocks()[1].mlp.fc2.step_weights = lambda: None  # as a layer quantized another way
    calls.clear()
    _decode(model, ids, steps=2)
    assert not calls


def test_without_a_compiler_or_when_switched_off_the_prefill_uses_onednn(monkeypatch, tmp_path):
    """A failed build warns once and leaves the int8 prefill on oneDNN's kernel; `MU_NATIVE=0` turns it off."""
    monkeypatch.setenv("MU_CACHE_DIR", str(tmp_path))
    try:
        monkeypatch.setenv("CC", "false")  # a "compiler" that fails every build
        monkeypatch.setattr(native, "_cpu_flags", lambda: {"avx2", "fma"})
        native.library.cache_clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert native.library() is None and not native.int8_available()
        assert any("native kernels not built" in str(w.message) for w in caught)
        assert not list(tmp_path.rglob("*.so")) and not list(tmp_path.rglob("*.tmp"))  # nothing half-written
        if q8._fbgemm_available() and q8._linear_int8 is not None and q8._onednn_available():
            lin = torch.nn.Linear(32, 16)
            assert q8.Int8Linear(lin.weight, lin.bias, prefill=True).backend.startswith("fbgemm + onednn")
        monkeypatch.delenv("CC")
        cached = native._build(native.os.environ.get("CC") or "cc", native._cpu_flags())
        if cached is not None:  # a compiler is here: a damaged library in the cache is refused with a warning too
            cached.write_bytes(b"not a shared library")
            native.library.cache_clear()
            with pytest.warns(UserWarning, match="native kernels not loaded"):
                assert native.library() is None
        monkeypatch.setenv("MU_NATIVE", "0")
        native.library.cache_clear()
        assert native.library() is None
    finally:
        native.library.cache_clear()


@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8"])
def test_native_step_in_a_decoder_only_block(monkeypatch, build, kind):
    """The decoder-only twin's blocks get the same one-call step (no cross-attention), so both architectures decode
    with the same kernels: one call per single-token step (the prompt runs the modules), logits of the
    modules fed the same tokens (fp32 and int8 to rounding, bf16 within bf16 steps)."""
    _needs_native_step({"fp32": torch.float32, "bf16": torch.bfloat16, "int8": "int8"}[kind])
    torch.manual_seed(0)
    model = mu.build_model("tiny", arch="deconly", weight_init="fan_in").eval()
    model = model.quantize_("int8") if kind == "int8" else model.to(torch.bfloat16 if kind == "bf16" else torch.float32)
    calls = _counted(monkeypatch, "decoder_step")
    ids = torch.randint(3, 500, (1, 9))

    def decode(m, tokens=None):
        with torch.inference_mode():
            cache = m.new_cache(1, 30)
            logits = [m.prefill(ids, None, cache)]
            for i in range(12):
                token = logits[-1].argmax(-1) if tokens is None else tokens[i]
                logits.append(m.decode_step(token[:, None], cache))
        return torch.stack(logits).float()

    want = decode(_module_path(copy.deepcopy(model)))
    calls.clear()
    got = decode(model, want.argmax(-1)[:-1].long())
    assert len(calls) == 12
    # (int8: equal but where a rounding of 1e-7 moves an activation code across a step: 1e-4 to 3e-3 of the logits,
    # from that step on; a wrong product would be of their order)
    assert ((got - want).norm() / want.norm()) < {"fp32": 1e-5, "bf16": 0.02, "int8": 1e-2}[kind]
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= (0.9 if kind == "bf16" else 1.0)
