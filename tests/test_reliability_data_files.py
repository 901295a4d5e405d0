"""Issue 15, category 4: bad data files and impossible hyper-parameters get one error naming the file, line and
field (or the flag and its value), before anything is trained or written."""

import json

import pytest

import mu
from mu.data import tasks
from mu.data.tasks import load_examples
from mu.train.config import TrainConfig
from tests.reliability_util import assert_refused, run_cli

GOOD = {"id": "q0", "context": "The box holds 3 red balls.", "question": "How many balls?", "answers": ["3"]}


def _jsonl(path, *rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


CASES = [  # (file name, what to write, words the message must contain)
    ("answers_str.jsonl", [{**GOOD, "answers": "3"}], ["line 1", "'answers'", "list of strings", "str"]),
    ("question_num.jsonl", [{**GOOD, "question": 7}], ["line 1", "'question'", "string", "int"]),
    ("context_null.jsonl", [GOOD, {**GOOD, "id": "q1", "context": None}], ["line 2", "'context'", "null"]),
    ("id_list.jsonl", [{**GOOD, "id": [1]}], ["line 1", "'id'", "list"]),
    ("record_list.jsonl", [[1, 2]], ["line 1", "JSON object", "list"]),
    ("missing.jsonl", [{"context": "c", "question": "q"}], ["line 1", "missing field 'answers'"]),
    ("pretty.jsonl", [json.dumps(GOOD, indent=2)], ["line 1", "not valid JSON", "one JSON object over several lines"]),
    ("array.jsonl", [json.dumps([GOOD, GOOD], indent=1)], ["line 1", "one JSON array over several lines"]),
    ("dict.json", json.dumps({"records": [GOOD]}), ["JSON list of records"]),
    ("scalar.json", "42", ["JSON list of records"]),
    ("bad_item.json", json.dumps([GOOD, "x"]), ["item 1", "JSON object"]),
    ("dups.jsonl", [GOOD, GOOD], ["line 2", "'q0' already used"]),
    ("empty.jsonl", "", ["no examples"]),
]


@pytest.mark.parametrize("name,content,words", CASES, ids=[c[0] for c in CASES])
def test_bad_records_name_file_line_and_field(tmp_path, name, content, words):
    path = tmp_path / name
    if isinstance(content, list):
        _jsonl(path, *content)
    else:
        path.write_text(content)
    with pytest.raises(mu.MuError) as e:
        load_examples("squad_v2", path)
    message = str(e.value)
    assert name in message and "\n" not in message
    for w in words:
        assert w in message, (w, message)


def test_binary_directory_and_missing_files(tmp_path):
    (tmp_path / "binary.jsonl").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("hi\n")
    for path, words in [(tmp_path / "binary.jsonl", "not valid UTF-8"), (tmp_path / "folder", "is a directory"),
                        (tmp_path / "nope.jsonl", "no such file")]:
        with pytest.raises(mu.MuError, match=words) as e:
            load_examples("squad_v2", path)
        assert path.name in str(e.value)


def test_an_enormous_line_is_refused_without_reading_it_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(tasks, "MAX_LINE_CHARS", 1000)
    path = _jsonl(tmp_path / "big.jsonl", {"source": "a", "target": "b"}, {"source": "x" * 5000, "target": "y"})
    sizes, real_open = [], open

    class Spy:  # records the size of every read the JSON lines reader asks for
        def __init__(self, *a, **k):
            self.f = real_open(*a, **k)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def readline(self, size=-1):
            sizes.append(size)
            return self.f.readline(size)

    monkeypatch.setattr("builtins.open", Spy)
    with pytest.raises(mu.MuError, match="big.jsonl, line 2: longer than 1,000 characters"):
        load_examples("seq2seq", path)
    assert sizes and all(0 < n <= 1001 for n in sizes)  # never an unbounded read


def test_unknown_task_names(tmp_path, capsys):
    with pytest.raises(mu.MuError, match="unknown task 'squad_v3'"):
        load_examples("squad_v3", _jsonl(tmp_path / "d.jsonl", GOOD))
    rc, err = run_cli(capsys, "score", "--task", "trivia", "--data", tmp_path / "d.jsonl", "--predictions", "p.json")
    assert_refused(rc, err, "'trivia'")


HYPER = [  # (flags, words) for `mu train`
    (["--lr=-1e-3"], ["--lr", "-0.001"]), (["--lr", "0"], ["--lr"]), (["--lr", "nan"], ["--lr", "nan"]),
    (["--lr", "inf"], ["--lr", "inf"]), (["--batch-size", "0"], ["--batch-size", "0"]),
    (["--global-batch-size", "0"], ["--global-batch-size"]), (["--max-steps", "0"], ["--max-steps"]),
    (["--epochs", "-1"], ["--epochs"]), (["--warmup", "-5"], ["--warmup"]), (["--grad-clip", "nan"], ["--grad-clip"]),
    (["--weight-decay", "inf"], ["--weight-decay", "inf"]), (["--min-lr-ratio", "2"], ["--min-lr-ratio"]),
    (["--max-source-len", "0"], ["--max-source-len"]), (["--dropout", "1"], ["'dropout'", "1.0"]),
    (["--dropout", "-0.5"], ["'dropout'", "-0.5"]), (["--preset", "huge"], ["'huge'"]),
]


@pytest.mark.parametrize("flags,words", HYPER, ids=[" ".join(h[0]) for h in HYPER])
def test_impossible_hyper_parameters_are_refused_before_anything_is_written(tmp_path, capsys, flags, words):
    data = _jsonl(tmp_path / "d.jsonl", {"source": "a", "target": "b"})
    out = tmp_path / "run"
    rc, err = run_cli(capsys, "train", "--preset", "tiny", "--tokenizer", "byte", "--task", "seq2seq", "--train-data",
                      data, "--out", out, "--max-steps", "1", "--no-progress", "--device", "cpu", *flags)
    assert_refused(rc, err, *words)
    assert not out.exists()


def test_distill_and_train_config_ranges(tmp_path, capsys):
    with pytest.raises(mu.MuError, match="--lr must be a finite number, got inf"):
        TrainConfig(out=str(tmp_path), train_data="x", lr=float("inf")).validate()
    for flags, words in [(["--alpha", "2"], "alpha"), (["--temperature", "0"], "temperature"),
                         (["--on-policy", "1.5"], "--on-policy"), (["--sample-top-k", "-5"], "--sample-top-k")]:
        rc, err = run_cli(capsys, "distill", "--teacher", tmp_path / "t", "--student-preset", "tiny", "--train-data",
                          tmp_path / "d.jsonl", "--out", tmp_path / "kd", *flags)
        assert_refused(rc, err, words)
    assert not (tmp_path / "kd").exists()
