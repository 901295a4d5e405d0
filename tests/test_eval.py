import json

import pytest
import torch

import mu
from mu.cli import main
from mu.data.tasks import Example, encode_source, load_examples
from mu.eval import evaluate_model, generate_predictions
from mu.eval.io import read_predictions
from mu.tokenizer import byte_tokenizer

ROWS = [{"id": f"q{i}", "title": "t", "context": ctx, "question": q, "answers": a} for i, (ctx, q, a) in enumerate([
    ("Talo was born in Brenmoor.", "Where was Talo born?", ["Brenmoor"]),
    ("Mirek plays the cello. Talo has a dog.", "What does Mirek play?", ["cello", "the cello"]),
    ("Zanda is a baker.", "Who is a pilot?", []),
    ("Oskel lives in Vale.", "Where does Oskel live? Answer briefly.", ["Vale"]),
    ("Pim is 40.", "How old is Pim?", ["40"]),
])]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "dev.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path, load_examples("squad_v2", path)


def _tiny(arch, tok):
    torch.manual_seed(0)
    model = mu.build_model("tiny", arch=arch, vocab_size=len(tok))
    model.tokenizer = tok
    return model.eval()


@pytest.mark.parametrize("arch", ["encdec", "deconly"])
def test_evaluate_model_matches_single_generation(arch, tok, examples):
    _, ex = examples
    model = _tiny(arch, tok)
    metrics, preds = evaluate_model(model, tok, "squad_v2", ex, batch_size=3, max_new_tokens=6, progress=False)
    assert list(preds) == [e.id for e in ex]
    assert 0.0 <= metrics["f1"] <= 100.0 and metrics["total"] == 5 and metrics["NoAns_total"] == 1
    for e in ex[:1]:  # the batched, length-sorted run == one example through model.generate by hand
        ids = torch.tensor([encode_source(tok, e.source)[0]])
        out = model.generate(ids, max_new_tokens=6, eos_token_id=tok.eos_token_id)
        new = out[0, 1:] if arch == "encdec" else out[0, ids.shape[1]:]
        new = new.tolist()
        new = new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
        assert preds[e.id] == tok.decode(new, skip_special_tokens=True).strip()
    one_by_one = generate_predictions(model, tok, "squad_v2", ex[1:4], batch_size=1, max_new_tokens=6, progress=False)
    assert one_by_one == {e.id: preds[e.id] for e in ex[1:4]}


def test_evaluate_model_truncates_long_sources_keeping_question(tok, examples):
    _, ex = examples
    model = _tiny("encdec", tok)
    long = [Example("L", ex[0].source.replace("Brenmoor.", "Brenmoor. " + "filler " * 200), "x", ["x"])]
    with pytest.warns(UserWarning, match="1 of 1 sources were longer than 64 tokens"):
        metrics, _ = evaluate_model(model, tok, "squad_v2", long, max_new_tokens=3, max_source_len=64,
                                    progress=False)
    assert metrics["total"] == 1


def test_cli_eval_then_score_round_trip(tmp_path, tok, examples, capsys):
    data, _ = examples
    model_dir = _tiny("deconly", tok).save_pretrained(tmp_path / "model")
    rc = main(["eval", "--model", str(model_dir), "--task", "squad_v2", "--data", str(data), "--out",
               str(tmp_path / "res.json"), "--predictions", str(tmp_path / "preds.jsonl"), "--max-new-tokens", "3",
               "--batch-size", "3", "--quiet", "--device", "cpu"])
    assert rc == 0
    result = json.loads((tmp_path / "res.json").read_text())
    assert result["primary_metric"] == "f1" and result["metrics"]["total"] == 5
    preds = read_predictions(tmp_path / "preds.jsonl")
    assert set(preds) == {r["id"] for r in ROWS}
    capsys.readouterr()
    assert main(["score", "--task", "squad_v2", "--data", str(data), "--predictions",
                 str(tmp_path / "preds.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == result["metrics"]


def test_cli_score_squad_convention_and_errors(tmp_path, examples, capsys):
    data, _ = examples
    gold = {r["id"]: (r["answers"][0] if r["answers"] else "") for r in ROWS}
    (tmp_path / "p.json").write_text(json.dumps(gold))
    assert main(["score", "--task", "squad_v2", "--data", str(data), "--predictions", str(tmp_path / "p.json"),
                 "--out", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["metrics"]["exact"] == 100.0

    (tmp_path / "partial.json").write_text(json.dumps({"q0": "Brenmoor"}))
    (tmp_path / "bad.jsonl").write_text('{"id": "q0", "prediction": "x"}\n{"id": "q1"}\n')
    (tmp_path / "bad_data.jsonl").write_text('{"id": "q0", "context": "c", "question": "q"}\n')
    cases = [
        (["score", "--task", "squad_v2", "--data", str(data), "--predictions", str(tmp_path / "partial.json")],
         "no prediction for 4 of the 5 examples"),
        (["score", "--task", "squad_v2", "--data", str(data), "--predictions", str(tmp_path / "bad.jsonl")],
         "bad.jsonl, line 2: missing field 'prediction'"),
        (["score", "--task", "squad_v2", "--data", str(tmp_path / "bad_data.jsonl"), "--predictions",
          str(tmp_path / "p.json")], "bad_data.jsonl, line 1: missing field 'answers'"),
        (["score", "--task", "squad_v2", "--data", str(data), "--predictions", str(tmp_path / "none.json")],
         "no predictions file"),
        (["eval", "--model", str(tmp_path / "nomodel"), "--task", "vqa", "--data", str(data)], "field 'image' must be"),
        (["eval", "--model", str(tmp_path / "nomodel"), "--task", "squad_v2", "--data", str(data)], "no model at"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
