"""Cached generation: cached == uncached, batched == one-by-one, beam/greedy/sampling, EOS, streaming."""

import pytest
import torch

import mu
from mu.generation import beam_search, new_tokens, sample_logits


def _ids(B, T, seed=0):
    return torch.randint(4, 500, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=["encdec", "deconly"])
def model(request):
    torch.manual_seed(0)
    return mu.build_model("tiny", arch=request.param).eval()


def test_cached_logits_equal_uncached(model):
    prompt = _ids(2, 10)
    prompt[1, 7:] = 0
    out = model.generate(prompt, max_new_tokens=6)
    new = new_tokens(model, out, prompt)
    # replay: uncached logits over the whole sequence vs the cached step logits
    cache = model.new_cache(2, prompt.shape[1] + 8)
    with torch.no_grad():
        if model.config.arch == "encdec":
            dec = out  # start token + generated tokens
            full = model(encoder_input_ids=prompt, decoder_input_ids=dec).logits
            steps = [model.prefill(prompt, None, cache, dec[:, :1])]
            steps += [model.decode_step(dec[:, t:t + 1], cache) for t in range(1, dec.shape[1])]
            torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=1e-5)
        else:
            row = torch.cat([prompt[:1, :], new[:1]], 1)  # row 0 has no padding: positions 0..T-1
            full = model(input_ids=row).logits
            steps = [model.prefill(row[:, :10], None, cache := model.new_cache(1, 20), None)]
            steps += [model.decode_step(row[:, t:t + 1], cache) for t in range(10, row.shape[1])]
            torch.testing.assert_close(torch.stack(steps, 1), full[:, 9:], atol=1e-5, rtol=1e-5)


def test_greedy_continuation_matches_uncached_argmax(model):
    prompt = _ids(1, 8, seed=3)
    out = model.generate(prompt, max_new_tokens=5)
    w = out.shape[1] - new_tokens(model, out, prompt).shape[1]
    with torch.no_grad():
        for t in range(5):
            if model.config.arch == "encdec":
                logits = model(encoder_input_ids=prompt, decoder_input_ids=out[:, :w + t]).logits
            else:
                logits = model(input_ids=out[:, :w + t]).logits
            assert logits[0, -1].argmax().item() == out[0, w + t].item()


def test_batched_equals_one_by_one(model):
    lengths = [12, 5, 9]
    prompts = [_ids(1, n, seed=i)[0] for i, n in enumerate(lengths)]
    batch = torch.zeros(3, max(lengths), dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, :len(p)] = p  # right padding; generate re-packs decoder-only prompts to the left
    out = model.generate(batch, max_new_tokens=7)
    for i, p in enumerate(prompts):
        single = model.generate(p[None], max_new_tokens=7)
        assert new_tokens(model, out, batch)[i].tolist() == new_tokens(model, single, p[None])[0].tolist()
        assert new_tokens(model, single, len(p)).shape == (1, 7)  # a prompt width works as well as the prompt
    if model.config.arch == "deconly":  # left-padded prompt + new tokens
        assert out[1, : max(lengths) - 5].eq(0).all() and out[1, max(lengths) - 5: max(lengths)].tolist() == prompts[1].tolist()


def test_beam_search_one_beam_is_greedy(model):
    prompt = _ids(2, 9, seed=5)
    greedy = model.generate(prompt, max_new_tokens=6, eos_token_id=7)
    cache = model.new_cache(2, prompt.shape[1] + 6)
    with torch.no_grad():
        start = torch.ones(2, 1, dtype=torch.long)
        logits = model.prefill(prompt, prompt != 0, cache, start if model.config.arch == "encdec" else None)
        beam = beam_search(model, logits, cache, num_beams=1, max_new_tokens=6, eos=7, pad=0)
    assert beam.tolist() == new_tokens(model, greedy, prompt)[:, :beam.shape[1]].tolist()


def _seq_logprob(model, prompt, new):
    with torch.no_grad():
        if model.config.arch == "encdec":
            dec = torch.cat([torch.ones(1, 1, dtype=torch.long), new], 1)
            logits = model(encoder_input_ids=prompt, decoder_input_ids=dec[:, :-1]).logits
        else:
            seq = torch.cat([prompt, new], 1)
            logits = model(input_ids=seq[:, :-1]).logits[:, prompt.shape[1] - 1:]
    return logits.log_softmax(-1).gather(-1, new[..., None]).sum().item()


def test_beam_search_finds_at_least_as_likely_sequences(model):
    prompt = _ids(1, 9, seed=11)
    greedy = new_tokens(model, model.generate(prompt, max_new_tokens=5), prompt)
    beam = new_tokens(model, model.generate(prompt, max_new_tokens=5, num_beams=4), prompt)
    assert beam.shape == greedy.shape
    assert _seq_logprob(model, prompt, beam) >= _seq_logprob(model, prompt, greedy) - 1e-4


def test_sampling_is_seeded_and_top_k_1_is_greedy(model):
    prompt = _ids(2, 8, seed=2)
    a = model.generate(prompt, max_new_tokens=6, do_sample=True, top_p=0.9, temperature=1.3,
                       generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, max_new_tokens=6, do_sample=True, top_p=0.9, temperature=1.3,
                       generator=torch.Generator().manual_seed(1))
    assert a.tolist() == b.tolist()
    k1 = model.generate(prompt, max_new_tokens=6, do_sample=True, top_k=1)
    assert k1.tolist() == model.generate(prompt, max_new_tokens=6).tolist()


def test_sampler_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    draws = {sample_logits(logits, True, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {0, 1}
    # softmax probs ~ [.64, .24, .09, ...]: top_p=0.7 keeps the two most likely tokens
    draws = {sample_logits(logits, True, top_p=0.7, generator=g).item() for _ in range(200)}
    assert draws == {0, 1}


def test_eos_stops_per_sequence_and_none_never_stops(model):
    prompt = _ids(2, 8, seed=4)
    free = model.generate(prompt, max_new_tokens=8)
    w = free.shape[1] - new_tokens(model, free, prompt).shape[1]
    assert free.shape[1] == w + 8 and w == (1 if model.config.arch == "encdec" else prompt.shape[1])
    eos = free[0, w + 2].item()  # make row 0 stop at its 3rd token
    out = model.generate(prompt, max_new_tokens=8, eos_token_id=eos)
    row0 = out[0, w:].tolist()
    first = row0.index(eos)
    assert all(t == 0 for t in row0[first + 1:])
    assert out[0, w:w + first + 1].tolist() == free[0, w:w + first + 1].tolist()


def test_streamer_gets_every_token(model):
    class Collect:
        def __init__(self):
            self.tokens, self.ended = [], False

        def put(self, t):
            self.tokens.append(t.tolist())

        def end(self):
            self.ended = True

    s = Collect()
    prompt = _ids(1, 6)
    out = model.generate(prompt, max_new_tokens=4, streamer=s)
    assert s.ended and [t[0] for t in s.tokens] == out[0, -4:].tolist()


def test_generate_runs_in_eval_mode_and_restores_the_modules_modes():
    """Generation runs every module in eval mode (no dropout) and leaves the model as it found a training one, or
    every module in eval mode where the model was (one module left training is switched off too); a quantized
    layer starts in the mode of the layer it replaced."""
    torch.manual_seed(0)
    model = mu.build_model("tiny", arch="encdec")  # (dropout 0.1: a generation in training mode differs)
    prompt = _ids(2, 7)
    want = model.eval().generate(prompt, max_new_tokens=5)
    model.train()
    assert torch.equal(model.generate(prompt, max_new_tokens=5), want)
    assert all(m.training for m in model.modules())
    model.eval()
    model.transformer.h[0].mlp.train()
    assert torch.equal(model.generate(prompt, max_new_tokens=5), want)
    assert not any(m.training for m in model.modules())
    model.quantize_("int8")
    assert not any(m.training for m in model.modules())


def test_cache_memory_is_output_sized_for_encdec():
    """The encoder-decoder's self-attention cache holds only the output; cross K/V once per layer."""
    torch.manual_seed(0)
    m = mu.build_model("tiny").eval()
    cache = m.new_cache(1, 1 + 4)
    with torch.no_grad():
        m.prefill(_ids(1, 40), None, cache, torch.ones(1, 1, dtype=torch.long))
    assert cache.k.shape[3] == 5 and len(cache.cross_kv) == m.config.n_decoder_layer
    assert cache.cross_kv[0][0].shape == (1, m.config.n_kv_head, 40, m.config.head_dim)
