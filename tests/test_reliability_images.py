"""Issue 15, category 3: bad images get one clear error naming the file; an image too large to decode (a
decompression bomb) is refused from its header, before any pixel is decoded."""

import os
import struct
import zlib

import pytest
from PIL import Image, ImageFile

import mu
from mu.vision.preprocess import load_image
from tests.reliability_util import assert_refused, run_cli, save_tiny


def bomb_png(side: int) -> bytes:
    """A `side` x `side` 1-bit black PNG: a few KB on disk, 3 * side^2 bytes once decoded to RGB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    z = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    Image.new("RGB", (48, 32), (200, 30, 30)).save(d / "good.png")
    Image.frombytes("RGB", (96, 96), os.urandom(96 * 96 * 3)).save(d / "noise.png")
    (d / "truncated.png").write_bytes((d / "noise.png").read_bytes()[:9000])
    (d / "text.png").write_text("not an image\n")
    (d / "zero.png").write_bytes(b"")
    (d / "folder.png").mkdir()
    (d / "bomb.png").write_bytes(bomb_png(12_000))  # 144 Mpx: over PIL's limit (89 Mpx), under twice it
    (d / "bomb_huge.png").write_bytes(bomb_png(20_000))  # 400 Mpx: PIL itself raises at open
    Image.new("CMYK", (20, 30), (0, 50, 100, 0)).save(d / "cmyk.jpg")
    Image.new("I;16", (16, 16), 300).save(d / "gray16.png")
    Image.new("P", (16, 16), 3).save(d / "palette.gif")
    return d


BAD = [("text.png", "not an image"), ("truncated.png", "could not decode"), ("zero.png", "empty (0 bytes"),
       ("missing.png", "no image file"), ("folder.png", "not a file"), ("bomb.png", "12000x12000"),
       ("bomb_huge.png", "400000000 pixels")]


@pytest.mark.parametrize("name,words", BAD, ids=[b[0] for b in BAD])
def test_bad_images_name_the_file(images, name, words):
    with pytest.raises(mu.MuError) as e:
        load_image(images / name)
    assert name in str(e.value) and words in str(e.value) and "\n" not in str(e.value)


def test_a_bomb_is_refused_before_decoding(images, monkeypatch):
    def no_decoding(self, *a, **k):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    for name in ("bomb.png", "bomb_huge.png"):
        with pytest.raises(mu.MuError, match="refused before decoding"):
            load_image(images / name)


def test_the_limit_is_pils(images, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30 * 30)  # 48 x 32 is over it, under twice it
    with pytest.raises(mu.MuError, match="48x32 image .* over the limit of 900 pixels"):
        load_image(images / "good.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 48 * 32)
    assert load_image(images / "good.png").size == (48, 32)


def test_unusual_modes_load_as_rgb(images):
    for name in ("good.png", "cmyk.jpg", "gray16.png", "palette.gif"):
        image = load_image(images / name)
        assert image.mode == "RGB" and min(image.size) > 0


def test_cli_verbs_refuse_bad_images_before_loading_a_model(images, tmp_path, capsys):
    for name, words in BAD:
        rc, err = run_cli(capsys, "vqa", "--model", tmp_path / "no_vlm", "--image", images / name, "--question", "q")
        assert_refused(rc, err, name, words)
    seed = __import__("importlib").import_module("mu.generate_text+image2text")
    rc = seed.main(["--model", str(tmp_path / "no_vlm"), "--image_file", str(images / "bomb.png"), "--question", "q"])
    assert_refused(rc, capsys.readouterr().err, "bomb.png", "refused before decoding")


def test_an_image_for_a_text_only_model(images, tmp_path, capsys):
    text_model = save_tiny(tmp_path / "text_only")
    rc, err = run_cli(capsys, "vqa", "--model", text_model, "--image", images / "good.png", "--question", "q",
                      "--device", "cpu")
    assert_refused(rc, err, str(text_model / "config.json"), "text-only")
