"""Pretraining objectives (span corruption, prefix LM, causal LM), FLOPs accounting, optimiser and schedules."""

import math
import random

import pytest

import mu
from mu.data.batching import IGNORE_INDEX, Collator
from mu.train.flops import flops_params, training_flops
from mu.train.objectives import (NUM_SENTINELS, PretrainDataset, check_objective, chunk_documents,
                                 random_spans_noise_mask, sentinel_id, span_corruption)
from mu.train.optim import LRSchedule, param_groups, warmup_steps

V = 384  # byte tokenizer (260) + 100 sentinels, rounded up to 64
EOS = 2


def _uncorrupt(source, target, vocab_size):
    """Put each sentinel's span back into the source."""
    spans, current = {}, None
    for t in target[:-1]:
        if t >= vocab_size - NUM_SENTINELS:
            current = t
            spans[t] = []
        else:
            spans[current].append(t)
    out = []
    for t in source:
        out.extend(spans[t] if t in spans else [t])
    return out


def test_span_corruption_masks_15_percent_in_sentinel_spans_and_is_reversible():
    ids = list(range(4, 260)) * 2  # 512 tokens, none a sentinel
    source, target = span_corruption(ids, random.Random(0), V, EOS)
    assert _uncorrupt(source, target, V) == ids
    sentinels = [t for t in source if t >= V - NUM_SENTINELS]
    assert sentinels == [sentinel_id(V, k) for k in range(len(sentinels))]  # <extra_id_0>, <extra_id_1>, ...
    assert sentinels[0] == V - 1 and min(sentinels) >= 260  # above every tokenizer id
    noisy = len(target) - 1 - len(sentinels)
    assert noisy == round(0.15 * 512)
    assert abs(noisy / len(sentinels) - 3.0) < 0.5  # mean span length 3
    assert target[-1] == EOS and source[0] != sentinels[0]  # the sequence starts clean


def test_noise_mask_alternates_clean_and_noisy_spans():
    mask = random_spans_noise_mask(100, 0.15, 3.0, random.Random(1))
    assert len(mask) == 100 and sum(mask) == 15 and not mask[0]
    starts = sum(1 for i in range(1, 100) if mask[i] and not mask[i - 1])
    assert starts == 5


def test_pretraining_features_are_deterministic_per_epoch():
    chunks = [list(range(4, 68)), list(range(70, 134))]
    span = PretrainDataset(chunks, "span", V, EOS, seed=3)
    assert span.get(0, 0) == span.get(0, 0)
    assert span.get(0, 0) != span.get(0, 1)  # re-corrupted each epoch
    prefix = PretrainDataset(chunks, "prefix", V, EOS, seed=3).get(1, 0)
    assert prefix["source_ids"] + prefix["target_ids"] == chunks[1]
    assert prefix["source_ids"] and prefix["target_ids"]


def test_causal_lm_scores_every_position_and_prefix_lm_only_the_suffix():
    chunk = list(range(10, 20))
    causal = Collator("deconly")([PretrainDataset([chunk], "causal", V, EOS).get(0, 0)])
    assert causal["input_ids"][0].tolist() == [1] + chunk[:-1]
    assert causal["targets"][0].tolist() == chunk
    f = PretrainDataset([chunk], "prefix", V, EOS, seed=0).get(0, 0)
    k = len(f["source_ids"])
    prefix = Collator("deconly")([f])
    assert prefix["targets"][0].tolist() == [IGNORE_INDEX] * (k - 1) + chunk[k:]


def test_chunk_documents_joins_with_eos_and_drops_the_tail():
    chunks = chunk_documents([[5, 6, 7], [8, 9], [10]], seq_len=4, eos_token_id=EOS)
    assert chunks == [[5, 6, 7, EOS], [8, 9, EOS, 10]]


def test_objective_arch_pairs():
    check_objective("span", "encdec")
    check_objective("causal", "deconly")
    check_objective("prefix", "deconly")
    for objective, arch in (("span", "deconly"), ("causal", "encdec"), ("mlm", "encdec")):
        with pytest.raises(mu.MuError):
            check_objective(objective, arch)


def test_flops_count_each_stack_for_its_own_tokens():
    cfg = mu.MuConfig.from_name("tiny", "encdec")
    model = mu.build_model(cfg)
    p = flops_params(cfg)
    assert p.total == model.num_parameters()
    cross_kv = sum(q.numel() for n, q in model.named_parameters() if ".cross_attn.k_linear" in n
                   or ".cross_attn.v_linear" in n)
    encoder = sum(q.numel() for n, q in model.named_parameters()
                  if n.startswith(("transformer.e.", "transformer.ln_e")))
    assert p.encoder == encoder + cross_kv
    assert training_flops(cfg, 1000, 0) == 6 * p.encoder * 1000
    assert training_flops(cfg, 0, 10) == 6 * p.decoder * 10
    assert p.decoder >= cfg.vocab_size * cfg.n_embd  # lm_head counted on decoder tokens
    dec = mu.MuConfig.from_name("tiny", "deconly")
    assert training_flops(dec, 0, 50) == 6 * mu.build_model(dec).num_parameters() * 50
    with pytest.raises(ValueError):
        training_flops(dec, 10, 10)


def test_weight_decay_only_on_matrices():
    model = mu.build_model("tiny", arch="encdec")
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert any(p is model.transformer.wte.weight for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)


def test_schedules():
    cos = LRSchedule(1.0, total_steps=100, warmup_steps=10, name="cosine", min_lr_ratio=0.1)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(10) == pytest.approx(1.0) and cos(55) == pytest.approx(0.55)
    assert cos(100) == pytest.approx(0.1) and cos(150) == pytest.approx(0.1)
    lrs = [cos(s) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    wsd = LRSchedule(1.0, total_steps=100, warmup_steps=10, name="wsd", min_lr_ratio=0.0, decay_fraction=0.2)
    assert wsd(50) == 1.0 and wsd(79) == 1.0 and wsd(90) == pytest.approx(0.5) and wsd(100) == 0.0
    assert LRSchedule(1.0, 100, 0, "constant")(99) == 1.0
    assert warmup_steps(0.05, 200) == 10 and warmup_steps(30, 200) == 30 and warmup_steps(500, 200) == 200
    assert math.isclose(LRSchedule(2.0, 10, 0, "cosine", 0.0)(5), 1.0)
