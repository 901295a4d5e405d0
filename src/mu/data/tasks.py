"""Task formats: read a task's records (local jsonl/json, or a Hugging Face dataset available locally)
into `Example`s with one prompt template per task.

    examples = load_examples("squad_v2", "data/squad_v2_dev.jsonl")
    ex = examples[0]
    ex.source      # the prompt (encoder input, or the decoder-only prompt)
    ex.target      # what the model is trained to produce
    ex.references  # what a prediction is scored against

Field schemas are described in docs/tasks.md. Every malformed line stops
with a `MuError` naming the file, the line number and the field.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from mu.data.synthetic import synthetic_split
from mu.errors import MuError

NO_ANSWER = "unanswerable"  # the target of an unanswerable SQuAD 2.0 question; scored as the empty answer

SQUAD_TEMPLATE = ("Answer the following question based only on the context.\n"
                  "###Question\n{question}\n###Context\n{context}\n###Answer\n")  # the paper's prompt, verbatim
XSUM_TEMPLATE = "Summarize the following document in one sentence.\n###Document\n{document}\n###Summary\n"
CODE2TEXT_TEMPLATE = "Describe what the following code does in one sentence.\n###Code\n{code}\n###Description\n"


@dataclass
class Example:
    id: str
    source: str  # the full prompt text (encoder input, or the decoder-only prompt)
    target: str  # gold output text used for training (SQuAD: first answer, or NO_ANSWER)
    references: list[str]  # every acceptable reference for scoring (SQuAD: all answers; [] if unanswerable)


@dataclass(frozen=True)
class Task:
    name: str
    fields: tuple[str, ...]  # fields every record must have (besides an optional "id")
    template: str  # str.format template over `fields`; "{source}" passes the source through
    metric: str  # the primary metric's key in `mu.eval.compute_metrics(...)`'s result (higher is better)
    build: Callable[[dict, str], tuple[str, str, list[str]]]  # (record, where) -> (source, target, references)
    description: str = ""

    @property
    def suffix(self) -> str:
        """The fixed text after the last field (e.g. "\\n###Answer\\n"), kept when a source is truncated."""
        return self.template[self.template.rfind("}") + 1:]

    def prompt_suffix(self, source: str) -> str:
        """The suffix of `source` that truncation must keep: the template's tail, or for seq2seq sources a
        trailing "###Marker" line as in the paper's files; "" when there is none."""
        if self.suffix and source.endswith(self.suffix):
            return self.suffix
        m = _MARKER_TAIL.search(source)
        return m.group(0) if m else ""


_MARKER_TAIL = re.compile(r"\n###[^\n]{0,40}\n?\Z")


# -- field checks ---------------------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _text(record: dict, field: str, where: str, allow_empty: bool = False) -> str:
    if field not in record:
        raise MuError(f"{where}: missing field {field!r} (found fields: {', '.join(sorted(record)) or 'none'})")
    value = record[field]
    if not isinstance(value, str):
        raise MuError(f"{where}: field {field!r} should be a string, got {_type_name(value)} ({str(value)[:40]!r})")
    if not allow_empty and not value.strip():
        raise MuError(f"{where}: field {field!r} is empty")
    return value


def _text_list(record: dict, field: str, where: str) -> list[str]:
    if field not in record:
        raise MuError(f"{where}: missing field {field!r} (found fields: {', '.join(sorted(record)) or 'none'})")
    value = record[field]
    if isinstance(value, dict) and "text" in value:  # Hugging Face squad_v2: {"text": [...], "answer_start": [...]}
        value = value["text"]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise MuError(f"{where}: field {field!r} should be a list of strings ([] when unanswerable), got "
                      f"{_type_name(value)} ({str(value)[:60]!r})")
    return list(value)


# -- the tasks ------------------------------------------------------------------------------------------


def _build_squad(r: dict, where: str) -> tuple[str, str, list[str]]:
    question, context = _text(r, "question", where), _text(r, "context", where)
    answers = _text_list(r, "answers", where)
    target = next((a.strip() for a in answers if a.strip()), NO_ANSWER)
    return SQUAD_TEMPLATE.format(question=question.strip(), context=context.strip()), target, answers


def _build_xsum(r: dict, where: str) -> tuple[str, str, list[str]]:
    document, summary = _text(r, "document", where), _text(r, "summary", where)
    return XSUM_TEMPLATE.format(document=document.strip()), summary.strip(), [summary.strip()]


def _build_code2text(r: dict, where: str) -> tuple[str, str, list[str]]:
    code = _text(r, "code", where)
    if "docstring_tokens" in r:  # raw CodeXGLUE / HF code_x_glue_ct_code_to_text: the reference is the joined tokens
        docstring = " ".join(_text_list(r, "docstring_tokens", where))
        if not docstring.strip():
            raise MuError(f"{where}: field 'docstring_tokens' is empty")
    else:
        docstring = _text(r, "docstring", where)
    return CODE2TEXT_TEMPLATE.format(code=code.strip("\n")), docstring.strip(), [docstring.strip()]


def _build_seq2seq(r: dict, where: str) -> tuple[str, str, list[str]]:
    source, target = _text(r, "source", where), _text(r, "target", where)
    return source, target, [target]  # the paper's files hold the whole prompt in "source": used verbatim


TASKS: dict[str, Task] = {
    "squad_v2": Task("squad_v2", ("context", "question", "answers"), SQUAD_TEMPLATE, "f1", _build_squad,
                     "extractive reading comprehension with unanswerable questions (SQuAD 2.0)"),
    "xsum": Task("xsum", ("document", "summary"), XSUM_TEMPLATE, "rougeL", _build_xsum,
                 "one-sentence news summarisation (XSum)"),
    "code2text": Task("code2text", ("code", "docstring"), CODE2TEXT_TEMPLATE, "bleu4", _build_code2text,
                      "code -> docstring (CodeXGLUE code-to-text; smoothed BLEU-4)"),
    "seq2seq": Task("seq2seq", ("source", "target"), "{source}", "f1", _build_seq2seq,
                    "the paper's {source, target} text-to-text files"),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        hint = " (visual QA is handled by the vision module: `mu vqa`)" if name == "vqa" else ""
        raise MuError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}{hint}")
    return TASKS[name]


def make_example(task: str | Task, record: dict, where: str = "record", default_id: str = "0") -> Example:
    """One record (a dict in the task's schema) -> Example; `where` names it in error messages."""
    task = get_task(task) if isinstance(task, str) else task
    if not isinstance(record, dict):
        raise MuError(f"{where}: expected a JSON object with fields {', '.join(task.fields)}, got "
                      f"{_type_name(record)}")
    raw_id = record.get("id", default_id)
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        raise MuError(f"{where}: field 'id' should be a string, got {_type_name(raw_id)}")
    missing = [f for f in task.fields if f not in record and not (f == "docstring" and "docstring_tokens" in record)]
    if missing:
        raise MuError(f"{where}: missing field {missing[0]!r}"
                      + (f" (and {', '.join(map(repr, missing[1:]))})" if missing[1:] else "")
                      + f"; a {task.name} record has fields {', '.join(task.fields)}, this one has "
                      f"{', '.join(sorted(record)) or 'none'}")
    source, target, references = task.build(record, where)
    return Example(str(raw_id), source, target, references)


# -- reading files ---------------------------------------------------------------------------------------


MAX_LINE_CHARS = 16 * 1024 * 1024  # a JSON lines record longer than this is refused (a file without newlines?)


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line of a UTF-8 JSON Lines file.

    A line longer than `MAX_LINE_CHARS` is refused before it is read whole; a file that holds one JSON
    document spread over lines (an array or a pretty-printed object) is named as such.
    """
    path = Path(path)
    lineno = 0
    try:
        with open(path, encoding="utf-8") as f:
            while True:
                line = f.readline(MAX_LINE_CHARS + 1)
                if not line:
                    break
                lineno += 1
                if len(line) > MAX_LINE_CHARS:
                    raise MuError(f"{path}, line {lineno}: longer than {MAX_LINE_CHARS:,} characters; expected JSON "
                                  f"lines, one record per line")
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    raise MuError(f"{path}, line {lineno}: not valid JSON ({e.msg} at column {e.colno})"
                                  f"{_one_document_hint(path, lineno)}") from None
    except UnicodeDecodeError:
        raise MuError(f"{path}, line {lineno + 1}: not valid UTF-8 text") from None
    except FileNotFoundError:
        raise MuError(f"no such file: {str(path)!r}") from None
    except IsADirectoryError:
        raise MuError(f"{str(path)!r} is a directory, expected a .jsonl file") from None


def _one_document_hint(path: Path, lineno: int) -> str:
    """"; the file is one JSON array/object ..." when a JSON lines file failed on its first line because it holds
    a single multi-line document; "" otherwise."""
    if lineno != 1 or path.stat().st_size > 256 * 1024 * 1024:
        return ""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return ""
    kind = "array" if isinstance(doc, list) else "object" if isinstance(doc, dict) else type(doc).__name__
    return (f"; the file is one JSON {kind} over several lines, not JSON lines (write one record per line, or "
            f"name the file .json)")


def _records_json(path: Path) -> Iterator[tuple[str, str, Any]]:
    """A .json file: a list of records, or the official SQuAD layout
    {"data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question", "answers", "is_impossible"}]}]}]}."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MuError(f"{path}, line {e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise MuError(f"{path}: not valid UTF-8 text") from None
    if isinstance(obj, list):
        for i, rec in enumerate(obj):
            yield f"{path}, item {i}", str(i), rec
        return
    if not (isinstance(obj, dict) and isinstance(obj.get("data"), list)):
        raise MuError(f"{path}: expected a JSON list of records or the SQuAD layout {{\"data\": [...]}}")
    for a, article in enumerate(obj["data"]):
        for p, para in enumerate(article.get("paragraphs", []) if isinstance(article, dict) else []):
            for q, qa in enumerate(para.get("qas", []) if isinstance(para, dict) else []):
                where = f"{path}, data[{a}].paragraphs[{p}].qas[{q}]"
                if not isinstance(qa, dict):
                    raise MuError(f"{where}: expected an object with id, question, answers")
                answers = qa.get("answers", [])
                if qa.get("is_impossible"):
                    answers = []
                elif isinstance(answers, list):
                    answers = [x.get("text") if isinstance(x, dict) else x for x in answers]
                yield where, str(qa.get("id", f"{a}-{p}-{q}")), {
                    "id": qa.get("id", f"{a}-{p}-{q}"), "title": article.get("title", ""),
                    "context": para.get("context"), "question": qa.get("question"), "answers": answers}


def _split_spec(spec: str) -> tuple[str, Optional[str]]:
    """"name_or_dir:split" -> (name_or_dir, split); a path that exists is never split."""
    if os.path.exists(spec) or ":" not in spec:
        return spec, None
    name, split = spec.rsplit(":", 1)
    return name, split or None


def _records_hf(spec: str) -> Iterator[tuple[str, str, Any]]:
    """Rows of a Hugging Face dataset saved with `save_to_disk`, or a hub name already in the local cache."""
    name, split = _split_spec(spec)
    try:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # never download at run time
        import datasets
    except ImportError:
        raise MuError(f"{spec!r} is not a file; reading Hugging Face datasets needs `pip install datasets`") from None
    try:
        if os.path.isdir(name):
            ds = datasets.load_from_disk(name)
        else:
            ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # datasets raises many types (FileNotFoundError, ConnectionError, ValueError, ...)
        raise MuError(f"could not load {spec!r} as a local file or a locally available Hugging Face dataset "
                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split is None and len(ds) == 1:
            split = next(iter(ds))
        if split not in ds:
            raise MuError(f"{name}: pick a split with {name}:SPLIT; it has {', '.join(ds)}")
        ds = ds[split]
    for i, row in enumerate(ds):
        yield f"{spec}, row {i}", str(i), row


def _records(path: str | os.PathLike) -> Iterator[tuple[str, str, Any]]:
    """(where, default id, record) from a .jsonl / .json file or a Hugging Face dataset."""
    p = Path(path)
    if p.is_file() and p.suffix == ".json":
        yield from _records_json(p)
    elif p.is_file():
        for lineno, rec in iter_jsonl(p):
            yield f"{p}, line {lineno}", str(lineno), rec
    elif p.is_dir() and not any((p / f).exists() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
        raise MuError(f"{str(path)!r} is a directory, not a data file or a dataset saved with "
                      f"`datasets.Dataset.save_to_disk`; expected a .jsonl or .json file")
    elif p.is_dir() or not str(path).endswith((".jsonl", ".json", ".txt")):
        yield from _records_hf(str(path))
    else:
        raise MuError(f"no such file: {str(path)!r}")


def load_examples(task: str, path: str | os.PathLike, limit: Optional[int] = None) -> list[Example]:
    """Read a task's examples from `path`: a .jsonl file in the task's schema (see docs/tasks.md), a .json file
    (a list of records, or the official SQuAD layout), a directory written by `datasets.Dataset.save_to_disk`,
    a Hugging Face dataset name already in the local cache ("name:split"), or "synthetic:SPLIT[:N]" for
    squad_v2 (the built-in generator). Records without an "id" get their line number. Ids must be unique."""
    spec = get_task(task)
    if limit is not None and limit < 0:
        raise MuError(f"limit must be >= 0, got {limit}")
    if str(path).startswith("synthetic:") and not Path(path).exists():
        if task != "squad_v2":
            raise MuError(f"synthetic data is in the squad_v2 format; use --task squad_v2, not {task!r}")
        records = ((f"{path}, example {i}", str(i), r) for i, r in enumerate(synthetic_split(str(path))))
    else:
        records = _records(path)
    examples: list[Example] = []
    seen: dict[str, str] = {}
    if limit == 0:
        return examples
    for where, default_id, record in records:
        ex = make_example(spec, record, where, default_id)
        if ex.id in seen:
            raise MuError(f"{where}: id {ex.id!r} already used at {seen[ex.id]}; ids must be unique")
        seen[ex.id] = where
        examples.append(ex)
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise MuError(f"{path}: no examples found")
    return examples


def iter_text(path: str | os.PathLike) -> Iterator[str]:
    """Plain-text pretraining corpus: a .txt file (paragraphs separated by blank lines; a paragraph is its
    lines joined by "\\n"), a .jsonl file with a "text" field per line, a saved Hugging Face dataset with a
    "text" column, or a directory of .txt/.jsonl files (sorted by name)."""
    p = Path(path)
    if p.is_dir() and not any((p / f).exists() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
        files = sorted(f for f in p.iterdir() if f.suffix in (".txt", ".jsonl"))
        if not files:
            raise MuError(f"{p}: directory holds no .txt or .jsonl files")
        for f in files:
            yield from iter_text(f)
    elif p.is_dir():
        for where, _, row in _records_hf(str(p)):
            yield _text(row, "text", where, allow_empty=True)
    elif p.suffix == ".jsonl":
        for lineno, rec in iter_jsonl(p):
            where = f"{p}, line {lineno}"
            if not isinstance(rec, dict):
                raise MuError(f"{where}: expected a JSON object with a \"text\" field, got {_type_name(rec)}")
            text = _text(rec, "text", where, allow_empty=True)
            if text.strip():
                yield text
    elif p.is_file():
        yield from _paragraphs(p)
    else:
        raise MuError(f"no such file or directory: {str(path)!r}")


def _paragraphs(path: Path) -> Iterator[str]:
    block: list[str] = []
    lineno = 0
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if line.strip():
                    block.append(line.strip())
                elif block:
                    yield "\n".join(block)
                    block = []
    except UnicodeDecodeError:
        raise MuError(f"{path}, line {lineno + 1}: not valid UTF-8 text") from None
    if block:
        yield "\n".join(block)


# -- source token ids (shared by training and evaluation) ------------------------------------------------


def encode_source(tokenizer, source: str, max_len: Optional[int] = None, task: str | Task = "seq2seq"
                  ) -> tuple[list[int], bool]:
    """Token ids of a prompt (no special tokens added) and whether it was truncated to `max_len`.

    Over-long prompts lose the end of their last field (SQuAD: the end of the context, so the question,
    which comes first, survives) while the closing marker ("\\n###Answer\\n") is kept, so the model still
    sees where its output starts. Cut points come from the tokenizer's offsets, so ids match tokenizing the
    whole prompt at once.
    """
    task = get_task(task) if isinstance(task, str) else task
    enc = tokenizer(source, add_special_tokens=False, return_offsets_mapping=max_len is not None)
    ids = list(enc["input_ids"])
    if max_len is None or len(ids) <= max_len:
        return ids, False
    if max_len < 1:
        raise MuError(f"max source length must be >= 1, got {max_len}")
    suffix = task.prompt_suffix(source)
    cut = len(ids)
    if suffix:
        start = len(source) - len(suffix)
        cut = next((i for i, (s, _) in enumerate(enc["offset_mapping"]) if s >= start), len(ids))
    tail = ids[cut:]
    if len(tail) >= max_len:  # no room for the head: plain right truncation
        return ids[:max_len], True
    return ids[:max_len - len(tail)] + tail, True


def fit_prompt(tokenizer, text: str, max_len: int) -> tuple[list[int], int]:
    """Token ids of `text` as `tokenizer(text)` gives them (special tokens included), cut to `max_len` the way
    `encode_source` cuts a source (the end of the body goes, a closing "###Marker" line stays).

    Returns (ids, the untruncated length): the caller says when it cut.
    """
    ids = list(tokenizer(text)["input_ids"])
    if len(ids) <= max_len:
        return ids, len(ids)
    plain = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    n_special = len(ids) - len(plain)
    start = next((i for i in range(max(n_special, 0) + 1) if ids[i:i + len(plain)] == plain), None)
    if start is None or max_len <= n_special:  # specials we cannot locate: plain right truncation
        return ids[:max_len], len(ids)
    body, _ = encode_source(tokenizer, text, max_len - n_special, "seq2seq")
    return ids[:start] + body + ids[start + len(plain):], len(ids)
