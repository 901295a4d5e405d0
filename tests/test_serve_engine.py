"""Continuous batching: the slot cache and the engine give what `model.generate` gives, row by row, while
rows join and leave the batch; cancellation frees rows; sampling is seeded per request."""

import pytest
import torch

import mu
from mu.model.cache import KVCache
from mu.serve.detok import TextStream
from mu.serve.engine import Engine, Event, Prompt, QueueFull, SamplingParams, TorchBackend
from mu.serve.slots import SlotCache
from mu.tokenizer import byte_tokenizer
from tests.serve_helpers import printable_model, reference


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module", params=["encdec", "deconly"])
def model(request, tok):
    return printable_model(request.param, tok)


def _prompt(n, seed):
    return torch.randint(4, 260, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class Collect:
    """An engine listener that keeps each choice's tokens, text and finish."""

    def __init__(self):
        self.tokens, self.text, self.done, self.events = {}, {}, {}, []

    def __call__(self, e: Event):
        self.events.append(e)
        if e.kind == "token":
            self.tokens.setdefault(e.index, []).append(e.token)
            self.text[e.index] = self.text.get(e.index, "") + e.text
        elif e.kind == "done":
            self.done[e.index] = (e.finish_reason, e.completion_tokens)


def _drain(engine, limit=1000):
    for _ in range(limit):
        if not engine.running and not engine.queue_length:
            return
        engine.run_once()
    raise AssertionError("the engine did not finish")


@torch.inference_mode()
def test_slot_cache_logits_equal_single_row_caches(model):
    """Rows admitted at different steps, one leaving in the middle: each row's step logits equal that
    row decoded alone with the ordinary KVCache."""
    encdec = model.config.arch == "encdec"
    c = model.config
    slots = SlotCache(len(model.decoder_blocks()), 3, c.n_kv_head, c.head_dim, model.dtype, cross=encdec, max_len=4,
                      cross_len=4)  # tiny buffers: admitting and stepping must grow them
    prompts = {"a": _prompt(9, 1), "b": _prompt(5, 2), "c": _prompt(14, 3)}

    def prefill(ids, room=0):
        cache = model.new_cache(1, (len(ids) if not encdec else 1) + room)
        start = torch.ones(1, 1, dtype=torch.long) if encdec else None
        return model.prefill(torch.tensor([ids]), None, cache, start), cache

    alone, order, last = {}, [], {}
    for name in ("a", "b"):
        logits, cache = prefill(prompts[name], room=16)
        alone[name] = cache
        slots.admit(prefill(prompts[name])[1], 0)
        order.append(name)
        last[name] = int(logits.argmax())
    for step in range(12):
        if step == 3:  # c joins
            logits, cache = prefill(prompts["c"], room=16)
            alone["c"] = cache
            slots.admit(prefill(prompts["c"])[1], 0)
            order.append("c")
            last["c"] = int(logits.argmax())
        if step == 7:  # a leaves: c moves into its slot
            moved = slots.release(order.index("a"))
            assert moved == 2
            order[0] = order.pop()
        tokens = torch.tensor([[last[n]] for n in order])
        batched = model.decode_step(tokens, slots)
        for i, name in enumerate(order):
            single = model.decode_step(tokens[i:i + 1], alone[name])
            torch.testing.assert_close(batched[i:i + 1], single, atol=1e-5, rtol=1e-5)
            last[name] = int(single.argmax())
    assert slots.n == 2 and slots.max_len > 4


def test_engine_greedy_equals_generate_with_staggered_arrivals(model, tok):
    """Five requests, three arriving while two decode, a batch of four (one waits): every row's tokens
    equal `model.generate` on that prompt alone."""
    engine = Engine(TorchBackend(model, max_batch=4), tok)
    engine.eos = None
    lengths, budgets = [12, 5, 30, 7, 9], [20, 7, 13, 25, 3]
    prompts = [_prompt(n, i) for i, n in enumerate(lengths)]
    got = [Collect() for _ in prompts]
    for i in (0, 1):
        engine.submit(Prompt(prompts[i]), SamplingParams(max_new_tokens=budgets[i]), got[i])
    for _ in range(3):
        engine.run_once()
    for i in (2, 3, 4):
        engine.submit(Prompt(prompts[i]), SamplingParams(max_new_tokens=budgets[i]), got[i])
    engine.run_once()
    assert engine.running == 4 and engine.queue_length == 1  # the batch is full: one waits
    _drain(engine)
    for i, ids in enumerate(prompts):
        assert got[i].tokens[0] == reference(model, ids, budgets[i])
        assert got[i].done[0] == ("length", budgets[i])
        assert got[i].text[0] == tok.decode(got[i].tokens[0], skip_special_tokens=True)
    assert engine.backend.active == 0


def test_two_requests_of_different_lengths_share_one_batch(model, tok):
    seen = []

    class Recording(TorchBackend):
        def step(self, tokens):
            seen.append(len(tokens))
            return super().step(tokens)

    engine = Engine(Recording(model, max_batch=8), tok)
    engine.eos = None
    a, b = _prompt(31, 7), _prompt(4, 8)
    ga, gb = Collect(), Collect()
    engine.submit(Prompt(a), SamplingParams(max_new_tokens=17), ga)
    engine.submit(Prompt(b), SamplingParams(max_new_tokens=6), gb)
    _drain(engine)
    assert seen[:5] == [2] * 5 and seen[5:] == [1] * 11  # b leaves after its 6th token, a goes on alone
    assert ga.tokens[0] == reference(model, a, 17) and gb.tokens[0] == reference(model, b, 6)


def test_eos_ends_a_row_and_is_not_counted(model, tok):
    ids = _prompt(10, 11)
    free_run = reference(model, ids, 12)
    eos = free_run[4]
    cut = free_run.index(eos)
    engine = Engine(TorchBackend(model, max_batch=2), tok)
    engine.eos = eos
    got, other = Collect(), Collect()
    engine.submit(Prompt(ids), SamplingParams(max_new_tokens=12), got)
    engine.submit(Prompt(ids), SamplingParams(max_new_tokens=12, ignore_eos=True), other)
    _drain(engine)
    assert got.tokens[0] == free_run[:cut + 1]  # the EOS token is the last event
    assert got.done[0] == ("stop", cut)
    assert got.text[0] == tok.decode(free_run[:cut], skip_special_tokens=True)
    assert other.tokens[0] == free_run and other.done[0] == ("length", 12)


def test_cancel_frees_the_row_for_a_waiting_request(model, tok):
    engine = Engine(TorchBackend(model, max_batch=1), tok)
    engine.eos = None
    first, second = Collect(), Collect()
    h1 = engine.submit(Prompt(_prompt(8, 1)), SamplingParams(max_new_tokens=200), first)
    engine.run_once()
    engine.run_once()
    h2 = engine.submit(Prompt(_prompt(6, 2)), SamplingParams(max_new_tokens=5), second)
    engine.run_once()
    assert engine.running == 1 and engine.queue_length == 1 and not second.events
    n_before = len(first.events)
    h1.cancel()
    engine.run_once()  # the cancelled row leaves, the waiting request takes its slot
    assert engine.backend.active == 1 and engine.queue_length == 0 and second.events
    _drain(engine)
    assert len(first.events) == n_before and 0 not in first.done  # nothing more for the cancelled request
    assert second.done[0] == ("length", 5) and h2.done


def test_cancelled_while_waiting_never_runs(model, tok):
    engine = Engine(TorchBackend(model, max_batch=1), tok)
    engine.eos = None
    a, b = Collect(), Collect()
    engine.submit(Prompt(_prompt(8, 1)), SamplingParams(max_new_tokens=3), a)
    hb = engine.submit(Prompt(_prompt(8, 2)), SamplingParams(max_new_tokens=3), b)
    hb.cancel()
    _drain(engine)
    assert a.done[0] == ("length", 3) and not b.events


def test_seeded_sampling_is_independent_of_the_batch(model, tok):
    """Choice i samples with seed + i: the same whether alone or next to other traffic."""
    ids = _prompt(9, 5)
    params = SamplingParams(max_new_tokens=10, temperature=2.0, top_p=0.95, seed=123, n=2)

    def run(with_traffic):
        engine = Engine(TorchBackend(model, max_batch=6), tok)
        engine.eos = None
        got = Collect()
        if with_traffic:
            engine.submit(Prompt(_prompt(20, 9)), SamplingParams(max_new_tokens=15, temperature=0.7), Collect())
        engine.submit(Prompt(ids), params, got)
        alone_seed = Collect()
        engine.submit(Prompt(ids), SamplingParams(max_new_tokens=10, temperature=2.0, top_p=0.95, seed=124),
                      alone_seed)
        _drain(engine)
        return got.tokens, alone_seed.tokens[0]

    quiet, quiet_124 = run(False)
    busy, busy_124 = run(True)
    assert quiet == busy and quiet_124 == busy_124
    assert quiet[1] == quiet_124  # choice 1 of seed 123 is choice 0 of seed 124
    assert quiet[0] != quiet[1]


def test_stop_string_ends_the_text_before_it(model, tok):
    engine = Engine(TorchBackend(model, max_batch=2), tok)
    engine.eos = None
    ids = _prompt(10, 21)
    free_text = tok.decode(reference(model, ids, 30), skip_special_tokens=True)
    stop = free_text[4:6]
    got = Collect()
    engine.submit(Prompt(ids), SamplingParams(max_new_tokens=30, stop=(stop,)), got)
    _drain(engine)
    assert got.text[0] == free_text[:free_text.index(stop)]
    assert got.done[0][0] == "stop"


def test_text_stream_deltas_add_up_to_the_decoded_text(tok, shared_data):
    from mu.tokenizer import load_tokenizer

    phi3 = load_tokenizer(shared_data / "phi3_tokenizer")
    text = "Plain words, ünïcödé, 日本語 and emoji 🙂 — then more text.\nA second line."
    for t in (tok, phi3):
        ids = t(text, add_special_tokens=False)["input_ids"]
        stream = TextStream(t)
        deltas = [stream.add(i) for i in ids]
        assert "".join(deltas) + stream.finish() == t.decode(ids, skip_special_tokens=True)
        assert all("\ufffd" not in d for d in deltas)  # no half characters go out
        stream = TextStream(t, stop=["second"])
        out = "".join(stream.add(i) for i in ids) + stream.finish()
        assert out == text[:text.index("second")] and stream.stopped


def test_queue_limit_and_request_checks(model, tok):
    engine = Engine(TorchBackend(model, max_batch=2), tok, max_queue=1)
    engine.submit(Prompt([5, 6]), SamplingParams(), Collect())
    with pytest.raises(QueueFull):
        engine.submit(Prompt([5, 6]), SamplingParams(), Collect())
    with pytest.raises(mu.MuError, match="n=3"):
        engine.submit(Prompt([5]), SamplingParams(n=3), Collect())
    with pytest.raises(mu.MuError, match="empty prompt"):
        engine.submit(Prompt([]), SamplingParams(), Collect())


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(model, tok):
    class Flaky(TorchBackend):
        fail = True

        def step(self, tokens):
            if self.fail:
                self.fail = False
                raise RuntimeError("boom")
            return super().step(tokens)

    engine = Engine(Flaky(model, max_batch=2), tok)
    engine.eos = None
    broken, fine = Collect(), Collect()
    engine.submit(Prompt(_prompt(6, 1)), SamplingParams(max_new_tokens=5), broken)
    engine.run_once()
    assert broken.events[-1].kind == "error" and "boom" in broken.events[-1].error
    assert engine.running == 0 and engine.backend.active == 0
    ids = _prompt(6, 2)
    engine.submit(Prompt(ids), SamplingParams(max_new_tokens=5), fine)
    _drain(engine)
    assert fine.tokens[0] == reference(model, ids, 5)


def test_generate_is_untouched_by_slot_caches(model):
    """The plain KVCache path still works after slot caches were used (no shared state)."""
    ids = _prompt(7, 3)
    assert isinstance(model.new_cache(1, 4), KVCache) and not isinstance(model.new_cache(1, 4), SlotCache)
    assert reference(model, ids, 6) == reference(model, ids, 6)


def test_backend_packs_the_head_and_keeps_its_logits(tok):
    """The backend gives the model's head (and decoder linears) oneDNN-packed weights: the same logits for 1
    to 16 rows, the same state dict, a weight changed in place is seen at the next call, and training still
    gets gradients."""
    model = printable_model("encdec", tok)
    keys = set(model.state_dict())
    x = torch.randn(16, model.config.n_embd)
    expected = torch.nn.functional.linear(x, model.lm_head.weight.detach())
    TorchBackend(model, max_batch=2)
    assert type(model.lm_head).__name__ == "PackedLinear"
    assert set(model.state_dict()) == keys
    with torch.no_grad():
        for rows in (1, 3, 16):
            torch.testing.assert_close(model.lm_head(x[:rows]), expected[:rows], atol=1e-5, rtol=1e-5)
        model.lm_head.weight.mul_(2)  # in place: the packed copy must be made again
        torch.testing.assert_close(model.lm_head(x), 2 * expected, atol=1e-5, rtol=1e-5)
        fc1 = model.transformer.h[0].mlp.fc1
        assert type(fc1).__name__ == "PackedLinear"
        torch.testing.assert_close(fc1(x), torch.nn.functional.linear(x, fc1.weight, fc1.bias), atol=1e-5, rtol=1e-5)
    out = model.lm_head(x)  # autograd on: the plain product
    out.sum().backward()
    assert model.lm_head.weight.grad is not None


def test_engine_thread_sets_its_own_torch_threads(model, tok):
    """`threads` is set in the engine's thread when it starts (the one thread running torch's parallel kernels in
    `mu serve`); the caller's thread keeps its own setting."""
    import threading

    seen = []

    class Recording(TorchBackend):
        def step(self, tokens):
            seen.append((threading.current_thread().name, torch.get_num_threads()))
            return super().step(tokens)

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    engine = Engine(Recording(model, max_batch=2), tok, threads=1)
    engine.eos = None
    got, finished = Collect(), threading.Event()

    def listen(e: Event):
        got(e)
        if e.kind == "done":
            finished.set()

    try:
        engine.start()
        engine.submit(Prompt(_prompt(9, 3)), SamplingParams(max_new_tokens=4), listen)
        assert finished.wait(60)
        assert torch.get_num_threads() == 2
    finally:
        engine.stop()
        torch.set_num_threads(threads)
    assert seen and all(t == ("mu-serve-engine", 1) for t in seen)
