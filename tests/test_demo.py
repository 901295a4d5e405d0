"""`mu demo`: one end-to-end --quick run shared by the assertions (module-scoped), plus cheap unit checks."""

import json
import math

import pytest

from mu.errors import MuError

MODELS = ("teacher", "encdec", "deconly", "encdec_kd", "encdec_kd_on")
STUDENTS = MODELS[1:]
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
    assert set(report["tasks"]) == {"context_first"} and report["tasks"]["context_first"]["models"] == report["models"]


def test_every_student_has_its_seeds_and_means(report):
    cfg = report["config"]
    for name in STUDENTS:
        m = report["models"][name]
        seeds = [p["seed"] for p in m["per_seed"]]
        assert seeds == list(range(cfg["seed"], cfg["seed"] + cfg["seeds"]))
        assert m["metrics"]["f1"] == pytest.approx(sum(p["f1"] for p in m["per_seed"]) / len(seeds))
        lo, hi = m["f1_ci95"]
        assert 0.0 <= lo <= hi <= 100.0
        assert len(m["curves"]) == len(seeds) and all(c["points"] for c in m["curves"])
        kinds = m["by_kind"]  # F1 per kind of test question: the parts add up to the whole
        assert sum(k["n"] for k in kinds.values()) == m["metrics"]["total"]
        assert sum(k["n"] * k["f1"] for k in kinds.values()) / m["metrics"]["total"] == pytest.approx(m["metrics"]["f1"])
        assert all(p["flops"] > 0 and p["val_loss"] is not None for c in m["curves"] for p in c["points"])


def test_report_numbers_agree_with_the_saved_runs(demo, report):
    from mu.checkpoint import load_model

    for name in MODELS:
        entry = report["models"][name]
        for p, model_dir in zip(entry["per_seed"], entry["model_dirs"]):
            run = json.loads((demo / "context_first" / name / f"seed{p['seed']}-lr{p['lr']:g}" / "run.json").read_text())
            assert run["test"]["f1"] == pytest.approx(p["f1"]) and run["train"]["flops"] == pytest.approx(p["train_flops"])
            preds = (demo / "context_first" / name / f"seed{p['seed']}-lr{p['lr']:g}" / "test_predictions.jsonl")
            assert len(preds.read_text().splitlines()) == p["total"] == report["config"]["n_test"]
        model = load_model(entry["model_dirs"][0], device="cpu")
        assert entry["params"] == model.num_parameters()
        assert entry["arch"] == model.config.arch


def test_students_are_matched_in_parameters_and_flops(report):
    m = report["models"]
    enc, dec = m["encdec"], m["deconly"]
    assert all(m[n]["arch"] == "encdec" for n in ("encdec", "encdec_kd", "encdec_kd_on"))
    assert dec["arch"] == "deconly" and m["teacher"]["arch"] == "deconly"
    assert abs(dec["params"] / enc["params"] - 1) <= 0.02
    assert m["teacher"]["params"] > enc["params"]
    budget = report["tasks"]["context_first"]["flops_budget"]
    for name in STUDENTS:
        for p in m[name]["per_seed"]:  # the trainer stops at the first step that reaches the budget
            assert budget <= p["train_flops"] < budget + 1.5 * p["train_flops"] / p["train_steps"]
    assert enc["train_examples"] > dec["train_examples"]  # same FLOPs: the encoder-decoder sees more examples
    step = max(p["train_flops"] / p["train_steps"] for n in ("encdec", "deconly") for p in m[n]["per_seed"])
    assert abs(report["claims"]["architecture"]["flops_ratio"] - 1) <= 1.5 * step / budget  # within a step


def test_lr_grid_is_shared_and_chosen_on_validation(demo, report):
    t = report["tasks"]["context_first"]
    for name in ("encdec", "deconly"):
        g = t["grid"][name]
        assert set(g["by_lr"]) == {f"{x:g}" for x in report["config"]["lr_grid"]}
        best = max(g["by_lr"].items(), key=lambda kv: (kv[1]["val_f1"], -(kv[1]["val_loss"] or 0), -float(kv[0])))
        assert float(best[0]) == g["chosen_lr"] == report["models"][name]["lr"]
    for name in ("encdec_kd", "encdec_kd_on"):  # KD students train at the CE encoder-decoder's chosen rate
        assert report["models"][name]["lr"] == t["grid"]["encdec"]["chosen_lr"]


def test_claims_are_paired_differences_with_intervals(report):
    m = report["models"]
    for claim, (a, b) in {"architecture": ("encdec", "deconly"), "distillation": ("encdec_kd_on", "encdec"),
                          "distillation_off_policy": ("encdec_kd", "encdec")}.items():
        c = report["claims"][claim]
        assert c["seeds"] == report["config"]["seeds"]
        assert c["f1_diff"] == pytest.approx(m[a]["metrics"]["f1"] - m[b]["metrics"]["f1"], abs=1e-6)
        assert c["ci95"][0] <= c["f1_diff"] + 1e-9 and c["f1_diff"] <= c["ci95"][1] + 1e-9
        assert c["met"] == (c["f1_diff"] >= 3.0)


def test_efficiency_ratios(report):
    eff = report["efficiency"]
    for key in ("ttft_ratio", "decode_speedup", "memory_ratio", "flops_ratio"):
        assert isinstance(eff[key], float) and 0.0 <= eff[key] < math.inf, key
    assert eff["flops_ratio"] < 1.0  # the encoder-decoder's generation needs fewer FLOPs (analytic)


def test_markdown_reports_the_json_numbers(demo, report):
    md = (demo / "report.md").read_text()
    for name in MODELS:
        assert f"{report['models'][name]['metrics']['f1']:.1f}" in md
    assert f"{report['claims']['architecture']['f1_diff']:+.1f} F1" in md
    assert "training_curves.png" in md and "latency.png" in md
    assert report["reading"] and all(p in md for p in report["reading"])


def test_rerun_reuses_every_run(demo):
    from mu.demo import demo_config, run_demo

    before = {p: p.stat().st_mtime_ns for p in demo.glob("context_first/*/*/run.json")}
    result = run_demo(demo_config(str(demo), "quick", progress=False))
    assert set(result.stages.values()) == {"reused", "ran"} and result.stages["report"] == "ran"
    assert all(v == "reused" for k, v in result.stages.items() if k != "report")
    assert {p: p.stat().st_mtime_ns for p in before} == before


def _teachers_done(d, val_f1=(50.0,)):
    """Mark the demo's teacher runs finished with these validation F1s (so KD payloads can name their teacher)."""
    for family in d.cfg.families:
        for spec, f1 in zip(d.teacher_specs(family), val_f1):
            d.records[spec.key] = {"val": {"f1": f1}, "train": {"val_loss": 1.0}}


def test_teacher_with_the_best_validation_f1_teaches(tmp_path):
    from mu.demo import demo_config
    from mu.demo.pipeline import Demo, RunSpec

    d = Demo(demo_config(str(tmp_path), "quick", progress=False, teacher_seeds=3))
    d.run_data()
    assert [s.seed for s in d.teacher_specs("context_first")] == [0, 1, 2]
    assert d.teacher_spec("context_first") is None  # KD waits for every teacher
    _teachers_done(d, (70.0, 88.0, 88.0))
    assert d.teacher_spec("context_first").seed == 1  # best validation F1; ties go to the lower seed
    kd = d.payload(RunSpec("context_first", "encdec_kd", 0, 2e-3))
    assert kd["kd"]["teacher"].endswith(str(d.run_dir(d.teacher_specs("context_first")[1]) / "final"))


def test_changed_setting_redoes_only_what_depends_on_it(tmp_path):
    from mu.demo import demo_config
    from mu.demo.pipeline import Demo, RunSpec

    def hashes(**kw):
        d = Demo(demo_config(str(tmp_path), "quick", progress=False, **kw))
        d.run_data()
        _teachers_done(d)
        specs = [d.teacher_spec("context_first")] + [RunSpec("context_first", m, 0, 2e-3) for m in STUDENTS]
        return {s.model: d.payload(s)["hash"] for s in specs}

    base = hashes()
    assert {m for m, h in hashes(kd_alpha=0.5).items() if h != base[m]} == {"encdec_kd", "encdec_kd_on"}
    assert {m for m, h in hashes(teacher_lr=1e-3).items() if h != base[m]} == {"teacher", "encdec_kd", "encdec_kd_on"}
    assert {m for m, h in hashes(n_train=600).items() if h != base[m]} == set(MODELS)
    assert {m for m, h in hashes(teacher_documents=False).items() if h != base[m]} == {"teacher", "encdec_kd",
                                                                                      "encdec_kd_on"}
    assert {m for m, h in hashes(teacher_batch_size=8).items() if h != base[m]} == {"teacher", "encdec_kd",
                                                                                    "encdec_kd_on"}
    d = Demo(demo_config(str(tmp_path), "quick", progress=False, teacher_batch_size=8, teacher_examples=80))
    assert d.payload(d.teacher_specs("context_first")[0])["train"]["batch_size"] == 8  # 10 steps
    assert d.payload(RunSpec("context_first", "encdec", 0, 2e-3))["train"]["batch_size"] == d.cfg.batch_size
    assert d.est_steps(d.teacher_specs("context_first")[0]) == 10


def test_teacher_learns_from_documents_and_students_from_single_questions(demo):
    def scored_per_sequence(model):
        (path,) = demo.glob(f"context_first/{model}/seed0-*/run.json") if model == "teacher" else \
            sorted(demo.glob(f"context_first/{model}/seed0-*/run.json"))[:1]
        t = json.loads(path.read_text())["train"]
        return t["loss_tokens"] / t["examples"]

    assert scored_per_sequence("teacher") > 20  # a paragraph and its questions, every token after the first
    (teacher,) = demo.glob("context_first/teacher/seed0-*/run.json")
    curve = json.loads(teacher.read_text())["curve"]  # validated on single questions: answer loss and F1
    assert curve and all(p["val_loss"] is not None and p["f1"] is not None for p in curve)
    assert scored_per_sequence("encdec") == scored_per_sequence("deconly") == 2  # the answer word and EOS


def test_teacher_documents_read_each_paragraph_once_in_either_order(tmp_path):
    from mu.data.synthetic_words import ORDERS, word_example, word_prompt, word_splits, word_tokenizer
    from mu.demo.runs import teacher_documents

    records = word_splits(30, 0, 0, seed=3)["train"]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    by_paragraph: dict[str, list[dict]] = {}
    for r in records:
        by_paragraph.setdefault(r["context"], []).append(r)
    tok = word_tokenizer()
    for order in ORDERS:
        payload = {"family": order, "data": {"train": str(path)},
                   "train": {"max_source_len": 64, "max_target_len": 4, "task": "squad_v2"}}
        docs = teacher_documents(payload, tok, [word_example(r, order) for r in records])
        assert len(docs) == len(by_paragraph)
        for k, (context, rs) in enumerate(by_paragraph.items()):
            d = docs.get(k, 0)
            text = tok.decode(d["source_ids"] + d["target_ids"])
            first = word_example(rs[0], order)  # a single question is the start of its document
            assert text.startswith(f"{word_prompt(rs[0], order)} {first.target} </s>")
            assert text.count(context) == 1 and text.count(" question ") + text.startswith("question") == len(rs)


def test_teacher_data_changes_only_the_teacher_and_its_students(tmp_path):
    from mu.data.tasks import iter_jsonl
    from mu.demo import demo_config
    from mu.demo.pipeline import Demo, RunSpec

    def demo(**kw):
        d = Demo(demo_config(str(tmp_path), "quick", progress=False, **kw))
        d.run_data()
        _teachers_done(d)
        return d

    plain = demo()
    specs = [plain.teacher_spec("context_first")] + [RunSpec("context_first", m, 0, 2e-3) for m in STUDENTS]
    before = {s.model: plain.payload(s) for s in specs}
    hard = demo(teacher_synthetic={"facts_per_paragraph": 6, "negatives": ["absent_person", "other_person"]})
    after = {s.model: hard.payload(s) for s in specs}
    assert {m for m in before if before[m]["hash"] != after[m]["hash"]} == {"teacher", "encdec_kd", "encdec_kd_on"}
    assert after["teacher"]["data"]["train"].endswith("teacher_train.jsonl")
    assert all(after[m]["data"] == before[m]["data"] for m in STUDENTS)
    held_out = {r["context"] for s in ("val", "test") for _, r in iter_jsonl(after["teacher"]["data"][s])}
    teacher_rows = [r for _, r in iter_jsonl(after["teacher"]["data"]["train"])]
    assert len(teacher_rows) > 0.9 * hard.cfg.n_train and not {r["context"] for r in teacher_rows} & held_out
    assert all(len(r["context"].split(" . ")) == 6 for r in teacher_rows)  # the teacher's knobs, not the students'
    with pytest.raises(MuError, match="teacher_synthetic"):
        demo_config(str(tmp_path), "quick", train_data="x.jsonl", teacher_synthetic={})


def test_family_budget_scale_is_the_same_for_every_student(tmp_path):
    from mu.demo import demo_config
    from mu.demo.pipeline import Demo, RunSpec

    d = Demo(demo_config(str(tmp_path), "quick", progress=False, families=("context_first", "question_first"),
                         family_budget_scale={"question_first": 2.0}))
    d.run_data()
    _teachers_done(d)
    one, two = d.student_budget("context_first"), d.student_budget("question_first")
    per_example = d.flops_per_example("question_first", "encdec") / d.flops_per_example("context_first", "encdec")
    assert two == pytest.approx(2.0 * one * per_example)
    for model in STUDENTS:  # every student of the family trains on that one budget
        assert d.payload(RunSpec("question_first", model, 0, 2e-3))["train"]["max_flops"] == two
        assert d.payload(RunSpec("context_first", model, 0, 2e-3))["train"]["max_flops"] == one
    assert d.est_steps(RunSpec("question_first", "deconly", 0, 2e-3)) > d.est_steps(RunSpec("context_first", "deconly",
                                                                                            0, 2e-3))
    with pytest.raises(MuError, match="family_budget_scale"):
        demo_config(str(tmp_path), "quick", family_budget_scale={"question_first": 0})


def test_decoder_only_twin_matches_parameters_or_refuses():
    from mu.config import MuConfig
    from mu.demo.config import STUDENT_DEFAULT, deconly_twin
    from mu.train.flops import flops_params

    enc = MuConfig(**STUDENT_DEFAULT, vocab_size=160)
    twin = deconly_twin(enc)
    assert twin.arch == "deconly" and twin.n_embd == enc.n_embd and twin.hidden_dim == enc.hidden_dim
    assert abs(flops_params(twin).total / flops_params(enc).total - 1) <= 0.02
    with pytest.raises(MuError, match="within 2%"):  # 4+2 layers with GQA and a 4x MLP: 7 layers are 6% off
        deconly_twin(MuConfig(n_encoder_layer=4, n_decoder_layer=2, n_embd=128, qkv_embd=128, n_head=4, n_kv_head=2,
                              hidden_dim=512, vocab_size=1152))


def test_cli_user_mistakes_exit_2(tmp_path, capsys):
    from mu.cli import main

    assert main(["demo", "--out", str(tmp_path), "--val-data", "x.jsonl"]) == 2
    assert "--val-data needs --train-data" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path), "--quick", "--bench-preset", "huge"]) == 2
    assert "--bench-preset 'huge'" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path), "--quick", "--families", "sideways"]) == 2
    assert "sideways" in capsys.readouterr().err


def test_bootstrap_interval_and_verdicts():
    from mu.demo.report import _claim_verdict, always_abstains, bootstrap_diff

    ids = [str(i) for i in range(200)]
    a = [{i: 1.0 if int(i) % 2 else 0.0 for i in ids} for _ in range(3)]
    b = [{i: 0.0 for i in ids} for _ in range(3)]
    d = bootstrap_diff(a, b, resamples=300)
    assert d["f1_diff"] == pytest.approx(50.0) and d["seeds"] == 3 and d["questions"] == 200
    assert 40.0 < d["ci95"][0] < 50.0 < d["ci95"][1] < 60.0
    same = bootstrap_diff(b, b, resamples=50)
    assert same["f1_diff"] == 0.0 and same["ci95"] == [0.0, 0.0]
    assert always_abstains({"HasAns_f1": 0.0, "NoAns_f1": 100.0, "f1": 34.8})
    assert not always_abstains({"HasAns_f1": 12.0, "NoAns_f1": 90.0})
    assert "same answer to every question" in _claim_verdict(0.0, [0.0, 0.0], 3.0)
    assert "other way" in _claim_verdict(-8.0, [-10.0, -6.0], 3.0)
    assert "holds" in _claim_verdict(5.0, [3.0, 7.0], 3.0)
