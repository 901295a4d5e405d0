"""Predictions and results files: read {id: text} predictions, write them and results atomically."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from mu.atomic import atomic_write_json as write_json_atomic  # noqa: F401 (the name callers know)
from mu.atomic import atomic_write_text as write_text_atomic
from mu.data.tasks import iter_jsonl
from mu.errors import MuError


def write_predictions(path: str | os.PathLike, predictions: Mapping[str, str]) -> Path:
    """A `.json` path gets the SQuAD convention {id: text}; anything else JSON lines {"id", "prediction"}."""
    if str(path).endswith(".json"):
        return write_json_atomic(path, dict(predictions))
    lines = "".join(json.dumps({"id": k, "prediction": v}, ensure_ascii=False) + "\n" for k, v in predictions.items())
    return write_text_atomic(path, lines)


def predicted_only(examples: Sequence[Any], predictions: Mapping[str, str], predictions_file: Any, data_file: Any,
                   allow_missing: bool = False) -> list[Any]:
    """The examples (anything with an `.id`) that have a prediction. Missing ones are refused with a one-line
    MuError that says how many, or with `allow_missing` left out with a warning that says so; predictions
    for ids not in the data are ignored with a note. A file that covers no example is always refused."""
    ids = {e.id for e in examples}
    missing = [e.id for e in examples if e.id not in predictions]
    if missing:
        shown = ", ".join(map(repr, missing[:5])) + (" ..." if len(missing) > 5 else "")
        problem = (f"{predictions_file}: no prediction for {len(missing)} of the {len(examples)} examples in "
                   f"{data_file} (ids {shown})")
        if not allow_missing or len(missing) == len(examples):
            raise MuError(problem + ("" if allow_missing else "; pass --allow-missing to score the rest"))
        print(f"warning: {problem}; scoring the other {len(examples) - len(missing)} only", file=sys.stderr)
    extra = sum(k not in ids for k in predictions)
    if extra:
        print(f"note: {extra} predictions have ids that are not in {data_file}; they were ignored", file=sys.stderr)
    return [e for e in examples if e.id in predictions]


def read_predictions(path: str | os.PathLike) -> dict[str, str]:
    """Read predictions: a JSON object {id: text} (the SQuAD convention), or JSON lines {"id", "prediction"}."""
    path = Path(path)
    if path.is_dir():
        raise MuError(f"{path}: is a directory; expected a predictions file ({{id: text}} JSON or JSON lines)")
    if not path.is_file():
        raise MuError(f"no predictions file at {str(path)!r}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise MuError(f"{path}: not valid UTF-8 text") from None
    stripped = text.lstrip()
    if not stripped:
        raise MuError(f"{path}: the predictions file is empty")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        obj = None  # maybe JSON lines
    if isinstance(obj, dict) and "prediction" in obj and "id" not in obj:
        raise MuError(f"{path}, line 1: missing field 'id' (a JSON lines predictions file has {{\"id\", "
                      f"\"prediction\"}} on every line)")
    if isinstance(obj, dict) and not ("id" in obj and "prediction" in obj):
        bad = next((k for k, v in obj.items() if not isinstance(v, str)), None)
        if bad is not None:
            raise MuError(f"{path}: prediction for id {bad!r} should be a string, got {type(obj[bad]).__name__}")
        return obj
    if obj is not None and not isinstance(obj, dict):
        raise MuError(f"{path}: expected a JSON object {{id: text}} or JSON lines {{\"id\", \"prediction\"}}, "
                      f"got a JSON {type(obj).__name__}")
    out: dict[str, str] = {}
    for lineno, rec in iter_jsonl(path):
        where = f"{path}, line {lineno}"
        if not isinstance(rec, dict):
            raise MuError(f"{where}: expected an object {{\"id\": ..., \"prediction\": ...}}")
        for field in ("id", "prediction"):
            if field not in rec:
                raise MuError(f"{where}: missing field {field!r}")
        if not isinstance(rec["prediction"], str):
            raise MuError(f"{where}: field 'prediction' should be a string, got {type(rec['prediction']).__name__}")
        if isinstance(rec["id"], bool) or not isinstance(rec["id"], (str, int)):
            raise MuError(f"{where}: field 'id' should be a string, got {type(rec['id']).__name__}")
        qid = str(rec["id"])
        if qid in out:
            raise MuError(f"{where}: id {qid!r} appears twice")
        out[qid] = rec["prediction"]
    return out
