"""Vision data side: preprocessing, VQA accuracy, synthetic shapes, jsonl reading, splits, training, evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mu.errors import MuError
from mu.vision import (ImageProcessor, PreprocessConfig, VisionTowerConfig, build_vlm, evaluate_vqa, load_image,
                       load_vlm, load_vqa_jsonl, normalize_answer, split_by_image, synthetic_shapes_vqa, train_vqa,
                       vqa_accuracy, vqa_score, write_vqa_jsonl)
from mu.vision.preprocess import select_best_resolution
from mu.vision.train import contrastive_pretrain

VQA_FILE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "vqa" / "vqa.jsonl"
TOWER = VisionTowerConfig(image_size=32, patch_size=8, width=32, depth=2, n_head=2, image_mean=(0.5, 0.25, 0.75),
                          image_std=(0.5, 0.25, 0.25))


# -- preprocessing ------------------------------------------------------------------------------


def test_square_modes_shapes_and_normalisation():
    image = Image.new("RGB", (80, 40), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 20, 40))  # a blue band on the left quarter
    for mode in ("crop", "pad", "squash"):
        out = ImageProcessor(TOWER, PreprocessConfig(resize=mode))(image)
        assert out.shape == (1, 3, 32, 32) and out.dtype == torch.float32
    crop = ImageProcessor(TOWER, PreprocessConfig(resize="crop"))(image)[0]
    torch.testing.assert_close(crop[:, 16, 16], torch.tensor([(1 - 0.5) / 0.5, (0 - 0.25) / 0.25, (0 - 0.75) / 0.25]))
    assert crop[2].max() < 0  # the centre crop of a 2:1 image drops the blue band
    pad = ImageProcessor(TOWER, PreprocessConfig(resize="pad"))(image)[0]
    assert pad[:, :6].abs().max() < 0.05 and pad[:, -6:].abs().max() < 0.05  # mean-colour bars normalise to ~0
    assert pad[2, 16, 2] > 0  # the blue band survives padding
    squash = ImageProcessor(TOWER, PreprocessConfig(resize="squash"))(image)[0]
    assert squash[2, 16, 2] > 0 and squash[2, 16, 20] < 0


def test_select_best_resolution_matches_llava():
    paper = [[336, 336], [672, 672], [1008, 672], [672, 1008]]
    assert select_best_resolution((1000, 600), paper) == (1008, 672)
    assert select_best_resolution((600, 1000), paper) == (672, 1008)
    assert select_best_resolution((300, 300), paper) == (336, 336)
    assert select_best_resolution((500, 500), paper) == (672, 672)


def test_anyres_tiles_base_view_plus_grid():
    proc = ImageProcessor(TOWER, PreprocessConfig(anyres=True))
    assert proc.pinpoints == [[32, 32], [64, 64], [96, 64], [64, 96]]
    for size, grid in [((30, 30), (1, 1)), ((60, 60), (2, 2)), ((100, 60), (3, 2)), ((50, 90), (2, 3))]:
        image = Image.new("RGB", size, (0, 200, 0))
        views = proc(image)
        assert proc.grid(size) == grid
        assert views.shape == (1 + grid[0] * grid[1], 3, 32, 32) and proc.num_views(size) == views.shape[0]
    custom = ImageProcessor(TOWER, PreprocessConfig(anyres=True, pinpoints=[[64, 32]]))
    assert custom(Image.new("RGB", (10, 10))).shape == (3, 3, 32, 32)


def test_load_image_errors(tmp_path):
    with pytest.raises(MuError, match="no image file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(MuError, match="not a file"):
        load_image(tmp_path)
    (tmp_path / "fake.jpg").write_bytes(b"\x00\x01 not a jpeg")
    with pytest.raises(MuError, match="not an image"):
        load_image(tmp_path / "fake.jpg")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "ok.jpg")
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[:len(data) // 2])
    with pytest.raises(MuError, match="cut.jpg"):
        load_image(tmp_path / "cut.jpg")
    Image.new("RGBA", (8, 8), (1, 2, 3, 4)).save(tmp_path / "a.png")
    assert load_image(tmp_path / "a.png").mode == "RGB"


def test_augment_views_keeps_shape_and_colour_and_is_seeded():
    from mu.vision.data import augment_views

    proc = ImageProcessor(TOWER)
    solid = proc(Image.new("RGB", (32, 32), (10, 200, 30)))
    out = augment_views(solid, torch.Generator().manual_seed(0))
    assert out.shape == solid.shape
    torch.testing.assert_close(out, solid)  # flips, rescales and shifts leave a flat colour unchanged
    shape = synthetic_shapes_vqa(1, seed=0, image_size=32)[0].image
    views = proc(shape)
    a = [augment_views(views, torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])


def test_background_jitter_recolours_the_background_only():
    from mu.vision.data import augment_views

    proc = ImageProcessor(TOWER)
    image = Image.new("RGB", (32, 32), (240, 240, 240))
    image.paste((200, 0, 0), (10, 10, 22, 22))  # a red square in the middle
    mean, std = torch.tensor(TOWER.image_mean), torch.tensor(TOWER.image_std)
    before = proc(image)
    changed = 0
    for seed in range(3):
        out = augment_views(before, torch.Generator().manual_seed(seed), max_shift=0, scale=(1.0, 1.0),
                            background=(mean, std))
        pixels = out[0] * std[:, None, None] + mean[:, None, None]
        corner, centre = pixels[:, 0, 0], pixels[:, 16, 16]
        assert corner.min() >= 0.82 - 1e-5 and corner.max() <= 1 + 1e-5  # a light background
        torch.testing.assert_close(centre, torch.tensor([200 / 255, 0.0, 0.0]))  # the shape keeps its colour
        changed += not torch.allclose(corner, torch.tensor([240 / 255] * 3), atol=1e-3)
    assert changed == 3


# -- VQA accuracy -------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, norm", [
    ("Yes", "yes"), ("yes!", "yes"), ("The dog.", "dog"), ("two", "2"), ("a red  circle", "red circle"),
    ("dont", "don't"), ("1,000", "1000"), ("3.5", "3.5"), ("black-and-white", "black and white"),
    ("Sailboats.", "sailboats"), ("none", "0"),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_vqa_score_single_and_multiple_answers():
    assert vqa_score("Circle.", ["circle"]) == 1.0
    assert vqa_score("circles", ["circle"]) == 0.0
    ten = ["net"] * 7 + ["netting", "netting", "fence"]
    assert vqa_score("net", ten) == 1.0
    assert vqa_score("netting", ten) == pytest.approx(2 / 3)
    assert vqa_score("fence", ten) == pytest.approx(1 / 3)
    assert vqa_score("wall", ten) == 0.0
    assert vqa_accuracy(["net", "netting", "yes"], [ten, ten, ["no"]]) == pytest.approx((1 + 2 / 3 + 0) / 3)


# -- synthetic shapes, jsonl, splits ------------------------------------------------------------


def test_synthetic_shapes_are_deterministic_by_seed():
    a, b, c = (synthetic_shapes_vqa(6, seed=s, image_size=48) for s in (3, 3, 4))
    assert [(e.id, e.question, e.answers) for e in a] == [(e.id, e.question, e.answers) for e in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    assert [(e.question, e.answers) for e in a] != [(e.question, e.answers) for e in c]
    assert a[0].image.size == (48, 48)
    kinds = {e.question.split()[0] for e in synthetic_shapes_vqa(40, seed=0)}
    assert {"how", "what", "where", "is", "does"} <= kinds
    one = synthetic_shapes_vqa(20, seed=1, max_shapes=1)
    assert all(e.answers == ["1"] for e in one if e.question == "how many shapes are there?")


def test_jsonl_round_trip_and_errors(tmp_path):
    examples = synthetic_shapes_vqa(3, seed=0, questions_per_image=4)
    path = write_vqa_jsonl(examples, tmp_path / "set" / "vqa.jsonl")
    loaded = load_vqa_jsonl(path)
    assert [(e.id, e.question, e.answers) for e in loaded] == [(e.id, e.question, e.answers) for e in examples]
    assert len({e.image_key for e in loaded}) == 3 and all(Path(e.image).is_file() for e in loaded)
    bad = tmp_path / "bad.jsonl"
    row = {"id": "x", "image": "set/images/shapes-0-0.png", "question": "q", "answers": ["a"]}
    for broken, message in [("{not json", "bad.jsonl:2: not valid JSON"),
                            (json.dumps({**row, "id": "y", "answers": []}), "bad.jsonl:2: field 'answers'"),
                            (json.dumps({**row, "id": "y", "question": 3}), "bad.jsonl:2: field 'question'"),
                            (json.dumps(row), "bad.jsonl:2: duplicate id"),
                            (json.dumps({**row, "id": "y", "image": "nope.png"}), "bad.jsonl:2: image 'nope.png'")]:
        bad.write_text(json.dumps(row) + "\n" + broken + "\n")
        with pytest.raises(MuError, match=message):
            load_vqa_jsonl(bad)


def test_split_by_image_never_shares_a_picture():
    examples = synthetic_shapes_vqa(20, seed=0)
    train, held = split_by_image(examples, 0.25, seed=1)
    assert len(train) + len(held) == len(examples)
    assert {e.image_key for e in held} and not {e.image_key for e in train} & {e.image_key for e in held}
    assert len({e.image_key for e in held}) == 5
    assert split_by_image(examples, 0.25, seed=1)[1] == held


def test_target_is_the_most_frequent_answer_first_on_ties():
    from mu.vision.data import VQAExample

    assert VQAExample("q", "img.png", "?", ["a", "b", "b", "c"]).target == "b"
    assert VQAExample("q", "img.png", "?", ["c", "a", "a", "c"]).target == "c"


def test_real_vqa_file_reads_record_for_record():
    """Every line becomes one example with its id, question, answers and image (resolved against the file's
    folder, existing); questions about one picture share its image_key; the target is the most frequent answer."""
    if not VQA_FILE.is_file():
        pytest.skip(f"shared VQA data not found at {VQA_FILE}")
    records = [json.loads(line) for line in VQA_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
    examples = load_vqa_jsonl(VQA_FILE)
    assert len(examples) == len(records)
    for e, r in zip(examples, records):
        assert (e.id, e.question, e.answers) == (r["id"], r["question"], r["answers"])
        assert Path(e.image) == (VQA_FILE.parent / r["image"]).resolve() and Path(e.image).is_file()
        counts = {a: r["answers"].count(a) for a in r["answers"]}
        assert counts[e.target] == max(counts.values())
        assert e.target == next(a for a in r["answers"] if counts[a] == max(counts.values()))  # first on ties
    keys = {}
    for e, r in zip(examples, records):
        keys.setdefault(r["image"], set()).add(e.image_key)
    assert all(len(k) == 1 for k in keys.values()) and len({next(iter(k)) for k in keys.values()}) == len(keys)


# -- training and evaluation --------------------------------------------------------------------


def test_train_vqa_learns_from_the_image_and_writes_a_loadable_run(tmp_path):
    # the same question about four pictures with four different answers: only the image tells them apart
    pool = synthetic_shapes_vqa(12, seed=0, image_size=32, max_shapes=1)
    data, colours = [], set()
    for e in pool:
        if e.question == "what color is the shape?" and e.answers[0] not in colours and len(data) < 4:
            colours.add(e.answers[0])
            data.append(e)
    assert len(data) == 4
    torch.manual_seed(0)
    vlm = build_vlm("tiny", tower=VisionTowerConfig(image_size=32, patch_size=8, width=32, depth=1, n_head=2),
                    n_encoder_layer=1, n_decoder_layer=1, dropout=0.0)
    summary = train_vqa(vlm, data, tmp_path / "run", align_steps=5, steps=120, lr=3e-3, tower_lr_scale=1.0,
                        batch_size=4, eval_data=data, eval_every=60, log_every=10, progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert [r["stage"] for r in records if "loss" in r][0] == "align"
    assert losses[-1] < 0.05 * losses[0]
    assert summary["steps"] == 125
    assert summary["eval"]["accuracy"] >= 0.75  # ignoring the image caps it at 0.25
    assert [r["step"] for r in records if "eval_accuracy" in r] == [60, 120, 125]
    loaded = load_vlm(tmp_path / "run" / "final")
    result = evaluate_vqa(loaded, data, batch_size=3, predictions_file=tmp_path / "pred.jsonl")
    assert result["accuracy"] == summary["eval"]["accuracy"] and result["n"] == len(data)
    predictions = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert [p["id"] for p in predictions] == [e.id for e in data]
    assert sum(p["prediction"] == e.answers[0] for p, e in zip(predictions, data)) >= 3


def test_align_stage_trains_only_the_projector():
    torch.manual_seed(0)
    vlm = build_vlm("tiny", tower=TOWER, n_encoder_layer=1, n_decoder_layer=1, dropout=0.0)
    before = {k: v.clone() for k, v in vlm.state_dict().items()}
    train_vqa(vlm, synthetic_shapes_vqa(2, seed=0, image_size=32), None, align_steps=3, steps=0, progress=False)
    changed = {k.split(".")[0] for k, v in vlm.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"projector"}


def test_contrastive_stage_trains_only_the_tower_and_separates_shapes():
    # two shapes in random colours and places: after the stage, mean-pooled tower features of the
    # same shape are closer than those of different shapes (a fresh tower has no such preference)
    pool = [e for e in synthetic_shapes_vqa(40, seed=0, image_size=32, max_shapes=1)
            if e.question == "what shape is in the image?" and e.answers[0] in ("circle", "rectangle")]
    assert len(pool) >= 16
    torch.manual_seed(0)
    tower = VisionTowerConfig(image_size=32, patch_size=8, width=32, depth=1, n_head=2, stem="conv")
    vlm = build_vlm("tiny", tower=tower, n_encoder_layer=1, n_decoder_layer=1, dropout=0.0)
    before = {k: v.clone() for k, v in vlm.state_dict().items()}

    def margin():
        with torch.no_grad():
            vlm.tower.eval()
            x = torch.stack([vlm.processor(e.image)[0] for e in pool])
            f = torch.nn.functional.normalize(vlm.tower(x).mean(1), dim=-1)
            sim = f @ f.T
            same = torch.tensor([[a.target == b.target for b in pool] for a in pool])
            off = ~torch.eye(len(pool), dtype=torch.bool)
            return float(sim[same & off].mean() - sim[~same].mean())

    m0 = margin()
    done = contrastive_pretrain(vlm, pool, 60, lr=3e-3, batch_size=16, augment=False)
    assert done["steps"] == 60
    changed = {k.split(".")[0] for k, v in vlm.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"tower"}
    assert margin() > m0 + 0.2
    with pytest.raises(MuError, match="2 different target texts"):
        contrastive_pretrain(vlm, pool[:1], 1)


def test_train_vqa_argument_errors():
    vlm = build_vlm("tiny", tower=TOWER, n_encoder_layer=1, n_decoder_layer=1)
    data = synthetic_shapes_vqa(1, seed=0, image_size=32)
    with pytest.raises(MuError, match="trainable"):
        train_vqa(vlm, data, trainable=("decoder",), progress=False)
    with pytest.raises(MuError, match="some steps"):
        train_vqa(vlm, data, steps=0, progress=False)


def test_cli_train_eval_and_score_vqa(tmp_path, capsys):
    from mu.cli import main

    write_vqa_jsonl(synthetic_shapes_vqa(12, seed=0, image_size=32), tmp_path / "train.jsonl")
    write_vqa_jsonl(synthetic_shapes_vqa(4, seed=1, image_size=32), tmp_path / "val.jsonl")
    captions = [e for e in synthetic_shapes_vqa(12, seed=0, image_size=32) if "color" in e.question]
    write_vqa_jsonl(captions, tmp_path / "captions.jsonl")
    run = tmp_path / "run"
    argv = ["train", "--task", "vqa", "--preset", "tiny", "--train-data", str(tmp_path / "train.jsonl"),
            "--val-data", str(tmp_path / "val.jsonl"), "--out", str(run), "--image-size", "32", "--vit-width", "32",
            "--vit-depth", "1", "--contrastive-steps", "2", "--align-steps", "1", "--max-steps", "3",
            "--batch-size", "4", "--no-progress", "--align-data", str(tmp_path / "captions.jsonl"),
            "--weight-init", "fan_in", "--pool", "2"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert json.loads((run / "final" / "config.json").read_text())["vision"]["tower"]["pool_stride"] == 2
    assert summary["steps"] == 6 and summary["contrastive_steps"] == 2 and summary["final_dir"] == str(run / "final")
    assert summary["stages"][0] == {"name": "align", "steps": 1, "trainable": ["tower", "projector", "lm"],
                                    "lr": 1e-3, "examples": len(captions)}
    assert main(argv[:-4] + ["--out", str(tmp_path / "r1"), "--init", str(run / "final"), "--weight-init",
                             "fan_in"]) == 2
    assert "--weight-init applies to a fresh --preset text model" in capsys.readouterr().err
    assert main(argv) == 0  # a finished run resumes at its end, as text runs do: no step is trained again
    out, err = capsys.readouterr()
    assert "resuming from" in err and json.loads(out.strip().splitlines()[-1])["steps"] == 6

    preds = tmp_path / "preds.jsonl"
    assert main(["eval", "--task", "vqa", "--model", str(run / "final"), "--data", str(tmp_path / "val.jsonl"),
                 "--predictions", str(preds), "--out", str(tmp_path / "res.json"), "--quiet"]) == 0
    result = json.loads((tmp_path / "res.json").read_text())
    n = len(load_vqa_jsonl(tmp_path / "val.jsonl"))
    assert result["metrics"]["n"] == n and 0.0 <= result["metrics"]["accuracy"] <= 1.0
    capsys.readouterr()
    assert main(["score", "--task", "vqa", "--data", str(tmp_path / "val.jsonl"), "--predictions", str(preds)]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["accuracy"] == pytest.approx(result["metrics"]["accuracy"])  # same predictions, same metric

    assert main(["train", "--task", "vqa", "--preset", "tiny", "--train-data", str(tmp_path / "train.jsonl"),
                 "--out", str(tmp_path / "r2"), "--max-flops", "1e9"]) == 2
    assert "--max-flops" in capsys.readouterr().err
