"""Task metrics from their standard definitions, all on a 0-100 scale.

* SQuAD 2.0 exact match / F1: the official evaluation script's definitions (v2.0,
  https://rajpurkar.github.io/SQuAD-explorer/ "evaluate-v2.0.py"): answers normalised by lowercasing,
  removing punctuation, the articles a/an/the and extra whitespace; the best score over the gold answers;
  an unanswerable question's only gold answer is "" and an empty prediction means "no answer". Our models
  say `NO_ANSWER` ("unanswerable") for that, which is mapped to "" before scoring.
* ROUGE-1/2/L/Lsum F-measure via Google's `rouge-score` package with Porter stemming; for Lsum the text is
  split into sentences (one per line), as `rouge-score` expects.
* BLEU via `sacrebleu` (corpus level, its default 13a tokenisation).
* Smoothed sentence-level BLEU-4 as reported by CodeXGLUE code-to-text; see `codexglue_bleu4`.
"""

from __future__ import annotations

import math
import re
import string
import sys
import xml.sax.saxutils
from collections import Counter
from typing import Iterable, Mapping, Sequence

from mu.data.tasks import NO_ANSWER, Example, get_task
from mu.errors import MuError

# -- SQuAD 2.0 ------------------------------------------------------------------------------------------

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(s: str) -> str:
    """Official SQuAD normalisation: lower case, drop punctuation, drop a/an/the, squeeze whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _tokens(s: str) -> list[str]:
    return normalize_answer(s).split() if s else []


def exact_score(gold: str, pred: str) -> int:
    return int(normalize_answer(gold) == normalize_answer(pred))


def f1_score(gold: str, pred: str) -> float:
    """Token-overlap F1 of the official script (1.0 when both are empty, 0.0 when only one is)."""
    gold_toks, pred_toks = _tokens(gold), _tokens(pred)
    if not gold_toks or not pred_toks:
        return float(gold_toks == pred_toks)
    same = sum((Counter(gold_toks) & Counter(pred_toks)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_toks), same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def answer_text(prediction: str) -> str:
    """A model's answer as the SQuAD scorer sees it: the NO_ANSWER phrase means the empty answer."""
    return "" if normalize_answer(prediction) == normalize_answer(NO_ANSWER) else prediction


def squad_v2_metrics(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """exact/f1/total and HasAns_*/NoAns_* breakdowns (percentages) over the ids of `references`.

    `references[id]` lists the gold answers ([] = unanswerable); `predictions[id]` is the model's text.
    """
    exact, f1, has_ans = {}, {}, {}
    for qid, golds in references.items():
        golds = [a for a in golds if normalize_answer(a)] or [""]
        pred = answer_text(predictions[qid])
        exact[qid] = max(exact_score(a, pred) for a in golds)
        f1[qid] = max(f1_score(a, pred) for a in golds)
        has_ans[qid] = golds != [""]
    out = _averages(exact, f1, list(references))
    has = [q for q in references if has_ans[q]]
    no = [q for q in references if not has_ans[q]]
    for name, ids in (("HasAns", has), ("NoAns", no)):
        if ids:
            out.update({f"{name}_{k}": v for k, v in _averages(exact, f1, ids).items()})
    return out


def _averages(exact: Mapping[str, float], f1: Mapping[str, float], ids: list[str]) -> dict[str, float]:
    n = len(ids)
    return {"exact": 100.0 * sum(exact[q] for q in ids) / n if n else 0.0,
            "f1": 100.0 * sum(f1[q] for q in ids) / n if n else 0.0, "total": n}


def text_f1_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """SQuAD-normalised exact match and token F1 (best over references), with no no-answer mapping."""
    n = len(predictions)
    ex = sum(max((exact_score(r, p) for r in refs), default=0) for p, refs in zip(predictions, references))
    f1 = sum(max((f1_score(r, p) for r in refs), default=0.0) for p, refs in zip(predictions, references))
    return {"exact": 100.0 * ex / n if n else 0.0, "f1": 100.0 * f1 / n if n else 0.0}


# -- ROUGE and BLEU via well-kept packages -------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")


def _sentence_lines(text: str) -> str:
    return "\n".join(s.strip() for s in _SENTENCE_END.split(text.strip())) if "\n" not in text.strip() else text


def rouge_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F-measure (x100) with Porter stemming; max over references per example."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise MuError("ROUGE needs the `rouge-score` package: pip install 'mu[eval]'") from None
    types = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    scorer = rouge_scorer.RougeScorer(types, use_stemmer=True)
    totals = dict.fromkeys(types, 0.0)
    for pred, refs in zip(predictions, references):
        refs = [_sentence_lines(r) for r in refs] or [""]
        scores = scorer.score_multi(refs, _sentence_lines(pred))
        for t in types:
            totals[t] += scores[t].fmeasure
    n = max(len(predictions), 1)
    return {t: 100.0 * v / n for t, v in totals.items()}


def sacrebleu_score(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU from `sacrebleu` (default 13a tokenisation); rows may have different numbers of references."""
    try:
        import sacrebleu
    except ImportError:
        raise MuError("BLEU needs the `sacrebleu` package: pip install 'mu[eval]'") from None
    width = max((len(r) for r in references), default=1)
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score)


# -- CodeXGLUE smoothed BLEU-4 ----------------------------------------------------------------------------
# Definition: CodeXGLUE code-to-text, `Code-Text/code-to-text/evaluator/bleu.py` (microsoft/CodeXGLUE), itself
# adapted from the MOSES `bleu.py` by hieuhoang1972 with NIST mteval-v11a normalisation. Reimplemented here:
#   1. both texts: strip, lowercase, split into words and single punctuation marks (`[\w]+|[^\s\w]`);
#   2. NIST normalisation: join lines, unescape &quot; &amp; &lt; &gt;, pad with spaces, lowercase, split off
#      punctuation (periods and commas only when not next to a digit, dashes after a digit);
#   3. per example: clipped n-gram matches for n = 1..4; add-one smoothing for n >= 2 (Lin & Och 2004);
#      log precisions averaged with equal weights; brevity penalty min(0, 1 - (r + 1) / (c + 1)) in log
#      space with r the shortest reference length;
#   4. the corpus score is the mean of the sentence scores, x100.

_NIST_PUNCT = [(re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # split off punctuation (no apostrophe)
               (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period/comma unless preceded by a digit
               (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # period/comma unless followed by a digit
               (re.compile(r"([0-9])(-)"), r"\1 \2 ")]  # dash after a digit
_TINY = sys.float_info.min  # keeps log() finite for zero counts, as in the original


def _codexglue_words(text: str) -> list[str]:
    text = " ".join(re.findall(r"[\w]+|[^\s\w]", text.strip().lower()))  # CodeXGLUE's splitPuncts
    text = text.replace("<skipped>", "")
    text = re.sub(r"-\n", "", text).replace("\n", " ")
    text = xml.sax.saxutils.unescape(text, {"&quot;": '"'})
    text = f" {text} ".lower()
    for pattern, repl in _NIST_PUNCT:
        text = pattern.sub(repl, text)
    return text.split()


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def codexglue_sentence_bleu4(references: Sequence[str], prediction: str, n: int = 4) -> float:
    """Smoothed BLEU-4 of one prediction against its references, in [0, 1] (CodeXGLUE's definition)."""
    refs = [_codexglue_words(r) for r in references] or [[]]
    max_ref = Counter()
    for r in refs:
        max_ref |= _ngrams(r, n)  # per n-gram, the max count over references
    test = _codexglue_words(prediction)
    correct, guess = [0] * n, [max(len(test) - k, 0) for k in range(n)]
    for gram, count in _ngrams(test, n).items():
        correct[len(gram) - 1] += min(max_ref.get(gram, 0), count)
    log_bleu = 0.0
    for k in range(n):
        smooth = 1 if k > 0 else 0
        log_bleu += math.log(correct[k] + smooth + _TINY) - math.log(guess[k] + smooth + _TINY)
    ref_len = min(len(r) for r in refs)  # CodeXGLUE's effective reference length: the shortest
    brevity = min(0.0, 1.0 - (ref_len + 1) / (len(test) + 1))
    return math.exp(log_bleu / n + brevity)


def codexglue_bleu4(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean smoothed sentence BLEU-4 (x100): the number CodeXGLUE code-to-text reports."""
    if not predictions:
        return 0.0
    return 100.0 * sum(codexglue_sentence_bleu4(r, p) for p, r in zip(predictions, references)) / len(predictions)


# -- per task -------------------------------------------------------------------------------------------


def compute_metrics(task: str, examples: Iterable[Example], predictions: Mapping[str, str]) -> dict[str, float]:
    """The task's metrics for `predictions` ({id: text}); every example needs a prediction.

    squad_v2: exact, f1, total, HasAns_*/NoAns_*; xsum: rouge1, rouge2, rougeL, rougeLsum, bleu;
    code2text: bleu4 (CodeXGLUE smoothed), bleu (sacrebleu), rougeL; seq2seq: exact, f1, rougeL, bleu.
    The primary metric is `mu.data.tasks.TASKS[task].metric`.
    """
    get_task(task)
    examples = list(examples)
    missing = [e.id for e in examples if e.id not in predictions]
    if missing:
        shown = ", ".join(map(repr, missing[:5])) + (" ..." if len(missing) > 5 else "")
        raise MuError(f"no prediction for {len(missing)} of {len(examples)} examples (ids {shown})")
    bad = [e.id for e in examples if not isinstance(predictions[e.id], str)]
    if bad:
        raise MuError(f"predictions must be strings; id {bad[0]!r} has {type(predictions[bad[0]]).__name__}")
    preds = [predictions[e.id].strip() for e in examples]
    refs = [e.references for e in examples]
    if task == "squad_v2":
        return squad_v2_metrics({e.id: p for e, p in zip(examples, preds)}, {e.id: e.references for e in examples})
    out: dict[str, float] = {}
    if task == "xsum":
        out.update(rouge_metrics(preds, refs))
        out["bleu"] = sacrebleu_score(preds, refs)
    elif task == "code2text":
        out["bleu4"] = codexglue_bleu4(preds, refs)
        out["bleu"] = sacrebleu_score(preds, refs)
        out["rougeL"] = rouge_metrics(preds, refs)["rougeL"]
    else:  # seq2seq
        out.update(text_f1_metrics(preds, refs))
        out["rougeL"] = rouge_metrics(preds, refs)["rougeL"]
        out["bleu"] = sacrebleu_score(preds, refs)
    out["total"] = len(examples)
    return out
