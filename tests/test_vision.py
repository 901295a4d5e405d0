"""Vision-language model: tiny CLIP / native towers, image-token splicing, cached generation, save/load, CLI."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from mu.errors import MuError
from mu.vision import PreprocessConfig, VisionTowerConfig, build_vlm, hf_tower_config, load_vlm

EXAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "examples"


def tiny_clip_tower(pool_stride=1, **kw):
    from transformers import CLIPVisionConfig

    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8)
    return hf_tower_config(cfg, pool_stride=pool_stride, **kw)


def tiny_vlm(tower=None, **kw):
    torch.manual_seed(0)
    tower = tower or VisionTowerConfig(image_size=32, patch_size=8, width=32, depth=2, n_head=2)
    return build_vlm("tiny", tower=tower, n_encoder_layer=2, n_decoder_layer=2, dropout=0.0, **kw).eval()


def pixels(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_tiny_clip_tower_selects_second_to_last_patch_tokens():
    vlm = tiny_vlm(tiny_clip_tower())
    assert vlm.vision_config.tower.tokens_per_view == 16  # (32 / 8)^2 patches, CLS dropped
    x = pixels(2)
    out = vlm.tower.model(pixel_values=x, output_hidden_states=True)
    torch.testing.assert_close(vlm.tower(x), out.hidden_states[-2][:, 1:])
    feats = vlm.encode_images(x)
    assert [f.shape for f in feats] == [torch.Size([16, vlm.config.n_embd])] * 2


def test_pooled_patch_tokens_average_the_grid():
    vlm = tiny_vlm(tiny_clip_tower(pool_stride=2))
    assert vlm.vision_config.tower.tokens_per_view == 4  # the 4x4 grid pooled to 2x2
    x = pixels(2)
    grid = vlm.tower.model(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
    grid = grid.reshape(2, 4, 4, -1)  # (N, row, col, D)
    top_left = grid[:, :2, :2].mean(dim=(1, 2))
    bottom_right = grid[:, 2:, 2:].mean(dim=(1, 2))
    out = vlm.tower(x)
    assert out.shape == (2, 4, 32)
    torch.testing.assert_close(out[:, 0], top_left)
    torch.testing.assert_close(out[:, 3], bottom_right)
    with pytest.raises(MuError, match="pool_stride 3 must divide"):
        tiny_clip_tower(pool_stride=3)


def test_siglip_tower_has_no_cls_token():
    from transformers import SiglipVisionConfig

    cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             image_size=32, patch_size=8)
    vlm = tiny_vlm(hf_tower_config(cfg))
    assert vlm.encode_images(pixels(1))[0].shape[0] == 16
    with pytest.raises(MuError, match="no CLS"):
        hf_tower_config(cfg, feature_select="cls_patch")


def test_forward_trains_every_part_with_clip_tower():
    vlm = tiny_vlm(tiny_clip_tower()).train()
    ids, mask = vlm.tokenize_prompts(["what colour?", "is it round or square?"])
    dec = torch.tensor([[1, 70, 71], [1, 72, 0]])
    tgt = torch.tensor([[70, 71, 2], [72, 2, 0]])
    out = vlm(ids, pixels(2), dec, tgt, attention_mask=mask)
    assert out.logits.shape == (2, 3, vlm.config.vocab_size) and torch.isfinite(out.loss)
    out.loss.backward()
    for part in (vlm.tower, vlm.projector, vlm.lm):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


def test_conv_stem_keeps_the_patch_grid_and_checks_its_patch_size():
    from mu.vision.towers import NativeViT

    tower = NativeViT(VisionTowerConfig(image_size=32, patch_size=8, width=32, depth=1, n_head=2, stem="conv",
                                        feature_select="cls_patch"))
    assert tower(pixels(3)).shape == (3, 1 + 16, 32)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in tower.patch_embed.modules()) == 4  # 3 halvings + 1x1
    with pytest.raises(MuError, match="power of 2"):
        VisionTowerConfig(image_size=36, patch_size=6, stem="conv")
    with pytest.raises(MuError, match="stem"):
        VisionTowerConfig(stem="resnet")


def test_splice_puts_image_features_at_the_placeholder_with_padding():
    vlm = tiny_vlm()
    img, pad, D = vlm.image_token_id, vlm.config.pad_token_id, vlm.config.n_embd
    ids = torch.tensor([[10, 11, img, 12, pad, pad],   # placeholder in the middle, right padding
                        [img, 20, 21, 22, 23, 24],      # placeholder first, no padding
                        [30, img, 31, img, pad, pad]])  # two images in one row
    feats = [torch.full((3, D), 100.0), torch.full((2, D), 200.0), torch.full((3, D), 300.0),
             torch.full((1, D), 400.0)]
    embeds, mask = vlm.splice(ids, ids != pad, feats)
    wte = vlm.lm.transformer.wte.weight
    assert embeds.shape == (3, 7, D)  # the longest row: 2 image + 5 text positions
    assert mask.tolist() == [[True] * 6 + [False], [True] * 7, [True] * 6 + [False]]
    torch.testing.assert_close(embeds[0, :2], wte[[10, 11]])
    torch.testing.assert_close(embeds[0, 2:5], feats[0])
    torch.testing.assert_close(embeds[0, 5], wte[12])
    assert embeds[0, 6].abs().sum() == 0
    torch.testing.assert_close(embeds[1, :2], feats[1])
    torch.testing.assert_close(embeds[1, 2:7], wte[[20, 21, 22, 23, 24]])
    torch.testing.assert_close(embeds[2, 0], wte[30])
    torch.testing.assert_close(embeds[2, 1:4], feats[2])
    torch.testing.assert_close(embeds[2, 4], wte[31])
    torch.testing.assert_close(embeds[2, 5], feats[3][0])
    assert embeds[2, 6].abs().sum() == 0


def test_splice_rejects_a_placeholder_image_mismatch():
    vlm = tiny_vlm()
    ids, mask = vlm.tokenize_prompts(["one image"])
    with pytest.raises(MuError, match="1 '<image>' placeholder.*2 image"):
        vlm.embed_inputs(ids, mask, pixels(2))


def _greedy_uncached(vlm, ids, mask, images, n):
    dec = torch.ones(ids.shape[0], 1, dtype=torch.long)
    for _ in range(n):
        logits = vlm(ids, images, dec, attention_mask=mask).logits[:, -1]
        dec = torch.cat([dec, logits.argmax(-1, keepdim=True)], dim=1)
    return dec


def test_cached_generation_matches_uncached_and_batched_matches_single():
    vlm = tiny_vlm(tiny_clip_tower())
    questions = ["what shape is in the image?", "colour?"]
    ids, mask = vlm.tokenize_prompts(questions)
    images = pixels(2)
    cached = vlm.generate(ids, images=images, attention_mask=mask, max_new_tokens=5)
    assert cached.shape == (2, 6)
    assert torch.equal(cached, _greedy_uncached(vlm, ids, mask, images, 5))
    for i, q in enumerate(questions):  # rows are independent of their batch-mates' padding
        one_ids, one_mask = vlm.tokenize_prompts([q])
        one = vlm.generate(one_ids, images=images[i:i + 1], attention_mask=one_mask, max_new_tokens=5)
        assert torch.equal(one[0], cached[i])


def test_anyres_views_become_more_image_tokens():
    vlm = tiny_vlm(preprocess=PreprocessConfig(anyres=True))
    from PIL import Image

    image = Image.new("RGB", (70, 40), (200, 10, 10))
    views = vlm.processor(image)
    n_views = vlm.processor.num_views(image.size)
    assert views.shape[0] == n_views == 1 + 3 * 2  # base + the 96x64 grid (3 x 2 crops of 32)
    assert vlm.encode_images([views])[0].shape[0] == vlm.num_image_tokens(n_views) == n_views * 16
    out = vlm.answer([image, Image.new("RGB", (32, 32))], ["what?", "and here?"], max_new_tokens=3)
    assert len(out) == 2 and all(isinstance(a, str) for a in out)


@pytest.mark.parametrize("tower", ["native", "clip"])
def test_save_load_round_trip_gives_the_same_logits(tmp_path, tower):
    vlm = tiny_vlm(tiny_clip_tower() if tower == "clip" else None)
    ids, mask = vlm.tokenize_prompts(["is there a red circle?"])
    dec = torch.tensor([[1, 80, 81]])
    images = pixels(1)
    before = vlm(ids, images, dec, attention_mask=mask).logits
    vlm.save_pretrained(tmp_path / "vlm")
    loaded = load_vlm(tmp_path / "vlm")
    assert loaded.vision_config == vlm.vision_config
    assert loaded.tokenizer.convert_tokens_to_ids("<image>") == vlm.image_token_id
    assert loaded.lm.lm_head.weight is loaded.lm.transformer.wte.weight
    ids2, mask2 = loaded.tokenize_prompts(["is there a red circle?"])
    assert torch.equal(ids2, ids)
    torch.testing.assert_close(loaded(ids2, images, dec, attention_mask=mask2).logits, before)


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(MuError, match="no model directory"):
        load_vlm(tmp_path / "missing")
    tiny_vlm().lm.save_pretrained(tmp_path / "text_only")
    with pytest.raises(MuError, match="expected 'mu-vlm'"):
        load_vlm(tmp_path / "text_only")


def test_image_token_must_fit_the_text_vocabulary():
    with pytest.raises(MuError, match="outside the text model's vocabulary"):
        build_vlm("tiny", tower=VisionTowerConfig(image_size=32, patch_size=8, width=32, depth=1, n_head=2),
                  vocab_size=260)


def test_weight_init_reaches_a_fresh_text_model_only():
    tower = VisionTowerConfig(image_size=32, patch_size=8, width=32, depth=1, n_head=2)
    vlm = build_vlm("tiny", tower=tower, weight_init="fan_in")  # tiny: width 64
    assert abs(vlm.lm.transformer.e[0].attn.q_linear.weight.std().item() - 64 ** -0.5) < 0.01
    with pytest.raises(MuError, match="not to a given or loaded one"):
        build_vlm(vlm.lm, tower=tower, weight_init="fan_in")


# -- command line -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_vlm(tmp_path_factory):
    path = tmp_path_factory.mktemp("vlm") / "model"
    tiny_vlm().save_pretrained(path)
    return path


def test_mu_vqa_answers_and_reports_bad_inputs(saved_vlm, tmp_path, capsys):
    from PIL import Image

    from mu.cli import main

    image = tmp_path / "red.png"
    Image.new("RGB", (50, 40), (220, 20, 20)).save(image)
    assert main(["vqa", "--model", str(saved_vlm), "--image", str(image), "--question", "what colour?",
                 "--question", "what shape?", "--max-new-tokens", "3", "--time"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.endswith(" s)") for line in lines)

    not_image = tmp_path / "notes.jpg"
    not_image.write_text("this is text, not a JPEG")
    cases = [(["--model", str(saved_vlm), "--image", str(tmp_path / "nope.png")], "no image file"),
             (["--model", str(saved_vlm), "--image", str(not_image)], "not an image"),
             (["--model", str(tmp_path / "no_model"), "--image", str(image)], "no model directory")]
    for args, message in cases:
        assert main(["vqa", *args, "--question", "q"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_seed_entry_point(saved_vlm, tmp_path, capsys):
    from PIL import Image

    entry = importlib.import_module("mu.generate_text+image2text")
    if EXAMPLES.is_dir():
        assert entry.main(["--model", str(saved_vlm), "--max_new_tokens", "2"]) == 0
        out = capsys.readouterr().out
        for name, question in entry.EXAMPLES:
            assert name in out and question in out
        assert out.count("Inference time (sec):") == 3
    assert entry.main(["--model", str(saved_vlm), "--image_file", str(tmp_path / "missing.jpg"),
                       "--question", "q"]) == 2
    assert "no image file" in capsys.readouterr().err
    image = tmp_path / "x.png"
    Image.new("RGB", (40, 40)).save(image)
    assert entry.main(["--model", str(tmp_path / "none"), "--image_file", str(image), "--question", "q"]) == 2
    assert "no model directory" in capsys.readouterr().err
    assert entry.main(["--model", str(saved_vlm), "--image_file", str(image), "--image_file", str(image),
                       "--question", "a", "--question", "b", "--question", "c"]) == 2
    assert "one question per image" in capsys.readouterr().err
