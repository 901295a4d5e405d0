"""VQA accuracy with the official answer normalisation.

Normalisation follows the VQA evaluation script (Antol et al.; github.com/GT-Vision-Lab/VQA
`vqaEval.py`), rewritten here: spaces for newlines/tabs, punctuation removed (or turned into a
space when it separates words), a period not followed by a digit dropped, lowercase, number words to
digits ("two" -> "2"), articles (a, an, the) dropped, common contractions given their apostrophe.
Score per question: min(#references equal to the prediction / 3, 1) when there are several
references (VQA v2 has 10 human answers), exact match when there is one.
"""

from __future__ import annotations

import re
from typing import Sequence

_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD = re.compile(r"\.(?!\d)")  # the official pattern's effective behaviour
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {  # a subset of the official table: the forms a model is likely to produce
    "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't", "isnt": "isn't",
    "its": "it's", "shouldnt": "shouldn't", "thats": "that's", "theres": "there's", "theyre": "they're",
    "wasnt": "wasn't", "werent": "weren't", "whats": "what's", "wont": "won't", "wouldnt": "wouldn't",
    "youre": "you're", "im": "i'm", "ive": "i've", "lets": "let's",
}


def normalize_answer(answer: str) -> str:
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    original = text
    for p in _PUNCT:  # the official rule: delete next to a space or inside a number, else a space
        if (p + " " in original or " " + p in original) or _COMMA_IN_NUMBER.search(original):
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = _PERIOD.sub("", text)
    words = []
    for w in text.lower().split():
        w = _NUMBERS.get(w, w)
        if w not in _ARTICLES:
            words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def vqa_score(prediction: str, answers: Sequence[str]) -> float:
    """One question's score in [0, 1] (see the module docstring)."""
    if not answers:
        raise ValueError("vqa_score needs at least one reference answer")
    pred = normalize_answer(prediction)
    refs = [normalize_answer(a) for a in answers]
    if len(refs) == 1:
        return float(pred == refs[0])
    return min(sum(r == pred for r in refs) / 3.0, 1.0)


def vqa_accuracy(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean `vqa_score` over questions."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} questions")
    if not predictions:
        return 0.0
    return sum(vqa_score(p, r) for p, r in zip(predictions, references)) / len(predictions)


def is_negated(question: str) -> bool:
    """An easy-VQA style negated yes/no question ("is there not a red shape?", "is no circle present?")."""
    return " not " in question or question.startswith("is no ")


def yes_no_by_presence(examples, predictions) -> dict[str, float]:
    """Yes/no accuracy split by whether the thing the question names is in the picture ("present": the answer
    is yes, or no to a negated question; "absent" otherwise). 84% of easy-VQA's yes/no questions name an absent
    one, so always answering "absent" scores 0.84 on them; the "present" part shows whether a model reads the
    picture. `predictions`: rows with a "score", in the order of `examples`."""
    scores: dict[str, list[float]] = {"present": [], "absent": []}
    for e, p in zip(examples, predictions):
        if e.target in ("yes", "no"):
            scores["present" if (e.target == "yes") != is_negated(e.question) else "absent"].append(p["score"])
    return {k: round(sum(v) / len(v), 4) for k, v in scores.items() if v}
