"""Synthetic SQuAD-2.0-style reading comprehension: the built-in data that needs no files.

A paragraph states facts about a few invented people ("Talvo was born in Brenmoor.", "Talvo works
as a baker.", "Mirek plays the cello.") plus distractor sentences about places and companies that
hold years and place names too. Each question asks for one attribute of one person, in one of
several paraphrases, and its answer is a span of the paragraph. About a third of the questions
(knob `unanswerable`) look answerable but are not:

* absent attribute: a person in the paragraph, an attribute the paragraph gives only for someone
  else (or for nobody): "Which instrument does Talvo play?" when only Mirek plays one;
* absent person: an attribute the paragraph does give, asked about a name that is not there.

Both kinds force a model to bind names to facts across the context: the skill that separates an
encoder-decoder (bidirectional encoding of the context) from a decoder-only model at small scale.
Names, places and companies are invented from syllables, so answers must be copied from the
context, not memorised. Everything is drawn from one `random.Random(seed)`: same seed, same data.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Iterator, Optional

from mu.atomic import atomic_write_text
from mu.errors import MuError

_ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "h", "j", "k", "kr", "l", "m", "n", "p", "r", "s", "sh", "st",
           "t", "tr", "v", "z", "th", "ch", "w"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou", "ia"]
_CODAS = ["", "", "", "n", "r", "l", "s", "k", "m", "th", "x", "nd", "rt"]
_PLACE_ENDINGS = ["ford", "ton", "vale", "mere", "wick", "holm", "burg", "field", "port", "bridge", "stead", "moor"]
_COMPANY_ENDINGS = ["Industries", "Works", "Labs", "Foods", "Textiles", "Motors", "Press", "Systems", "Mills"]
_RIVER_WORDS = ["river", "lake", "canal"]

OCCUPATIONS = ["baker", "pilot", "nurse", "teacher", "carpenter", "lawyer", "farmer", "chemist", "painter",
               "engineer", "librarian", "fisherman", "tailor", "architect", "dentist", "journalist", "potter",
               "surgeon", "gardener", "mechanic", "astronomer", "florist", "plumber", "sculptor"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "grey", "pink", "brown",
           "silver", "gold", "teal", "crimson", "violet"]
INSTRUMENTS = ["violin", "cello", "piano", "flute", "trumpet", "guitar", "harp", "clarinet", "drums", "oboe",
               "accordion", "banjo", "saxophone", "trombone"]
ANIMALS = ["cat", "dog", "parrot", "rabbit", "tortoise", "goldfish", "hamster", "ferret", "lizard", "pony",
           "goat", "canary"]
FOODS = ["pancakes", "lentil soup", "apple pie", "roast chicken", "noodles", "mushroom risotto", "fried rice",
         "plum cake", "cheese dumplings", "fish stew", "bean chili", "potato salad"]
SPORTS = ["tennis", "football", "rugby", "cricket", "hockey", "volleyball", "badminton", "rowing", "fencing",
          "golf", "basketball", "squash"]
PRODUCTS = ["bicycles", "paper", "glass bottles", "wool blankets", "clocks", "soap", "bricks", "rope", "candles"]


def _word(rng: random.Random, syllables: int) -> str:
    """An invented, pronounceable word ("Talo", "Mirek", "Zandaru"): open syllables, a coda at the end."""
    body = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))
    return (body + rng.choice(_CODAS)).capitalize()


# Each attribute: (kind of value, statements, questions). "{n}" is the person, "{v}" the value (the answer).
ATTRIBUTES: dict[str, tuple[str, list[str], list[str]]] = {
    "birthplace": ("place",
                   ["{n} was born in {v}.", "{n} was born in the town of {v}.", "{v} is the birthplace of {n}."],
                   ["Where was {n} born?", "In which town was {n} born?", "What is the birthplace of {n}?"]),
    "birth_year": ("year",
                   ["{n} was born in {v}.", "{n}'s year of birth is {v}.", "In {v}, {n} was born."],
                   ["In what year was {n} born?", "When was {n} born?", "What is {n}'s year of birth?"]),
    "home": ("place",
             ["{n} lives in {v}.", "{n} now lives in {v}.", "{n} has a house in {v}."],
             ["Where does {n} live?", "In which town does {n} live?", "Where is {n}'s house?"]),
    "job": ("occupation",
            ["{n} works as {a} {v}.", "{n} is {a} {v} by trade.", "By profession, {n} is {a} {v}."],
            ["What does {n} do for a living?", "What is {n}'s job?", "What is the profession of {n}?"]),
    "employer": ("company",
                 ["{n} works for {v}.", "{n} is employed by {v}.", "{v} employs {n}."],
                 ["Which company does {n} work for?", "Who employs {n}?", "Who is {n}'s employer?"]),
    "colour": ("colour",
               ["{n}'s favourite colour is {v}.", "{n} likes the colour {v} best.", "Of all colours, {n} prefers {v}."],
               ["What is {n}'s favourite colour?", "Which colour does {n} like best?", "What colour does {n} prefer?"]),
    "instrument": ("instrument",
                   ["{n} plays the {v}.", "{n} has played the {v} since childhood.",
                    "In the evenings, {n} plays the {v}."],
                   ["Which instrument does {n} play?", "What instrument does {n} play?",
                    "What musical instrument can {n} play?"]),
    "pet": ("animal",
            ["{n} has a pet {v}.", "{n} owns {a} {v}.", "{n} keeps {a} {v} at home."],
            ["What pet does {n} have?", "What animal does {n} own?", "What kind of pet does {n} keep?"]),
    "food": ("food",
             ["{n}'s favourite food is {v}.", "{n} loves eating {v}.", "Above all, {n} enjoys {v}."],
             ["What is {n}'s favourite food?", "What food does {n} love?", "What does {n} most enjoy eating?"]),
    "sport": ("sport",
              ["{n} plays {v} every weekend.", "On weekends, {n} plays {v}.", "{n} is a keen {v} player."],
              ["Which sport does {n} play?", "What sport does {n} play on weekends?", "What game does {n} play?"]),
    "friend": ("name",
               ["{n}'s best friend is {v}.", "{n} is best friends with {v}.", "{v} is {n}'s closest friend."],
               ["Who is {n}'s best friend?", "Who is the best friend of {n}?", "Who is {n}'s closest friend?"]),
    "age": ("age",
            ["{n} is {v} years old.", "{n} turned {v} this year.", "{n} is aged {v}."],
            ["How old is {n}?", "What age is {n}?", "How many years old is {n}?"]),
}

DISTRACTORS = [
    "The town of {p} lies on the {r} {w}.",
    "{p} was founded in {y}.",
    "A great storm hit {p} in {y}.",
    "{c} has a factory in {p} that makes {x}.",
    "{c} was founded in {y}.",
    "The market in {p} sells {x}.",
    "In {y}, a bridge was built across the {r} {w}.",
]

# Attributes whose values come from a fixed list (one or two words), not invented names: the easy ones.
CLOSED_CLASS = ("job", "colour", "instrument", "pet", "food", "sport")

_CHOICES = {"occupation": OCCUPATIONS, "colour": COLOURS, "instrument": INSTRUMENTS, "animal": ANIMALS,
            "food": FOODS, "sport": SPORTS}


class _Names:
    """Draws invented names, place names, companies and years, never repeating one within a paragraph
    and never one that contains, or is contained in, another (so answers and absent names are unambiguous)."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: list[str] = []

    def _fresh(self, make) -> str:
        for _ in range(100):
            s = make()
            low = s.lower()
            if not any(low in u.lower() or u.lower() in low for u in self.used):
                self.used.append(s)
                return s
        raise RuntimeError("could not draw a fresh name")  # 100 collisions in a row: not reachable in practice

    def person(self) -> str:
        return self._fresh(lambda: _word(self.rng, self.rng.choice([2, 2, 2, 3])))

    def place(self) -> str:
        return self._fresh(lambda: _word(self.rng, 1) + self.rng.choice(_PLACE_ENDINGS))

    def company(self) -> str:
        return self._fresh(lambda: _word(self.rng, 2) + " " + self.rng.choice(_COMPANY_ENDINGS))

    def year(self) -> str:
        return self._fresh(lambda: str(self.rng.randint(1850, 2015)))

    def value(self, kind: str) -> str:
        if kind == "place":
            return self.place()
        if kind == "company":
            return self.company()
        if kind == "year":
            return self.year()
        if kind == "name":
            return self.person()
        if kind == "age":
            return self._fresh(lambda: str(self.rng.randint(18, 95)))
        return self.rng.choice(_CHOICES[kind])  # common words may repeat across people


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _paragraph(rng: random.Random, entities: int, facts: int, distractors: int, paraphrase: bool,
               attrs: list[str]):
    """-> (context, people, facts {(person, attribute): value}, names in use)."""
    names = _Names(rng)
    people = [names.person() for _ in range(entities)]
    per_person = [facts // entities + (i < facts % entities) for i in range(entities)]
    known: dict[tuple[str, str], str] = {}
    groups: list[list[str]] = []
    for person, k in zip(people, per_person):
        chosen = rng.sample(attrs, min(k, len(attrs)))
        sentences = []
        for attr in chosen:
            kind, statements, _ = ATTRIBUTES[attr]
            value = names.value(kind)
            known[(person, attr)] = value
            template = rng.choice(statements) if paraphrase else statements[0]
            sentences.append(template.format(n=person, v=value, a=_article(value)))
        groups.append(sentences)
    sentences = [s for g in groups for s in g]  # grouped by person, like real prose
    for _ in range(distractors):
        s = rng.choice(DISTRACTORS).format(p=names.place(), y=names.year(), c=names.company(),
                                           x=rng.choice(PRODUCTS), r=names.person(), w=rng.choice(_RIVER_WORDS))
        sentences.insert(rng.randint(0, len(sentences)), s)
    return " ".join(sentences), people, known, names


def _question(rng: random.Random, attr: str, person: str, paraphrase: bool) -> str:
    questions = ATTRIBUTES[attr][2]
    return (rng.choice(questions) if paraphrase else questions[0]).format(n=person)


def iter_synthetic(seed: int = 0, facts_per_paragraph: int = 5, entities: int = 2, distractors: int = 1,
                   unanswerable: float = 1 / 3, questions_per_paragraph: int = 3, paraphrase: bool = True,
                   attributes: Optional[list[str]] = None, id_prefix: str = "syn") -> Iterator[list[dict]]:
    """Endless paragraphs, each as the list of its questions (SQuAD schema dicts)."""
    attrs = list(ATTRIBUTES) if attributes is None else list(attributes)
    unknown = sorted(set(attrs) - set(ATTRIBUTES))
    if unknown or len(attrs) < 2:
        raise MuError(f"attributes {unknown or attrs} invalid: choose at least two of {sorted(ATTRIBUTES)} "
                      f"(closed-class ones, with answers from a fixed list: {sorted(CLOSED_CLASS)})")
    if entities < 1 or facts_per_paragraph < entities:
        raise MuError(f"need entities >= 1 and facts_per_paragraph >= entities, got entities={entities}, "
                      f"facts_per_paragraph={facts_per_paragraph}")
    if not 0.0 <= unanswerable <= 1.0:
        raise MuError(f"unanswerable is a fraction in [0, 1], got {unanswerable}")
    if distractors < 0 or questions_per_paragraph < 1:
        raise MuError("distractors must be >= 0 and questions_per_paragraph >= 1")
    rng = random.Random(seed)
    p = 0
    while True:
        context, people, known, names = _paragraph(rng, entities, facts_per_paragraph, distractors, paraphrase,
                                                   attrs)
        present_attrs = sorted({a for _, a in known})
        answerable = list(known)
        rng.shuffle(answerable)
        asked: set[tuple[str, str]] = set()
        questions = []
        for q in range(questions_per_paragraph):
            if rng.random() < unanswerable:
                if rng.random() < 0.5:  # absent attribute of a present person, preferably one someone else has
                    person = rng.choice(people)
                    missing = [a for a in attrs if (person, a) not in known]
                    elsewhere = [a for a in missing if a in present_attrs]
                    attr = rng.choice(elsewhere if elsewhere and rng.random() < 0.75 else missing)
                else:  # a present attribute, asked about a person who is not in the paragraph
                    person, attr = names.person(), rng.choice(present_attrs)
                if (person, attr) in asked:
                    continue
                answers: list[str] = []
            else:
                fresh = [k for k in answerable if k not in asked]
                if not fresh:
                    continue
                person, attr = fresh[0]
                answers = [known[(person, attr)]]
            asked.add((person, attr))
            questions.append({"id": f"{id_prefix}-{seed}-{p}-{q}", "title": f"{id_prefix}-{seed}-{p}",
                              "context": context, "question": _question(rng, attr, person, paraphrase),
                              "answers": answers})
        p += 1
        yield questions


def synthetic_reading_comprehension(n: int, seed: int = 0, **knobs) -> list[dict]:
    """`n` SQuAD-2.0-schema dicts {"id", "title", "context", "question", "answers"} ([] = unanswerable).

    Knobs (difficulty): facts_per_paragraph=5 (facts about people, spread over `entities`), entities=2
    (people per paragraph), distractors=1 (sentences about places/companies with years and names),
    unanswerable=1/3 (fraction of questions with no answer), questions_per_paragraph=3, paraphrase=True
    (vary the wording of facts and questions), attributes=None (all of ATTRIBUTES; e.g. CLOSED_CLASS for
    answers from fixed word lists only). Deterministic for the same seed and knobs.
    """
    out: list[dict] = []
    for questions in iter_synthetic(seed, **knobs):
        out.extend(questions[:n - len(out)])
        if len(out) >= n:
            return out
    return out


def synthetic_splits(n_train: int, n_val: int, n_test: int, seed: int = 0, **knobs) -> dict[str, list[dict]]:
    """Train/val/test lists drawn from one stream of paragraphs; no paragraph is in two splits.

    The stream fills test, then val, then train, so a bigger `n_train` leaves val and test unchanged."""
    return split_stream(iter_synthetic(seed, **knobs), n_train, n_val, n_test)


def split_stream(stream: Iterator[list[dict]], n_train: int, n_val: int, n_test: int) -> dict[str, list[dict]]:
    """Fill test, then val, then train from a stream of paragraphs (lists of question records); a paragraph
    never straddles two splits."""
    sizes = {"test": n_test, "val": n_val, "train": n_train}
    if any(v < 0 for v in sizes.values()):
        raise MuError(f"split sizes must be >= 0, got {sizes}")
    splits: dict[str, list[dict]] = {name: [] for name in sizes}  # filled in this order
    for name, size in sizes.items():
        while len(splits[name]) < size:
            questions = next(stream)
            splits[name].extend(questions[:size - len(splits[name])])
    return {name: splits[name] for name in ("train", "val", "test")}


def write_synthetic_splits(out_dir: str | os.PathLike, n_train: int, n_val: int, n_test: int, seed: int = 0,
                           **knobs) -> dict[str, Path]:
    """Write train.jsonl / val.jsonl / test.jsonl (SQuAD schema, paragraph-disjoint) atomically into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, records in synthetic_splits(n_train, n_val, n_test, seed, **knobs).items():
        paths[name] = atomic_write_text(out_dir / f"{name}.jsonl",
                                        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return paths


# "synthetic:SPLIT[:N]" data specs (e.g. `mu train --train-data synthetic:train`): fixed default sizes and seed 0.
DEFAULT_SPLIT_SIZES = {"train": 20000, "val": 500, "test": 1000}


def synthetic_split(spec: str) -> list[dict]:
    """"synthetic:train", "synthetic:val", "synthetic:test", optionally ":N" to take the first N."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[0] != "synthetic" or parts[1] not in DEFAULT_SPLIT_SIZES:
        raise MuError(f"bad synthetic data spec {spec!r}; expected synthetic:train|val|test[:N]")
    n: Optional[int] = None
    if len(parts) == 3:
        if not parts[2].isdigit():
            raise MuError(f"bad synthetic data spec {spec!r}: N must be a whole number, got {parts[2]!r}")
        n = int(parts[2])
    sizes = dict(DEFAULT_SPLIT_SIZES)
    if n is not None and n > sizes[parts[1]]:
        sizes[parts[1]] = n
    records = synthetic_splits(sizes["train"], sizes["val"], sizes["test"], seed=0)[parts[1]]
    return records[:n] if n is not None else records
