import pytest

from mu.data.synthetic import synthetic_reading_comprehension, synthetic_splits, write_synthetic_splits
from mu.data.tasks import NO_ANSWER, load_examples
from mu.errors import MuError


def test_deterministic_by_seed():
    a = synthetic_reading_comprehension(200, seed=3)
    assert a == synthetic_reading_comprehension(200, seed=3)
    assert a != synthetic_reading_comprehension(200, seed=4)
    assert len(a) == 200 and len({r["id"] for r in a}) == 200
    assert set(a[0]) == {"id", "title", "context", "question", "answers"}


def test_answers_are_spans_and_a_third_unanswerable():
    rows = synthetic_reading_comprehension(3000, seed=0)
    for r in rows:
        assert all(ans in r["context"] for ans in r["answers"]), r
        assert r["question"].endswith("?")
    frac = sum(not r["answers"] for r in rows) / len(rows)
    assert 0.30 < frac < 0.37
    # unanswerable questions look answerable: many name a person of the paragraph
    names_present = sum(r["question"].split()[-1].rstrip("?").removesuffix("'s") in r["context"]
                        for r in rows if not r["answers"])
    assert names_present > 0.2 * sum(not r["answers"] for r in rows)


def test_knobs_change_difficulty():
    easy = synthetic_reading_comprehension(300, seed=0, facts_per_paragraph=2, entities=1, distractors=0,
                                           unanswerable=0.0)
    hard = synthetic_reading_comprehension(300, seed=0, facts_per_paragraph=8, entities=3, distractors=3,
                                           unanswerable=0.5)
    assert all(r["answers"] for r in easy)
    assert sum(len(r["context"]) for r in hard) > 2.5 * sum(len(r["context"]) for r in easy)
    assert 0.4 < sum(not r["answers"] for r in hard) / 300 < 0.6
    with pytest.raises(MuError):
        synthetic_reading_comprehension(10, entities=3, facts_per_paragraph=2)


def test_splits_share_no_paragraph_and_load(tmp_path):
    splits = synthetic_splits(600, 90, 90, seed=1)
    contexts = {k: {r["context"] for r in v} for k, v in splits.items()}
    assert not (contexts["train"] & contexts["val"] or contexts["train"] & contexts["test"]
                or contexts["val"] & contexts["test"])
    assert synthetic_splits(900, 90, 90, seed=1)["test"] == splits["test"]  # more train data: same test set
    paths = write_synthetic_splits(tmp_path, 60, 9, 9, seed=1)
    ex = load_examples("squad_v2", paths["train"])
    assert len(ex) == 60 and any(e.target == NO_ANSWER for e in ex)
    assert [e.id for e in load_examples("squad_v2", "synthetic:val:5")] == [
        r["id"] for r in synthetic_splits(0, 5, 1000)["val"]]


def test_closed_class_attributes_knob():
    from mu.data.synthetic import _CHOICES, ATTRIBUTES, CLOSED_CLASS

    rows = synthetic_reading_comprehension(600, seed=1, attributes=list(CLOSED_CLASS), entities=2,
                                           facts_per_paragraph=4, distractors=0)
    allowed = {v for attr in CLOSED_CLASS for v in _CHOICES[ATTRIBUTES[attr][0]]}
    answered = [r for r in rows if r["answers"]]
    assert answered and all(r["answers"][0] in allowed for r in answered)
    assert 0.2 < 1 - len(answered) / len(rows) < 0.45  # still about a third unanswerable
    with pytest.raises(MuError, match="spaceship"):
        synthetic_reading_comprehension(10, attributes=["job", "spaceship"])


# -- the word-level generator (the demo's default task) ---------------------------------------------


def test_word_level_task_is_single_token_and_deterministic():
    from mu.data.synthetic_words import ORDERS, word_example, word_splits, word_tokenizer

    splits = word_splits(300, 30, 60, seed=2)
    assert splits == word_splits(300, 30, 60, seed=2) and splits != word_splits(300, 30, 60, seed=3)
    assert word_splits(600, 30, 60, seed=2)["test"] == splits["test"]  # more training data: same test set
    contexts = {k: {r["context"] for r in v} for k, v in splits.items()}
    assert not (contexts["train"] & contexts["test"] or contexts["val"] & contexts["test"])
    tok = word_tokenizer()
    unk = tok.unk_token_id
    rows = splits["train"]
    assert 0.25 < sum(not r["answers"] for r in rows) / len(rows) < 0.42
    for r in rows:
        assert all(len(tok(a, add_special_tokens=False)["input_ids"]) == 1 for a in r["answers"])
        assert all(f" {a} " in f" {r['context']} " for a in r["answers"])
        for order in ORDERS:
            ex = word_example(r, order)
            ids = tok(ex.source, add_special_tokens=False)["input_ids"]
            assert unk not in ids and tok.decode(ids) == ex.source
    first, second = word_example(rows[0], "context_first"), word_example(rows[0], "question_first")
    assert first.source.startswith(rows[0]["context"]) and second.source.startswith("question " + rows[0]["question"])
    with pytest.raises(MuError, match="order"):
        word_example(rows[0], "sideways")


def test_question_kinds_follow_the_paragraph():
    from mu.data.synthetic_words import NEGATIVES, QUESTION_KINDS, paragraph_facts, question_kind, word_splits

    ctx = "anna plays the harp . anna plays golf on weekends . leo plays the cello . leo works as a chef ."
    assert paragraph_facts(ctx) == {("anna", "instrument"): "harp", ("anna", "sport"): "golf",
                                    ("leo", "instrument"): "cello", ("leo", "job"): "chef"}
    ask = lambda q, answers: question_kind({"context": ctx, "question": q, "answers": answers})  # noqa: E731
    assert ask("what instrument does anna play ?", ["harp"]) == "answerable_shared"  # leo plays one too
    assert ask("what sport does anna play ?", ["golf"]) == "answerable"
    assert ask("what sport does mira play ?", []) == "absent_person"
    assert ask("what pet does leo have ?", []) == "absent_attribute"
    assert ask("what sport does leo play ?", []) == "other_person"
    rows = word_splits(0, 600, 0, seed=4, negatives=NEGATIVES)["val"]
    kinds = [question_kind(r) for r in rows]
    assert set(kinds) == set(QUESTION_KINDS)
    assert all((k.startswith("answerable")) == bool(r["answers"]) for k, r in zip(kinds, rows))


def test_default_task_is_learnable_in_a_fixed_number_of_steps():
    """A 2-layer decoder-only model (width 64) leaves the abstain baseline on the demo's default task within
    400 steps of batch 32: answerable F1 >= 30 (abstaining scores 0 there). Counted in steps, not seconds."""
    import torch

    from mu.checkpoint import build_model
    from mu.data.batching import Collator, encode_examples
    from mu.data.synthetic_words import word_example, word_splits, word_tokenizer
    from mu.eval import evaluate_model
    from mu.train.objectives import seq2seq_loss

    steps, batch = 400, 32
    torch.manual_seed(0)
    tok = word_tokenizer()
    splits = word_splits(steps * batch, 256, 0, seed=0)
    feats = encode_examples([word_example(r) for r in splits["train"]], tok, 64, 4, task="squad_v2")
    model = build_model("tiny", arch="deconly", weight_init="fan_in", n_embd=64, qkv_embd=64, n_head=4, n_kv_head=2,
                        hidden_dim=256, n_decoder_layer=2, vocab_size=len(tok), dropout=0.0, block_size=128)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    collate = Collator("deconly")
    for i in range(steps):
        loss, _ = seq2seq_loss(model, collate(feats[i * batch:(i + 1) * batch]))
        loss.backward()
        opt.step()
        opt.zero_grad()
    metrics, _ = evaluate_model(model, tok, "squad_v2", [word_example(r) for r in splits["val"]], batch_size=128,
                                max_new_tokens=3, device="cpu", progress=False)
    assert metrics["HasAns_f1"] >= 30.0, metrics
