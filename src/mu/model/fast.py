"""CPU inference fast paths, installed by swap functions (as `mu.model.quantize.quantize_` installs its kernels).

The layers (`mu.model.layers`) hold the paper's modules only; what makes inference fast on a CPU lives
here and is switched on by functions that change a built model in place, leaving its parameters and
state dict untouched (training sees exactly the paper's modules and math: every path below steps aside
while autograd is on):

- `split_linear_(model)`: every plain `nn.Linear` of the transformer and the lm_head becomes a
  `SplitLinear` (a class swap: same parameters, same state-dict keys), whose few-row fp32 products on a
  multi-core CPU run `split_linear`.
- `fuse_projections_(model)`: each attention's q/k/v (and the cross-attention's k/v) run as one GEMM over
  a concatenation of their weights (`FusedProjection`), built on first use and rebuilt whenever a source
  parameter changes.
- `compile_decode_(model)`: the fixed-shape decode step `generate(compile=True)` runs, through
  `torch.compile` (done on first use of such a step).
- `pack_linears_(model)`: for batched decoding (`mu serve` applies it), the lm_head and the decoder's linear
  layers run `packed_linear` (oneDNN on a copy of the weight packed once) for a band of row counts.

`speed_up_(model)` applies the first two; every `MuEncoderDecoder` / `MuDecoderOnly` calls it when built.
"""

from __future__ import annotations

import ctypes
import weakref
from functools import lru_cache, partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from mu.errors import MuError
from mu.model import native
from mu.model.layers import is_exporting, rope_scaled
from mu.utils import huge_page_bytes, round_up

SPLIT_MAX_ROWS = 8  # a product with at most this many input rows is a matrix-vector product in effect


def split_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """`F.linear(x, weight, bias)`, faster on a CPU: for a few rows (a decode) of fp32 or bf16, and for many rows (a
    prefill) of fp32.

    A decode step multiplies one row per sequence by each weight matrix. PyTorch's fp32 GEMV for that does
    not scale past one core (on our 2-core test machine two threads are slower than one), while a batched
    product over row blocks of the weight runs one block per thread: the output rows are cut into 4 (or
    2) equal blocks, a view of the weight, no copy, and the bias is the product's starting value. Falls
    back to `F.linear` whenever that does not apply (autograd, tracing/export, accelerators, other dtypes, many
    rows, one thread). Inside `torch.compile` the compiler traces the batched product, which a compiled graph
    calls as MKL's (`aten.baddbmm` over the same views, on every thread; at one thread about `F.linear`'s speed).

    On CPUs with AVX-512 a few rows of fp32, or of bf16 with AVX-512-BF16, run mu's native GEMV instead
    (`native.gemv_float`; `mu::gemv` inside `torch.compile`), which streams the weights 1.15-1.45x faster than the
    batched product (fp32) and ~2x faster than PyTorch's bf16 matmul for one row (docs/efficiency.md, round 10).

    On CPUs with AVX-512, more rows of fp32 (a prefill, a batch) run oneDNN's matmul on the weight as it is
    (`mkldnn._linear_pointwise`, no packed copy) instead of `F.linear`'s MKL GEMM: 1.2-1.6x faster at 512 rows and
    2-3x at 9-64 on an AVX-512 AMD CPU, where MKL takes a slower path (docs/efficiency.md, round 10). AVX2 CPUs keep
    MKL's, which was as fast as oneDNN's from 128 rows there (`packed_linear`). Eager inference only: training and
    compiled graphs keep `F.linear`.
    """
    rows = x.numel() // x.shape[-1] if x.numel() else 0
    inference = (x.device.type == "cpu" and not torch.is_grad_enabled() and not is_exporting()
                 and not torch.jit.is_tracing())
    if (inference and 0 < rows <= SPLIT_MAX_ROWS and x.dtype == weight.dtype and weight.is_contiguous()
            and (bias is None or bias.dtype == x.dtype) and _native_gemv(x.dtype)):
        return _gemv_op(x, weight, bias) if as_op() else native.gemv_float(x, weight, bias)
    if (inference and rows > SPLIT_MAX_ROWS and x.dtype == torch.float32 and weight.dtype == torch.float32
            and (bias is None or bias.dtype == torch.float32) and not torch.compiler.is_compiling()
            and _onednn_prefill()):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    out = weight.shape[0]
    chunks = 4 if out % 4 == 0 else 2 if out % 2 == 0 else 1
    if (chunks == 1 or not inference or not 0 < rows <= SPLIT_MAX_ROWS or x.dtype != torch.float32
            or weight.dtype != torch.float32 or not weight.is_contiguous()
            or (not torch.compiler.is_compiling() and torch.get_num_threads() < 2)):  # (the count does not trace)
        return F.linear(x, weight, bias)
    blocks = weight.view(chunks, out // chunks, weight.shape[1]).transpose(1, 2)  # (chunks, in, out/chunks)
    xs = x.reshape(1, rows, -1).expand(chunks, rows, -1)
    # always baddbmm (no bias: a zero start, beta=0): inductor turns a one-row `bmm` into its own loop, 2-5% slower
    # than MKL's product over the 32128 x 1024 lm_head
    start = x.new_zeros(()) if bias is None else bias.view(chunks, 1, -1)
    y = torch.baddbmm(start, xs, blocks, beta=0 if bias is None else 1)
    if rows == 1:  # (chunks, 1, out/chunks) holds the outputs in order
        return y.view(*x.shape[:-1], out)
    return y.transpose(0, 1).reshape(*x.shape[:-1], out)


def as_op() -> bool:
    """Whether a native kernel must run as its op (`cpu_op`) rather than be called directly: while `torch.compile`
    traces, and under a Python dispatch mode (`FlopCounterMode`, say), which sees ops, not calls into C."""
    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None


_LIBRARIES: list = []  # the `torch.library.Library` objects of `cpu_op` (an op lives as long as its library)


def cpu_op(schema: str, kernel: Callable[..., Tensor], fake: Callable[..., Tensor]):
    """`torch.ops.mu.NAME.default` for `schema` ("NAME(args) -> Tensor"): an op that a compiled graph calls as one
    opaque call, running `kernel` on CPU tensors; `fake` gives its output's shape and dtype while tracing.

    Defined with `torch.library.Library` and a CPU kernel rather than `torch.library.custom_op`, whose wrapper
    costs more per call: 61 such calls from a compiled graph (inductor's C++ wrapper) took 995 vs 604 us, the
    kernels called directly 424 us (tiny weights, one thread, docs/efficiency.md). Defined once per process: a
    second import of the defining module (after its removal from `sys.modules`) finds the op, with the first
    import's kernel.
    """
    name = schema.split("(", 1)[0]
    if not hasattr(torch.ops.mu, name):
        lib = torch.library.Library("mu", "FRAGMENT")
        lib.define(schema)
        lib.impl(name, kernel, "CPU")
        torch.library.register_fake(f"mu::{name}", fake, lib=lib)
        _LIBRARIES.append(lib)
    return getattr(torch.ops.mu, name).default


@lru_cache(maxsize=None)
def _onednn_prefill() -> bool:
    """Whether many-row fp32 products run oneDNN's matmul: where it was measured faster than MKL's (AVX-512)."""
    return torch.backends.mkldnn.is_available() and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


@torch.compiler.assume_constant_result  # a compiled step asks too: a constant to the tracer, not a call into ctypes
def _native_gemv(dtype: torch.dtype) -> bool:
    return native.gemv_available(dtype)


_gemv_op = cpu_op("gemv(Tensor x, Tensor weight, Tensor? bias) -> Tensor",
                  lambda x, weight, bias: native.gemv_float(x, weight, bias),
                  lambda x, weight, bias: x.new_empty(*x.shape[:-1], weight.shape[0]))


class SplitLinear(nn.Linear):
    """An `nn.Linear` whose forward is `split_linear` (made by `split_linear_`, never constructed directly)."""

    def forward(self, x: Tensor) -> Tensor:
        return split_linear(x, self.weight, self.bias)


def is_plain_linear(module: nn.Module) -> bool:
    """A linear layer that is its weight and bias and nothing more (not an adapter, not quantized)."""
    return type(module) in (nn.Linear, SplitLinear, PackedLinear)


def split_linear_(model: nn.Module) -> nn.Module:
    """Swap the class of every plain `nn.Linear` in `model.transformer` and `model.lm_head` to `SplitLinear`."""
    for m in [*model.transformer.modules(), model.lm_head]:
        if type(m) is nn.Linear:
            m.__class__ = SplitLinear
    return model


class FusedProjection:
    """x -> the concatenated outputs of `attn`'s projections `names`, as one `split_linear` GEMM.

    Calling it returns that function, or None when a projection is not a plain linear layer (a LoRA
    adapter from peft, say, whose output is more than its base weight). The concatenation is rebuilt when
    any source weight/bias is replaced or modified in place (checked by storage pointer and version
    counter), so a model that trains between two generations never uses stale weights.
    """

    def __init__(self, attn: nn.Module, names: tuple[str, ...], pack_min_rows: Optional[int] = None):
        self.attn, self.names = attn, names
        self.pack_min_rows = pack_min_rows  # set: `packed_linear` from this many rows on (see `pack_linears_`)
        self.key: Optional[tuple] = None
        self.fn: Optional[Callable[[Tensor], Tensor]] = None

    def __call__(self) -> Optional[Callable[[Tensor], Tensor]]:
        parts = [getattr(self.attn, n) for n in self.names]
        if not all(is_plain_linear(p) for p in parts):
            return None
        if torch.compiler.is_compiling():
            # a compiled decode step: the concatenation that the eager prefill before it made or refreshed (its key,
            # storage pointers, cannot be traced); None before any eager use, and then the three projections run
            return self.fn
        key = tuple((t.data_ptr(), t._version) for p in parts for t in (p.weight, p.bias))
        if key != self.key:
            weight = torch.cat([p.weight for p in parts])
            bias = torch.cat([p.bias for p in parts])
            fn = split_linear if self.pack_min_rows is None else partial(packed_linear, store={},
                                                                         min_rows=self.pack_min_rows)
            self.key, self.fn = key, partial(fn, weight=weight, bias=bias)
        return self.fn


def fuse_projections_(model: nn.Module) -> nn.Module:
    """Give every attention of `model` its fused projections (`Attention.FUSED`) as `FusedProjection`s."""
    from mu.model.layers import Attention

    for m in model.modules():
        if isinstance(m, Attention):
            for name, names in m.FUSED.items():
                m.set_fused_provider(name, FusedProjection(m, names))
    return model


class NativeDecoder:
    """A decode step of one sequence as one call into mu's native library (`native.decoder_step`): every decoder
    block's norms, products, RoPE, cache write, attention (both, in an encoder-decoder's `DecoderBlock`; the causal
    one in a decoder-only model's `SelfAttentionBlock`) and MLP, then the final norm and the lm_head, in one OpenMP
    region, where the module path makes ~25 PyTorch calls per block, each with its own threads' start and a new
    tensor, and a Python call per module. On CPUs with AVX-512 for fp32 (bf16: AVX-512-BF16), and for an int8 model
    with VNNI (the `Int8Linear`s it reads keep row-major codes for it, `quantize_`) (docs/efficiency.md, rounds 11
    and 12); on CPUs with AVX2 and FMA for fp32, and for an int8 model where mu's own int8 kernels run (over their
    packed codes, `Int8Linear.step_weights`) (round 13).

    Called by the model's decode step (`MuModel.fused_decode`) with the new tokens and the cache; does what the step
    does beside the layers too (the token's embedding row, RoPE's rows from the cache's table, its valid slot, the
    position and the length advanced), so a step makes no PyTorch op of its own: each of those ran cold after a step's
    stream of weights (~0.3 ms of a 330m int8 step of ~5 ms, docs/efficiency.md round 15). Returns the logits and
    their greedy pick (the argmax, computed in the call while the logits are in cache), or None to let the modules
    run: more than one row or token (a batch, a prompt), autograd, training mode, tracing, a
    compiled step (it keeps its own kernels), a Python dispatch mode (FLOP counting sees the plain ops), RoPE whose
    base depends on the length (NTK scaling past `block_size`), another dtype or CPU, a linear layer that is neither a
    plain one nor an int8 one whose codes the step reads (an adapter, another quantization). The kernel reads the
    weights where they lie, so changes in place need nothing; which modules and tensors the model holds, and where the
    cache keeps its buffers, is checked once per cache (a generation; again if the cache's buffers move or its
    cross-attention K/V are set again: `KVCache.cross_version`), where their pointers are taken.

    An int8 model's step reads the cross-attention K/V from bf16 copies made there, once per generation (the cache
    keeps fp32 ones for the modules): half of what a step reads besides the weights (7.9 of 7.9 + 131 MiB at `330m`
    with 512 input tokens), 2.3-4.5% faster steps (docs/efficiency.md, round 16). Their rounding (a relative 2^-9)
    is finer than the step of the 8-bit codes every product's input gets.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.args: Optional[native.Decoder] = None  # for the cache `checked` refers to, with its buffers at `where`
        self.checked: Optional[weakref.ref] = None
        self.where: Optional[tuple] = None

    def __getstate__(self) -> dict:  # a copy (deepcopy, pickle) builds its own arguments: pointers do not copy
        return {"model": self.model, "args": None, "checked": None, "where": None}

    def __call__(self, tokens: Tensor, cache) -> Optional[tuple[Tensor, Tensor]]:
        args = self._ready(tokens, cache, 1)
        if args is None:
            return None
        logits, pick, pad = native.decoder_step(args, tokens, cache.length, not cache.all_valid, self.model.dtype)
        cache.all_valid = cache.all_valid and not pad
        cache.length += 1
        return logits, pick

    def greedy_tokens(self, tokens: Tensor, cache, n: int, eos: Optional[int] = None,
                      on_token: Optional[Callable[[Tensor], object]] = None) -> Optional[Tensor]:
        """Up to `n` greedy tokens after `tokens` (1, 1) in one native call (`native.greedy_tokens`: each step's pick
        the next step's token, no Python between them); the last is `eos` where given and picked. `on_token` is
        called with each token, a (1,) tensor, as it is picked (a streamer's put); an exception it raises stops the
        tokens and is raised once the cache holds the steps done. Returns the tokens (m,), or None where the step
        cannot run."""
        args = self._ready(tokens, cache, n)
        if args is None:
            return None
        out, pad, raised = native.greedy_tokens(args, tokens, cache.length, not cache.all_valid, n, eos,
                                                self.model.dtype, on_token)
        cache.all_valid = cache.all_valid and not pad
        cache.length += len(out)
        if raised is not None:
            raise raised
        return out

    def _ready(self, tokens: Tensor, cache, n: int) -> Optional[native.Decoder]:
        """The native arguments for `n` steps from `tokens` with `cache`, or None where the modules must run them."""
        m = self.model
        if (tokens.shape != (1, 1) or tokens.dtype != torch.long or tokens.device.type != "cpu" or cache.compiled
                or m.training or torch.is_grad_enabled() or as_op() or is_exporting() or torch.jit.is_tracing()
                or rope_scaled(m.config, cache.length + n)):
            return None
        where = (cache.k.data_ptr(), cache.v.data_ptr(), cache.valid.data_ptr(), cache.positions.data_ptr(),
                 cache.cross_version)  # (cross K/V set again, in place or not: new copies, their width, the mask)
        if self.checked is None or self.checked() is not cache or where != self.where:  # a new generation
            self.args = self._arguments(cache)
            self.checked, self.where = weakref.ref(cache), where
        if self.args is not None and cache.length + n > cache.max_len:
            raise RuntimeError(f"KV cache overflow: {cache.length + n} positions > max_len {cache.max_len}")
        return self.args

    def _arguments(self, cache) -> Optional[native.Decoder]:
        """The native arguments for the model and `cache`, or None where the kernel cannot run them."""
        m, dtype, wte = self.model, self.model.dtype, self.model.transformer.wte
        if cache.batch_size != 1 or type(wte) is not nn.Embedding or wte.max_norm is not None:
            return None  # (an embedding of another kind, or one that renormalizes its rows, runs as a module)
        blocks = [block_arguments(b, dtype) for b in m.decoder_blocks()]
        head, norm, emb = m.lm_head, m.transformer.ln_f, wte.weight
        int8 = step_weights(head)
        plain = is_plain_linear(head) and head.weight.dtype == dtype
        if (not blocks or any(b is None or bool(b.scale[0]) != (int8 is not None) for b in blocks)
                or head.bias is not None or not (int8 is not None or plain) or norm.weight.dtype != dtype
                or not emb.is_contiguous() or emb.device.type != "cpu" or head.out_features > emb.shape[0]):
            # (every pick must be a token the embedding holds: the next greedy step's input)
            return None
        weight = head.weight if int8 is None else int8[0]
        cross = cache.cross_kv
        cos, sin = m.rope_table(cache)
        caches = [*cache.k_layers, *cache.v_layers, *(t for kv in cross or () for t in kv), cos, sin]
        mask = cache.cross_mask
        if (any(t.dtype != dtype or not t.is_contiguous() or t.device.type != "cpu" for t in caches)
                or not weight.is_contiguous() or (cross is None) != (blocks[0].cwq is None)
                or (mask is not None and not mask.is_contiguous()) or not cache.valid.is_contiguous()):
            return None
        n = len(blocks)
        pointers = ctypes.c_void_p * n
        kc, vc = pointers(*(t.data_ptr() for t in cache.k_layers)), pointers(*(t.data_ptr() for t in cache.v_layers))
        ck = cv = None
        if cross is not None and int8 is not None:  # bf16 copies: half the bytes each step reads (see the class)
            copies = torch.empty(n, 2, *cross[0][0].shape, dtype=torch.bfloat16)  # (one buffer: 8x faster than .to)
            for pair, (k, v) in zip(copies, cross):
                pair[0].copy_(k)
                pair[1].copy_(v)
            cross = [(k, v) for k, v in copies]
        if cross is not None:
            ck, cv = pointers(*(k.data_ptr() for k, _ in cross)), pointers(*(v.data_ptr() for _, v in cross))
        array = (native.Block * n)(*blocks)
        scale, sums = (None, None) if int8 is None else (int8[1].data_ptr(), int8[2].data_ptr())
        args = native.Decoder(array, n, norm.weight.data_ptr(), weight.data_ptr(), scale, sums, head.out_features,
                              norm.eps, kc, vc, cache.max_len, ck, cv, 0 if cross is None else cross[0][0].shape[-2],
                              cross is not None and cross[0][0].dtype == torch.bfloat16,
                              None if mask is None else mask.data_ptr(), emb.data_ptr(), emb.shape[0], cos.data_ptr(),
                              sin.data_ptr(), cache.valid.data_ptr(), cache.positions.data_ptr(),
                              m.config.pad_token_id)
        args.arrays = (array, kc, vc, ck, cv, cross, cos, sin)  # alive as long as the pointers into them are
        return args


def block_arguments(block: nn.Module, dtype: torch.dtype) -> Optional[native.Block]:
    """A decoder block's native arguments (`native.Block`), or None where the kernel cannot run it (modules, dtype,
    layout, CPU)."""
    b = block
    linears = step_linears(b)
    present = [m for m in linears if m is not None]
    steps = [None if m is None else step_weights(m) for m in linears]  # int8: codes, scales, sums, bias
    if all(is_plain_linear(m) for m in present) and b.mlp.fused_forward is None:
        kind, int8 = dtype, False
    elif dtype == torch.float32 and all(t is not None for m, t in zip(linears, steps) if m is not None):
        kind, int8 = "int8", True
    else:
        return None
    if not native.decoder_step_available(kind):
        return None
    weights = [None if m is None else t[0] if int8 else m.weight for m, t in zip(linears, steps)]
    pairs = [(w, None if m is None else t[3] if int8 else m.bias) for w, m, t in zip(weights, linears, steps)]
    cross = linears[4] is not None
    norms = (b.ln1, b.ln2, b.ln3) if cross else (b.ln1, None, b.ln2)  # (self-attention, cross-attention, MLP)
    tensors = [norms[0].weight, *pairs[0], *pairs[1], *pairs[2], *pairs[3], norms[1] and norms[1].weight,
               *pairs[4], *pairs[5], norms[2].weight, *pairs[6], *pairs[7]]
    codes = {id(w) for w in weights if int8 and w is not None}  # the rest: in the activations' dtype
    if (any(t is not None and ((t.dtype != dtype and id(t) not in codes) or t.device.type != "cpu"
                               or not t.is_contiguous()) for t in tensors)
            or len({n.eps for n in norms if n is not None}) != 1):
        return None
    attn = b.causal_attn if cross else b.attn
    args = native.Block(*(None if t is None else t.data_ptr() for t in tensors), b.ln1.weight.numel(),
                        attn.n_head, attn.n_kv_head, attn.head_dim, b.mlp.fc1.out_features,
                        int(attn.interleaved), b.ln1.eps)
    if int8:
        args.scale[:] = [None if t is None else t[1].data_ptr() for t in steps]
        args.wsum[:] = [None if t is None else t[2].data_ptr() for t in steps]
    return args


def step_weights(linear: nn.Module) -> Optional[tuple[Tensor, Tensor, Tensor, Optional[Tensor]]]:
    """An int8 layer's weights as the native step reads them (`Int8Linear.step_weights`), or None (another module)."""
    get = getattr(linear, "step_weights", None)
    return get() if callable(get) else None


def step_linears(block: nn.Module) -> tuple[Optional[nn.Module], ...]:
    """The linear layers of a block `NativeDecoder` reads, in its order: q, k, v, out, cross q, cross out, fc1, fc2 (the
    cross pair None in a decoder-only `SelfAttentionBlock`)."""
    attn = getattr(block, "causal_attn", None) or block.attn
    cross = getattr(block, "cross_attn", None)
    return (attn.q_linear, attn.k_linear, attn.v_linear, attn.out_linear, None if cross is None else cross.q_linear,
            None if cross is None else cross.out_linear, block.mlp.fc1, block.mlp.fc2)


def native_decoder_(model: nn.Module) -> nn.Module:
    """Give `model` a `NativeDecoder` as its fused decode step (`MuModel.fused_decode`; used where the CPU, dtype
    and modules allow)."""
    model.fused_decode = NativeDecoder(model)
    return model


HUGE_PAGES_MIN_BYTES = 32 << 20  # below this the weights stay where they are (they nearly fit a CPU's L3 cache)
ARENA_BYTES = 64 << 20  # parameters move in groups of about this size (the copy's extra memory at a time)


def huge_pages_(model: nn.Module) -> nn.Module:
    """Move `model`'s CPU parameters and buffers (floating point, and int8 weight codes) onto memory backed by
    transparent huge pages (Linux; see `mu.utils.huge_page_bytes`), in groups of `ARENA_BYTES`, so a decode step's
    stream of weight reads crosses 2 MiB pages instead of 4 KiB ones. Same parameters (their data moves), same values;
    nothing happens where huge pages cannot be asked for, for models under `HUGE_PAGES_MIN_BYTES`, or when done
    already. `mu.load_model` and `generate` call it on CPU: a call that finds every tensor where an earlier one left
    it is one walk over the modules (~1.3 ms at 330m int8, against 2.4-3.0 ms that filtered `parameters()` and
    `buffers()` again)."""
    tensors = [t for m in model.modules() for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]
    done = model.__dict__.get("_huge_pages")
    if done is not None and all(t.data_ptr() in done for t in tensors):
        return model
    try:
        _move_to_huge_pages(tensors)
    finally:  # where every tensor now lies, moved or not (not where a moved one was: that memory is free again)
        model.__dict__["_huge_pages"] = {t.data_ptr() for t in tensors}
    return model


def _move_to_huge_pages(tensors: list[Tensor]) -> None:
    params = list({id(p): p for p in tensors  # (once each: a tied weight comes twice)
                   if p.device.type == "cpu" and (p.is_floating_point() or p.dtype == torch.int8)}.values())
    if sum(p.nbytes for p in params) < HUGE_PAGES_MIN_BYTES:
        return
    groups: list[list[Tensor]] = [[]]
    size = 0  # of the last group
    for p in params:
        if groups[-1] and size + p.nbytes > ARENA_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += round_up(p.nbytes, 64)
    with torch.no_grad(), torch.inference_mode(False):  # (normal tensors: the model may train afterwards)
        for group in groups:
            arena = huge_page_bytes(sum(round_up(p.nbytes, 64) for p in group))
            if arena is None:
                return
            at = 0
            for p in group:
                data = arena[at:at + p.nbytes].view(p.dtype).view(p.shape)
                data.copy_(p.data)
                p.data = data
                at += round_up(p.nbytes, 64)


def speed_up_(model: nn.Module) -> nn.Module:
    """The CPU fast paths every mu model gets when built: `split_linear_`, `fuse_projections_` and
    `native_decoder_`."""
    return native_decoder_(fuse_projections_(split_linear_(model)))


PACK_MAX_ROWS = 128  # above this many rows (a prefill) PyTorch's own GEMM is as fast as oneDNN's packed one


def packed_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], store: dict, min_rows: int = 1) -> Tensor:
    """`split_linear(x, weight, bias)`; for `min_rows`..`PACK_MAX_ROWS` rows of fp32 on a CPU, oneDNN's product
    with a copy of `weight` packed once for it (kept in `store`, packed again whenever the weight is replaced
    or changed in place: storage pointer, version counter).

    A decode batch of a server multiplies 9-64 rows by every decoder weight and by the vocabulary projection.
    On our 2-core AVX2 machine PyTorch's GEMM does that poorly: the `small` head (32064 x 384, 49 MB) at 16 rows
    takes 11.4 ms through `F.linear`, 4.4 ms through oneDNN on a packed copy (2.3 vs 2.0 ms at one row), and a
    16-row decode step of the whole model 16.1 vs 14.0 ms with the decoder's linears packed too.
    """
    rows = x.numel() // x.shape[-1] if x.numel() else 0
    if (not min_rows <= rows <= PACK_MAX_ROWS or x.device.type != "cpu" or x.dtype != torch.float32
            or weight.dtype != torch.float32 or torch.is_grad_enabled() or torch.compiler.is_compiling()
            or torch.jit.is_tracing() or not torch.backends.mkldnn.is_available()):
        return split_linear(x, weight, bias)
    version = None if weight.is_inference() else weight._version  # (a fused concatenation made in inference mode)
    key = (weight.data_ptr(), version, tuple(weight.shape))
    if store.get("key") != key:
        store["key"], store["packed"] = key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 16)
    return torch.ops.mkldnn._linear_pointwise(x, store["packed"], bias, "none", [], "")


class PackedLinear(SplitLinear):
    """An `nn.Linear` whose forward is `packed_linear` (made by `pack_linears_`, never constructed directly).
    The packed copy is a plain attribute: the state dict keeps only the weight and bias."""

    pack_min_rows = 1  # `pack_linears_` sets it per layer

    def forward(self, x: Tensor) -> Tensor:
        return packed_linear(x, self.weight, self.bias, self.__dict__.setdefault("_packed", {}), self.pack_min_rows)


def pack_linears_(model: nn.Module) -> nn.Module:
    """For batched decoding (a server): the lm_head from one row on, and the decoder blocks' linear layers and
    fused self-attention q/k/v from `SPLIT_MAX_ROWS` + 1 rows on, run `packed_linear`. Costs one more copy of
    those weights in memory. Quantized layers and adapters are left as they are."""
    from mu.model.layers import Attention

    if is_plain_linear(model.lm_head):
        model.lm_head.__class__ = PackedLinear
    for block in model.decoder_blocks():
        for m in block.modules():
            if is_plain_linear(m):
                m.__class__ = PackedLinear
                m.pack_min_rows = SPLIT_MAX_ROWS + 1
            elif isinstance(m, Attention) and all(is_plain_linear(getattr(m, n)) for n in m.FUSED["qkv"]):
                m.set_fused_provider("qkv", FusedProjection(m, m.FUSED["qkv"], pack_min_rows=SPLIT_MAX_ROWS + 1))
    return model


def compile_decode_(model: nn.Module) -> Callable:
    """`torch.compile` the model's fixed-shape decode step (`MuModel._decode_core`) once; returns it.

    Float models and "int8"-quantized ones (fbgemm's GEMM stays one opaque op per linear, `mu::int8_linear`;
    the compiler fuses the norms, RoPE, residuals, GELU and cache writes around it into a few C++ kernels).
    """
    if getattr(model, "quantization", None) not in (None, "int8"):
        raise MuError(f"compile=True supports float and int8 models: this one is {model.quantization}-quantized "
                      "(its decode runs eagerly)")
    for block in model.decoder_blocks():  # (an encoder-decoder's eager steps run `NativeDecoder`, which reads the
        attn = getattr(block, "causal_attn", None)  # separate projections: the fused one a compiled step uses is
        if attn is not None:  # built or refreshed here, eagerly)
            attn.fused_linear("qkv")
    core = model.__dict__.get("_compiled_core")
    if core is None:  # one compiled function per model; torch.compile caches a graph per shape
        # on a CPU, inductor's C++ wrapper: the ~150 kernel and op calls of a step are made from C++, not from a
        # Python function (a 330m int8 step: 11.6 vs 12.6 ms at one thread, docs/efficiency.md)
        options = {"cpp_wrapper": True} if model.device.type == "cpu" else None
        core = model.__dict__["_compiled_core"] = torch.compile(model._decode_core, dynamic=False, options=options)
    return core
