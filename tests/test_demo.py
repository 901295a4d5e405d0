"""`mu demo`: one end-to-end --quick run shared by the assertions (module-scoped), plus cheap unit checks."""

import json
import math
from pathlib import Path

import pytest

from mu.errors import MuError

STAGES = ("data", "teacher", "encdec", "deconly", "encdec_kd", "evaluate", "bench", "report")
MODELS = ("teacher", "encdec", "deconly", "encdec_kd")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from mu.cli import main

    out = tmp_path_factory.mktemp("demo") / "quick"
    assert main(["demo", "--quick", "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def report(demo):
    return json.loads((demo / "report.json").read_text())


def test_writes_every_output(demo, report):
    for name in ("report.md", "report.json"):
        assert (demo / name).stat().st_size > 0
    for name in ("training_curves.png", "quality.png", "latency.png"):
        data = (demo / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name  # a real plot, not an empty canvas
    assert set(report["models"]) == set(MODELS)


def test_report_numbers_agree_with_the_saved_models(demo, report):
    from mu.checkpoint import load_model

    for name in MODELS:
        entry = report["models"][name]
        model = load_model(demo / name / "final", device="cpu")
        assert entry["params"] == model.num_parameters()
        assert entry["arch"] == model.config.arch
        result = json.loads((demo / name / "result.json").read_text())
        assert entry["train_flops"] == pytest.approx(result["flops"])
        assert entry["train_examples"] == result["examples"]
        for key in ("exact", "f1"):
            assert 0.0 <= entry["metrics"][key] <= 100.0
            assert 0.0 <= entry["val_metrics"][key] <= 100.0
    scored = json.loads((demo / "evaluate" / "metrics.json").read_text())
    for name in MODELS:
        assert report["models"][name]["metrics"]["f1"] == pytest.approx(scored[name]["test"]["f1"])
        preds = (demo / "evaluate" / f"{name}_test_predictions.jsonl").read_text().splitlines()
        assert len(preds) == report["models"][name]["metrics"]["total"]


def test_students_are_matched_in_parameters_and_flops(report):
    m = report["models"]
    enc, dec, kd = m["encdec"], m["deconly"], m["encdec_kd"]
    assert enc["arch"] == kd["arch"] == "encdec" and dec["arch"] == "deconly" and m["teacher"]["arch"] == "deconly"
    assert abs(dec["params"] / enc["params"] - 1) <= 0.02
    assert enc["params"] == kd["params"]
    assert m["teacher"]["params"] >= 2 * enc["params"]
    budget = enc["flops_budget"]
    for r in (enc, dec, kd):
        assert r["flops_budget"] == budget
        # the trainer stops at the first step that reaches the budget: within one step of it
        per_step = r["train_flops"] / r["train_steps"]
        assert budget <= r["train_flops"] < budget + 1.5 * per_step
    # at the same FLOPs the encoder-decoder sees more examples (its decoder only reads the answer)
    assert enc["train_examples"] > dec["train_examples"]


def test_efficiency_ratios_and_comparisons(report):
    eff = report["efficiency"]
    for key in ("ttft_ratio", "decode_speedup", "memory_ratio", "flops_ratio"):
        assert isinstance(eff[key], float) and 0.0 <= eff[key] < math.inf, key
    assert eff["input_length"] == max(r["input_length"] for r in eff["by_length"])
    row = next(r for r in eff["by_length"] if r["input_length"] == eff["input_length"])
    assert eff["ttft_ratio"] == pytest.approx(row["encdec_ttft_s"] / row["deconly_ttft_s"])
    assert eff["flops_ratio"] < 1.0  # the encoder-decoder's generation needs fewer FLOPs (analytic)
    m, c = report["models"], report["comparisons"]
    assert c["encdec_vs_deconly"]["diff"] == pytest.approx(m["encdec"]["metrics"]["f1"] - m["deconly"]["metrics"]["f1"])
    assert c["kd_vs_ce"]["diff"] == pytest.approx(m["encdec_kd"]["metrics"]["f1"] - m["encdec"]["metrics"]["f1"])
    assert c["encdec_vs_deconly"]["met"] == (c["encdec_vs_deconly"]["diff"] >= 3.0)


def test_markdown_reports_the_json_numbers(demo, report):
    md = (demo / "report.md").read_text()
    for name in MODELS:
        assert f"{report['models'][name]['metrics']['f1']:.1f}" in md
    assert f"{report['comparisons']['encdec_vs_deconly']['diff']:+.1f} F1" in md
    assert "training_curves.png" in md and "latency.png" in md
    assert report["reading"] and all(p in md for p in report["reading"])


def test_rerun_reuses_every_stage(demo):
    from mu.demo import demo_config, run_demo

    before = {p: p.stat().st_mtime_ns for p in [demo / "report.json", demo / "encdec" / "final" / "model.safetensors"]}
    result = run_demo(demo_config(str(demo), "quick", progress=False))
    assert result.stages == {s: "reused" for s in STAGES}
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_changed_setting_redoes_that_stage_and_its_dependents(tmp_path):
    from mu.demo import demo_config
    from mu.demo.pipeline import Demo

    base = Demo(demo_config(str(tmp_path), "quick")).hashes
    changed = Demo(demo_config(str(tmp_path), "quick", kd_alpha=0.5)).hashes
    assert {s for s in STAGES if base[s] != changed[s]} == {"encdec_kd", "evaluate", "report"}
    changed = Demo(demo_config(str(tmp_path), "quick", teacher_lr=1e-3)).hashes
    assert {s for s in STAGES if base[s] != changed[s]} == {"teacher", "encdec_kd", "evaluate", "report"}
    changed = Demo(demo_config(str(tmp_path), "quick", n_train=300)).hashes
    assert {s for s in STAGES if base[s] != changed[s]} == set(STAGES) - {"bench"}


def test_decoder_only_twin_matches_parameters_or_refuses():
    from mu.config import MuConfig
    from mu.demo.config import deconly_twin
    from mu.train.flops import flops_params

    enc = MuConfig(n_encoder_layer=6, n_decoder_layer=3, n_embd=128, qkv_embd=128, n_head=4, n_kv_head=2,
                   hidden_dim=512, vocab_size=1152)
    twin = deconly_twin(enc)
    assert twin.arch == "deconly" and twin.n_embd == enc.n_embd and twin.hidden_dim == enc.hidden_dim
    assert abs(flops_params(twin).total / flops_params(enc).total - 1) <= 0.02
    with pytest.raises(MuError, match="within 2%"):  # 4+2 layers: 7 deconly layers are 6% off, 6 are 8% off
        deconly_twin(enc.replace(n_encoder_layer=4, n_decoder_layer=2))


def test_cli_user_mistakes_exit_2(tmp_path, capsys):
    from mu.cli import main

    assert main(["demo", "--out", str(tmp_path), "--val-data", "x.jsonl"]) == 2
    assert "--val-data needs --train-data" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path), "--quick", "--bench-preset", "huge"]) == 2
    assert "--bench-preset 'huge'" in capsys.readouterr().err


def test_report_says_when_every_model_only_abstains():
    from mu.demo.report import _claim_verdict, always_abstains

    assert always_abstains({"HasAns_f1": 0.0, "NoAns_f1": 100.0, "f1": 34.8})
    assert not always_abstains({"HasAns_f1": 12.0, "NoAns_f1": 90.0})
    assert "same answer to every question" in _claim_verdict(0.0, 0.0, 3.0)
    assert "other way" in _claim_verdict(-8.0, 1.0, 3.0)
    assert "holds" in _claim_verdict(5.0, 1.0, 3.0)
