"""One CLI layer: flags built from the config dataclasses, one --task registry, verbs that share flags stay equal."""

import json
import re
from pathlib import Path

import pytest

from mu.cli import build_parser, main
from mu.commands import tasks
from mu.commands.args import config_layout
from mu.train.config import TrainConfig

SRC = Path(__file__).resolve().parents[1] / "src" / "mu"


def _options(verb: str) -> dict[str, object]:
    parser = build_parser(verb)
    sub = next(a for a in parser._actions if a.dest == "verb").choices[verb]
    return {opt: action for action in sub._actions for opt in action.option_strings}


def test_distill_takes_every_training_flag_of_train():
    """`mu distill` shares `mu train`'s training flags (it once lacked --decay-fraction and --compile)."""
    from mu.commands.distill import STUDENT_FIXED

    train, distill = _options("train"), _options("distill")
    shared = [o for o, a in train.items() if a.dest in {f for _, fs in config_layout(TrainConfig)[1] for f in fs}
              and a.dest not in STUDENT_FIXED]
    assert "--decay-fraction" in shared and "--compile" in shared
    missing = [o for o in shared if o not in distill]
    assert not missing, f"mu distill lacks {missing}"
    def kind(action):
        return getattr(action.type, "__name__", action.type)

    for o in shared:  # same defaults and types, not just the same names
        assert (distill[o].default, kind(distill[o]), distill[o].choices) == (train[o].default, kind(train[o]),
                                                                              train[o].choices), o


def test_flags_reach_the_config(tmp_path):
    from mu.commands.distill import config_from_args as distill_config
    from mu.commands.train import config_from_args

    common = ["--train-data", "x.jsonl", "--out", str(tmp_path), "--schedule", "wsd", "--decay-fraction", "0.3",
              "--compile", "--no-progress", "--max-flops", "2e12", "--global-batch-size", "1_024"]
    args = build_parser("train").parse_args(["train", *common, "--preset", "tiny", "--dropout", "0.2"])
    cfg = config_from_args(args)
    assert (cfg.schedule, cfg.decay_fraction, cfg.compile, cfg.progress, cfg.max_flops, cfg.global_batch_size) == \
        ("wsd", 0.3, True, False, 2e12, 1024)
    assert (cfg.preset, cfg.model_overrides, cfg.lr, cfg.resume) == ("tiny", {"dropout": 0.2}, 3e-4, True)
    args = build_parser("distill").parse_args(["distill", "--teacher", "t", "--student-preset", "tiny", *common,
                                               "--no-t2-scaling", "--sample-top-k", "0"])
    kd = distill_config(args)
    assert (kd.train.schedule, kd.train.decay_fraction, kd.train.compile, kd.train.progress) == ("wsd", 0.3, True,
                                                                                                 False)
    assert (kd.scale_by_t2, kd.sample_top_k, kd.train.arch, kd.train.preset) == (False, None, "encdec", "tiny")
    args = build_parser("pretrain").parse_args(["pretrain", "--train-data", "c.txt", "--out", str(tmp_path),
                                                "--arch", "deconly"])
    cfg = config_from_args(args, pretrain=True)
    assert (cfg.objective, cfg.lr, cfg.preset) == ("causal", 1e-3, "small")


def test_help_comes_from_the_field_comments(capsys):
    comments, _ = config_layout(TrainConfig)
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in ("decay_fraction", "keep_checkpoints", "max_tokens"):
        assert " ".join(comments[name].split()) in text, name


def test_every_verb_offers_the_registry_tasks():
    for verb in ("train", "eval", "score", "distill", "finetune-teacher"):
        assert list(_options(verb)["--task"].choices) == tasks.choices(verb), verb
    assert {"squad_v2", "xsum", "code2text", "seq2seq", "vqa"} <= set(tasks.choices("eval"))
    assert "vqa" in tasks.choices("train") and "vqa" not in tasks.choices("distill")
    assert "--tower" in _options("train")  # VQA's own options come with the task kind


def test_no_source_file_names_the_shared_data_folder():
    pattern = re.compile(r"""\.\./shared|["']shared["']\s*/""")
    hits = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if pattern.search(p.read_text(encoding="utf-8"))]
    assert not hits, f"these name ../shared (use $MU_DATA): {hits}"


def test_number_is_defined_once():
    defs = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if re.search(r"^def _?number\(",
                                                                             p.read_text(encoding="utf-8"), re.M)]
    assert defs == ["commands/args.py"]


def test_finetune_teacher_refuses_an_infinite_lr(tmp_path, capsys):
    rc = main(["finetune-teacher", "--model", str(tmp_path), "--train-data", "x.jsonl", "--out",
               str(tmp_path / "o"), "--lr", "inf"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == "mu finetune-teacher: error: --lr must be a finite number, got inf"
    assert not (tmp_path / "o").exists()


def test_score_vqa_honours_allow_missing(tmp_path, capsys):
    data = tmp_path / "vqa.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "image": "none.png", "question": "colour?",
                                        "answers": ["red"]}) + "\n" for i in range(4)))
    preds = tmp_path / "p.json"
    preds.write_text(json.dumps({"q0": "red", "q1": "blue"}))
    args = ["score", "--task", "vqa", "--data", str(data), "--predictions", str(preds)]
    assert main(args) == 2 and "no prediction for 2 of the 4" in capsys.readouterr().err
    assert main([*args, "--allow-missing"]) == 0
    out = capsys.readouterr()
    assert "no prediction for 2 of the 4" in out.err and json.loads(out.out)["accuracy"] == pytest.approx(0.5)
