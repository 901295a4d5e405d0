"""Tokenisation, collation (both architectures see the same tokens), dynamic padding, length grouping."""

import random
import warnings

import pytest
import torch

from mu.data.batching import (IGNORE_INDEX, Collator, TruncationWarning, encode_examples, length_grouped_batches,
                              pack_documents, padding_fraction)
from mu.data.tasks import Example, load_examples
from mu.tokenizer import BOS_ID, EOS_ID, byte_tokenizer

FEATURES = [{"source_ids": [10, 11, 12], "target_ids": [20, 21, EOS_ID], "index": 0},
            {"source_ids": [13], "target_ids": [22, EOS_ID], "index": 1}]


def test_encdec_collation_shifts_target_and_pads_dynamically():
    b = Collator("encdec")(FEATURES)
    assert b["encoder_input_ids"].tolist() == [[10, 11, 12], [13, 0, 0]]
    assert b["decoder_input_ids"].tolist() == [[BOS_ID, 20, 21], [BOS_ID, 22, 0]]
    assert b["targets"].tolist() == [[20, 21, EOS_ID], [22, EOS_ID, IGNORE_INDEX]]
    assert b["encoder_attention_mask"].tolist() == [[True] * 3, [True, False, False]]
    assert b["decoder_attention_mask"].tolist() == [[True] * 3, [True, True, False]]
    assert (b["n_loss_tokens"], b["n_enc_tokens"], b["n_dec_tokens"]) == (5, 4, 5)
    assert b["index"].tolist() == [0, 1]


def test_deconly_collation_scores_only_target_tokens():
    b = Collator("deconly")(FEATURES)
    assert b["input_ids"].tolist() == [[10, 11, 12, 20, 21], [13, 22, 0, 0, 0]]
    assert b["targets"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 20, 21, EOS_ID],
                                     [22, EOS_ID, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
    assert b["attention_mask"].sum(1).tolist() == [5, 2]
    # the same target positions are scored as by the encoder-decoder
    assert b["n_loss_tokens"] == Collator("encdec")(FEATURES)["n_loss_tokens"]
    assert (b["n_enc_tokens"], b["n_dec_tokens"]) == (0, 7)


def test_sourceless_decoder_only_sequence_starts_with_bos():
    b = Collator("deconly")([{"source_ids": [], "target_ids": [5, 6, 7]}])
    assert b["input_ids"].tolist() == [[BOS_ID, 5, 6]]
    assert b["targets"].tolist() == [[5, 6, 7]]


def test_pack_documents_joins_each_group_in_order_and_scores_all_but_the_first_token():
    # paragraph "p" (prompt [10, 11, 12, 30]) with a follow-up question [31, 32]; paragraph "q" with one question
    feats = [{"source_ids": [10, 11, 12, 30], "target_ids": [20, EOS_ID]},
             {"source_ids": [40, 41], "target_ids": [22, EOS_ID]},
             {"source_ids": [31, 32], "target_ids": [21, EOS_ID]}]
    docs = pack_documents(feats, ["p", "q", "p"])
    assert docs == [{"source_ids": [10], "target_ids": [11, 12, 30, 20, EOS_ID, 31, 32, 21, EOS_ID], "index": 0},
                    {"source_ids": [40], "target_ids": [41, 22, EOS_ID], "index": 1}]
    b = Collator("deconly")(docs)
    assert b["targets"][0].tolist() == docs[0]["target_ids"]  # every token after the first is scored
    with pytest.raises(ValueError):
        pack_documents(feats, ["p"])


def test_pad_to_multiple_and_width_follows_the_batch_not_the_dataset():
    long = {"source_ids": list(range(4, 100)), "target_ids": [5, EOS_ID]}
    short = Collator("encdec")(FEATURES)
    assert short["encoder_input_ids"].shape[1] == 3  # not 96: padding is per batch
    assert Collator("encdec")([long])["encoder_input_ids"].shape[1] == 96
    padded = Collator("encdec", pad_to_multiple_of=8)(FEATURES)
    assert padded["encoder_input_ids"].shape[1] == 8 and padded["targets"].shape[1] == 8
    assert padded["n_loss_tokens"] == short["n_loss_tokens"]


def test_collated_batch_trains_both_models_with_the_right_masks():
    import mu

    torch.manual_seed(0)
    for arch in ("encdec", "deconly"):
        model = mu.build_model("tiny", arch=arch, dropout=0.0).eval()
        b = Collator(arch)(FEATURES)
        keys = ("encoder_input_ids", "decoder_input_ids", "encoder_attention_mask", "decoder_attention_mask") \
            if arch == "encdec" else ("input_ids", "attention_mask")
        batched = model(**{k: b[k] for k in keys}, targets=b["targets"]).logits
        one = Collator(arch)(FEATURES[1:])  # the short row alone, without padding
        alone = model(**{k: one[k] for k in keys}).logits
        n = one["targets"].shape[1]
        torch.testing.assert_close(batched[1, :n], alone[0], atol=1e-5, rtol=1e-4)


def test_encode_examples_appends_eos_and_warns_once_with_counts():
    tok = byte_tokenizer()
    examples = [Example("a", "x" * 50, "yy", []), Example("b", "short", "z" * 20, []), Example("c", "ok", "ok", [])]
    with pytest.warns(TruncationWarning) as record:
        feats = encode_examples(examples, tok, max_source_len=10, max_target_len=8)
    assert len(record) == 1
    assert str(record[0].message) == ("2 of 3 examples were truncated (1 sources longer than max_source_len=10 "
                                      "tokens, 1 targets longer than max_target_len=8)")
    assert [len(f["source_ids"]) for f in feats] == [10, 5, 2]
    assert [len(f["target_ids"]) for f in feats] == [3, 9, 3]
    assert all(f["target_ids"][-1] == EOS_ID for f in feats)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode_examples(examples[2:], tok, 10, 8)  # nothing cut: no warning


def test_truncated_squad_prompt_keeps_its_answer_marker(shared_data):
    tok = byte_tokenizer()
    ex = load_examples("squad_v2", shared_data / "squad_v2_dev.jsonl", limit=1)
    with pytest.warns(TruncationWarning):
        (feat,) = encode_examples(ex, tok, max_source_len=120, max_target_len=32, task="squad_v2")
    text = tok.decode(feat["source_ids"])
    assert len(feat["source_ids"]) == 120
    assert text.startswith("Answer the following question") and text.endswith("###Answer\n")


def test_length_grouped_batches_are_deterministic_complete_and_pad_less():
    rng = random.Random(0)
    lengths = [rng.randint(5, 500) for _ in range(1000)]
    a = length_grouped_batches(lengths, 16, seed=1, epoch=0)
    assert a == length_grouped_batches(lengths, 16, seed=1, epoch=0)
    assert a != length_grouped_batches(lengths, 16, seed=1, epoch=1)
    assert a != length_grouped_batches(lengths, 16, seed=2, epoch=0)
    assert sorted(i for b in a for i in b) == list(range(1000))
    assert max(lengths[i] for i in a[0]) == max(lengths)  # the longest batch first: OOM shows at step 1
    order = list(range(1000))
    random.Random(0).shuffle(order)
    unsorted = [order[i:i + 16] for i in range(0, 1000, 16)]
    assert padding_fraction(a, lengths) < 0.25 * padding_fraction(unsorted, lengths)


def test_validation_batches_are_sorted_without_shuffling():
    lengths = [3, 9, 1, 7]
    assert length_grouped_batches(lengths, 2, shuffle=False) == [[1, 3], [0, 2]]
