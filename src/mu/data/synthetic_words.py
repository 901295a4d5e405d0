"""Word-level synthetic reading comprehension: one token per word, learnable by a tiny model in minutes.

    from mu.data.synthetic_words import word_splits, word_tokenizer, word_example
    splits = word_splits(12000, 300, 600, seed=0)                 # SQuAD-schema dicts, paragraph-disjoint
    tok = word_tokenizer()                                       # every word the generator can write
    ex = word_example(splits["test"][0], order="context_first")  # -> mu.data.tasks.Example

The harder, BPE-tokenised generator is `mu.data.synthetic`; this one fixes what kept tiny models at
the abstain baseline there: every name and every value is a single word of a closed vocabulary (a
word-level tokenizer gives it one id), each attribute has one statement and one question template,
and prompts are ~40 tokens. Records use the SQuAD 2.0 schema ({"id", "title", "context", "question",
"answers"}; [] = unanswerable), so the usual loaders and metrics apply.

Two prompt orders (`ORDERS`), the demo's two task families:
    context_first   "<context> question <question>"  the question after the context
    question_first  "question <question> context <context>"  the question first (the paper's SQuAD prompt order)
A decoder-only model reads left to right, so only with the question first does it know, while reading
the context, what it is looking for; a bidirectional encoder sees both orders the same way.
"""

from __future__ import annotations

import random
from typing import Iterator

from mu.data.synthetic import split_stream
from mu.errors import MuError

NAMES = ["anna", "bruno", "clara", "dmitri", "elena", "felix", "greta", "hugo", "ines", "jonas", "karla", "leo",
         "mira", "nils", "olga", "pablo", "rosa", "sven", "tara", "umar", "vera", "wim", "yara", "zeno"]
# attribute -> (values, statement, question); "{n}" the person, "{v}" the value. One template each.
WORD_ATTRIBUTES: dict[str, tuple[list[str], str, str]] = {
    "job": (["baker", "doctor", "farmer", "pilot", "teacher", "nurse", "lawyer", "painter", "plumber", "chef",
             "writer", "tailor"], "{n} works as a {v} .", "what is the job of {n} ?"),
    "colour": (["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "grey", "pink", "brown",
                "silver"], "{n} likes the colour {v} .", "what colour does {n} like ?"),
    "instrument": (["violin", "cello", "piano", "flute", "trumpet", "guitar", "harp", "clarinet", "drums", "oboe",
                    "banjo", "trombone"], "{n} plays the {v} .", "what instrument does {n} play ?"),
    "pet": (["cat", "dog", "parrot", "rabbit", "tortoise", "goldfish", "hamster", "ferret", "lizard", "pony",
             "goat", "canary"], "{n} has a pet {v} .", "what pet does {n} have ?"),
    "food": (["pancakes", "soup", "pie", "chicken", "noodles", "risotto", "rice", "cake", "dumplings", "stew",
              "chili", "salad"], "{n} loves to eat {v} .", "what food does {n} love ?"),
    "sport": (["tennis", "football", "rugby", "cricket", "hockey", "volleyball", "badminton", "rowing", "fencing",
               "golf", "basketball", "squash"], "{n} plays {v} on weekends .", "what sport does {n} play ?"),
}
ORDERS = ("context_first", "question_first")
NO_ANSWER = "unanswerable"  # = mu.data.tasks.NO_ANSWER (the target of an unanswerable question)


NEGATIVES = ("absent_person", "absent_attribute", "other_person")  # kinds of unanswerable question


def iter_word_paragraphs(seed: int = 0, entities: int = 2, facts_per_paragraph: int = 4,
                         questions_per_paragraph: int = 3, unanswerable: float = 1 / 3,
                         negatives: tuple[str, ...] = ("absent_person", "absent_attribute"),
                         id_prefix: str = "word") -> Iterator[list[dict]]:
    """Endless paragraphs, each as the list of its questions (SQuAD schema dicts).

    Unanswerable questions are drawn evenly from the kinds in `negatives`: "absent_person" (someone not in
    the paragraph, about an attribute that is there), "absent_attribute" (a person of the paragraph, about an
    attribute nobody there has), "other_person" (a person of the paragraph, about an attribute only someone
    else has: the model must bind each value to its person; the hard kind, off by default)."""
    attrs = list(WORD_ATTRIBUTES)
    negatives = tuple(negatives)
    if not negatives or set(negatives) - set(NEGATIVES):
        raise MuError(f"negatives {list(negatives)}: expected some of {list(NEGATIVES)}")
    if not 1 <= entities <= len(NAMES) // 2 or not entities <= facts_per_paragraph <= entities * len(attrs):
        raise MuError(f"need 1 <= entities <= {len(NAMES) // 2} and entities <= facts_per_paragraph <= "
                      f"{len(attrs)} x entities, got entities={entities}, facts_per_paragraph={facts_per_paragraph}")
    if not 0.0 <= unanswerable <= 1.0 or questions_per_paragraph < 1:
        raise MuError(f"need unanswerable in [0, 1] and questions_per_paragraph >= 1, got {unanswerable}, "
                      f"{questions_per_paragraph}")
    rng = random.Random(seed)
    p = 0
    while True:
        people = rng.sample(NAMES, entities)
        per_person = [facts_per_paragraph // entities + (i < facts_per_paragraph % entities) for i in range(entities)]
        known: dict[tuple[str, str], str] = {}
        sentences = []
        for person, k in zip(people, per_person):
            for attr in rng.sample(attrs, k):
                values, statement, _ = WORD_ATTRIBUTES[attr]
                known[(person, attr)] = rng.choice(values)
                sentences.append(statement.format(n=person, v=known[(person, attr)]))
        context = " ".join(sentences)
        present = sorted({a for _, a in known})
        fresh = list(known)
        rng.shuffle(fresh)
        asked: set[tuple[str, str]] = set()
        questions = []
        for q in range(questions_per_paragraph):
            if rng.random() < unanswerable:
                kind = rng.choice(negatives)
                person = rng.choice(people)
                if kind == "absent_person":
                    person, attr = rng.choice([n for n in NAMES if n not in people]), rng.choice(present)
                else:
                    pool = ([a for a in attrs if a not in present] if kind == "absent_attribute" else
                            [a for a in present if (person, a) not in known])
                    if not pool:  # every attribute is there / this person has all of them: ask another kind
                        pool = [a for a in attrs if (person, a) not in known]
                    attr = rng.choice(pool)
                answers: list[str] = []
            else:
                left = [k for k in fresh if k not in asked]
                if not left:
                    continue
                person, attr = left[0]
                answers = [known[(person, attr)]]
            if (person, attr) in asked:
                continue
            asked.add((person, attr))
            questions.append({"id": f"{id_prefix}-{seed}-{p}-{q}", "title": f"{id_prefix}-{seed}-{p}",
                              "context": context, "question": WORD_ATTRIBUTES[attr][2].format(n=person),
                              "answers": answers})
        p += 1
        yield questions


QUESTION_KINDS = ("answerable", "answerable_shared") + NEGATIVES  # what `question_kind` returns


def paragraph_facts(context: str) -> dict[tuple[str, str], str]:
    """{(person, attribute): value} of a paragraph written by `iter_word_paragraphs`."""
    facts = {}
    for sentence in context.split(" . "):
        words = sentence.rstrip(" .").split()
        for attr, (values, statement, _) in WORD_ATTRIBUTES.items():
            pattern = statement.rstrip(" .").split()
            if len(words) == len(pattern) and all(p in ("{n}", "{v}") or p == w for p, w in zip(pattern, words)):
                facts[(words[pattern.index("{n}")], attr)] = words[pattern.index("{v}")]
                break
    return facts


def question_kind(record: dict) -> str:
    """What a question asks of a model (one of `QUESTION_KINDS`): "answerable" (only the asked person has the
    attribute), "answerable_shared" (the other person has it too: the value must be bound to its person), or
    the kind of unanswerable question (`NEGATIVES`)."""
    facts = paragraph_facts(record["context"])
    words = record["question"].split()
    person = next(w for w in words if w in NAMES)
    attr = next(a for a, (_, _, q) in WORD_ATTRIBUTES.items()
                if len(q.split()) == len(words) and all(p == "{n}" or p == w for p, w in zip(q.split(), words)))
    holders = {n for (n, a) in facts if a == attr}
    if record["answers"]:
        return "answerable_shared" if len(holders) > 1 else "answerable"
    if person not in {n for n, _ in facts}:
        return "absent_person"
    return "other_person" if holders else "absent_attribute"


def word_splits(n_train: int, n_val: int, n_test: int, seed: int = 0, **knobs) -> dict[str, list[dict]]:
    """Train/val/test from one stream of paragraphs (test first, then val, then train; no paragraph in two
    splits), so a bigger `n_train` leaves val and test unchanged."""
    return split_stream(iter_word_paragraphs(seed, **knobs), n_train, n_val, n_test)


def word_prompt(record: dict, order: str = "context_first") -> str:
    """The prompt of a SQuAD-schema record in one of `ORDERS`."""
    if order == "context_first":
        return f"{record['context']} question {record['question']}"
    if order == "question_first":
        return f"question {record['question']} context {record['context']}"
    raise MuError(f"unknown prompt order {order!r}; expected one of {ORDERS}")


def word_follow_up(record: dict) -> str:
    """The prompt of a later question about a paragraph the reader has read already (a teacher document's
    next question, in either order): the end of a context-first prompt."""
    return f"question {record['question']}"


def word_example(record: dict, order: str = "context_first"):
    """A SQuAD-schema record -> `mu.data.tasks.Example` with the word-level prompt (target: answer or NO_ANSWER)."""
    from mu.data.tasks import Example

    answers = list(record["answers"])
    return Example(str(record["id"]), word_prompt(record, order), answers[0] if answers else NO_ANSWER, answers)


def vocabulary() -> list[str]:
    """Every word the generator and `word_prompt` can write, sorted."""
    words = set(NAMES) | {NO_ANSWER, "question", "context"}
    for values, statement, question in WORD_ATTRIBUTES.values():
        words |= set(values) | set(statement.split()) | set(question.split())
    return sorted(words - {"{n}", "{v}"})


def word_tokenizer(words: list[str] | None = None):
    """A word-level `transformers` fast tokenizer (built with `tokenizers`): mu's specials at ids 0-3
    (pad, BOS, EOS, unknown), then one id per word of `words` (default: `vocabulary()`); splits on
    whitespace, decodes by joining with spaces. Save it with `save_pretrained`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mu.tokenizer import SPECIAL_TOKENS

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for w in sorted(set(vocabulary() if words is None else words) - set(vocab)):
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", padding_side="right", clean_up_tokenization_spaces=False)
