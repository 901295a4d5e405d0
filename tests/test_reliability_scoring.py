"""Issue 15, category 6: a predictions file that is not JSON, or lacks ids, is never scored silently: a partial
file is refused with the count of missing ids, or (with --allow-missing) scored with a warning giving it."""

import json

import pytest

from mu import MuError
from mu.eval.io import write_json_atomic
from tests.reliability_util import assert_refused, run_cli, save_tiny

N = 5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("score")
    path = d / "squad.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "context": f"The box holds {i} balls.", "question": "How many?",
                                        "answers": [str(i)]}) + "\n" for i in range(N)))
    return path


def _preds(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


CASES = [
    ("partial.json", json.dumps({"q0": "0", "q1": "1"}), ["no prediction for 3 of the 5", "'q2'", "--allow-missing"]),
    ("partial.jsonl", "".join(json.dumps({"id": f"q{i}", "prediction": "x"}) + "\n" for i in range(4)),
     ["no prediction for 1 of the 5", "'q4'"]),
    ("empty_obj.json", "{}", ["no prediction for 5 of the 5"]),
    ("notjson.json", "q0: 0\nq1: 1\n", ["line 1", "not valid JSON"]),
    ("list.json", json.dumps(["0", "1"]), ["JSON object", "list"]),
    ("numbers.json", json.dumps({f"q{i}": i for i in range(N)}), ["'q0'", "string", "int"]),
    ("noid.jsonl", json.dumps({"prediction": "0"}) + "\n", ["line 1", "missing field 'id'"]),
    ("empty.json", "", ["empty"]),
]


@pytest.mark.parametrize("name,text,words", CASES, ids=[c[0] for c in CASES])
def test_bad_or_partial_predictions_are_refused(tmp_path, data, capsys, name, text, words):
    path = _preds(tmp_path, name, text)
    out = tmp_path / "scores.json"
    rc, err = run_cli(capsys, "score", "--task", "squad_v2", "--data", data, "--predictions", path, "--out", out)
    assert_refused(rc, err, name, *words)
    assert not out.exists()


def test_allow_missing_scores_the_rest_and_says_how_many(tmp_path, data, capsys):
    path = _preds(tmp_path, "partial.json", json.dumps({"q0": "0", "q1": "wrong"}))
    out = tmp_path / "scores.json"
    rc, err = run_cli(capsys, "score", "--task", "squad_v2", "--data", data, "--predictions", path, "--out", out,
                      "--allow-missing")
    assert rc == 0 and "warning:" in err and "no prediction for 3 of the 5" in err and "the other 2 only" in err
    result = json.loads(out.read_text())
    assert (result["scored"], result["missing"], result["metrics"]["total"]) == (2, 3, 2)
    assert result["metrics"]["exact"] == 50.0
    empty = _preds(tmp_path, "none.json", "{}")  # nothing to score is still an error
    rc, err = run_cli(capsys, "score", "--task", "squad_v2", "--data", data, "--predictions", empty, "--allow-missing")
    assert_refused(rc, err, "no prediction for 5 of the 5")


def test_paths_that_are_directories(tmp_path, data, capsys):
    good = _preds(tmp_path, "good.json", json.dumps({f"q{i}": str(i) for i in range(N)}))
    (tmp_path / "a_dir").mkdir()
    rc, err = run_cli(capsys, "score", "--task", "squad_v2", "--data", data, "--predictions", tmp_path / "a_dir")
    assert_refused(rc, err, "a_dir", "is a directory")
    rc, err = run_cli(capsys, "score", "--task", "squad_v2", "--data", data, "--predictions", good, "--out",
                      tmp_path / "a_dir")
    assert_refused(rc, err, "a_dir", "is a directory")
    model = save_tiny(tmp_path / "m")
    rc, err = run_cli(capsys, "eval", "--model", model, "--task", "squad_v2", "--data", data, "--max-new-tokens", "1",
                      "--quiet", "--device", "cpu", "--predictions", tmp_path / "a_dir")
    assert_refused(rc, err, "a_dir", "is a directory")
    with pytest.raises(MuError, match="is a directory"):
        write_json_atomic(tmp_path / "a_dir", {})
    assert list((tmp_path / "a_dir").iterdir()) == [] and not list(tmp_path.glob(".*.tmp"))
    rc, err = run_cli(capsys, "score", "--task", "squad_v2", "--data", data, "--predictions", good)
    assert rc == 0  # the control scores
