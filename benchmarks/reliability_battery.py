"""Reliability battery: run the real `mu` verbs and the seed entry points on bad inputs, from outside.

    flock -s /tmp/mu-cpu.lock .venv/bin/python benchmarks/reliability_battery.py [--only CAT] [--out FILE]

Every case runs one command in a fresh subprocess against files built in a temporary directory (a tiny
model saved with `save_pretrained`, the byte tokenizer, generated images, crafted pickles whose payload
would create a marker file if anything unpickled them) and records:

    rc          exit status (2 expected for bad input; 0 for the cases that warn and go on)
    traceback   whether stderr holds a Python traceback
    message     the error line ("mu VERB: error: ..." / "error: ...") and whether it is one line naming
                what the case says it must name (the file, field or value)
    payload     whether a pickle payload ran (its marker file exists)
    leftover    whether output that looks like a result was left behind

A case passes when all of these are as expected. The categories are issue 15's: 1 model files,
2 generation arguments, 3 images, 4 data files, 6 scoring, 7 CPU DDP threads (5, faults during
training, is tested by the trainer's own tests). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

BIN = Path(sys.executable).parent
MU = str(BIN / "mu")
PY = sys.executable
ERROR_LINE = re.compile(r"(^|: )error: ")


class Payload:
    """Unpickling this runs `touch MARKER`: a stand-in for any code a hostile checkpoint could carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@dataclass
class Case:
    cat: int
    name: str
    cmd: list[str]
    expect: str = "error"  # "error": exit 2 with a one-line message; "ok": exit 0
    mention: tuple[str, ...] = ()  # strings the error line (or, for "ok", stderr) must contain
    leftovers: tuple[str, ...] = ()  # paths that must not exist afterwards
    marker: Optional[Path] = None  # payload marker that must not exist afterwards
    stdin: str = ""
    env: dict = field(default_factory=dict)
    timeout: int = 240


# -- fixtures ----------------------------------------------------------------------------------------------


def png_bytes(width: int, height: int, rows: bytes, bit_depth: int = 1, color_type: int = 0) -> bytes:
    """A PNG file from raw filtered scanlines (each row: filter byte 0 + packed pixels)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def bomb_png(side: int) -> bytes:
    """A `side` x `side` 1-bit black PNG: a few KB on disk, side^2 * 3 bytes once decoded to RGB."""
    row = b"\x00" * (1 + (side + 7) // 8)
    z = zlib.compressobj(9)
    data = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    return png_bytes(side, side, data)


def build_fixtures(t: Path) -> dict[str, Path]:
    import torch
    from PIL import Image

    import mu
    from mu.tokenizer import byte_tokenizer

    torch.manual_seed(0)
    f: dict[str, Path] = {}
    tok = byte_tokenizer()
    small = dict(n_encoder_layer=1, n_decoder_layer=1, block_size=64)
    enc = mu.build_model("tiny", **small)
    enc.tokenizer = tok
    f["enc"] = enc.save_pretrained(t / "enc")
    dec = mu.build_model("tiny", arch="deconly", n_decoder_layer=1, block_size=64)
    dec.tokenizer = tok
    f["dec"] = dec.save_pretrained(t / "dec")
    cfg = {k: v for k, v in enc.config.to_dict().items() if k != "arch"}  # the paper's model_config has no arch
    state = {k: v for k, v in enc.state_dict().items() if k != "lm_head.weight"}
    f["ref"] = t / "ref.pt"
    torch.save({"model_state_dict": state, "model_config": cfg}, f["ref"])
    small_vocab = mu.build_model("tiny", vocab_size=128, **small)
    small_vocab.tokenizer = tok  # 260 tokens > vocab_size 128
    f["vocab_mismatch"] = small_vocab.save_pretrained(t / "vocab_mismatch")

    # pickles carrying code: a torch zip (torch.save), torch's legacy format, and a plain pickle
    for kind in ("zip", "legacy", "plain", "plain_p2", "check"):
        marker = t / f"PAYLOAD_RAN_{kind}"
        obj = {"model_state_dict": {"x": Payload(marker)}, "model_config": cfg}
        path = t / f"payload_{kind}.pt"
        if kind == "zip":
            torch.save(obj, path)
        elif kind == "legacy":
            torch.save(obj, path, _use_new_zipfile_serialization=False)
        else:
            path.write_bytes(pickle.dumps(obj, protocol=2 if kind == "plain_p2" else pickle.DEFAULT_PROTOCOL))
        f[f"payload_{kind}"], f[f"marker_{kind}"] = path, marker
    pickle.loads(f["payload_check"].read_bytes())  # the payloads are live: unpickling runs them
    assert f["marker_check"].exists(), "payload self-check failed"

    def model_dir(name: str, config=None, weights: Optional[bytes] = None, raw_config: Optional[str] = None):
        d = t / name
        shutil.copytree(f["enc"], d)
        if config is not None:
            (d / "config.json").write_text(json.dumps(config))
        if raw_config is not None:
            (d / "config.json").write_text(raw_config)
        if weights is not None:
            (d / "model.safetensors").write_bytes(weights)
        f[name] = d

    good_cfg = json.loads((f["enc"] / "config.json").read_text())
    weights = (f["enc"] / "model.safetensors").read_bytes()
    (t / "empty_dir").mkdir()
    f["empty_dir"] = t / "empty_dir"
    model_dir("truncated", weights=weights[:len(weights) // 2])
    model_dir("corrupt", weights=os.urandom(4096))
    model_dir("cfg_notjson", raw_config="{\"n_embd\": 64,")
    model_dir("cfg_list", raw_config="[1, 2, 3]")
    model_dir("cfg_unknown", config={**good_cfg, "n_layers": 3})
    model_dir("cfg_missing", config={k: v for k, v in good_cfg.items() if k != "n_embd"})
    model_dir("cfg_heads", config={**good_cfg, "n_head": 5})
    model_dir("cfg_zero_width", config={**good_cfg, "n_embd": 0})
    model_dir("cfg_neg_heads", config={**good_cfg, "n_head": -4})
    model_dir("cfg_zero_kv", config={**good_cfg, "n_kv_head": 0})
    model_dir("cfg_neg_layers", config={**good_cfg, "n_decoder_layer": -1})
    model_dir("cfg_zero_vocab", config={**good_cfg, "vocab_size": 0})
    model_dir("cfg_string", config={**good_cfg, "n_embd": "64"})
    model_dir("cfg_dropout", config={**good_cfg, "dropout": 1.5})
    model_dir("cfg_arch", config={**good_cfg, "arch": "gpt2"})
    model_dir("cfg_mismatch", config={**good_cfg, "hidden_dim": 128})
    f["ref_truncated"] = t / "ref_truncated.pt"
    f["ref_truncated"].write_bytes(f["ref"].read_bytes()[:3000])
    f["ref_list"] = t / "ref_list.pt"
    torch.save([1, 2, 3], f["ref_list"])
    f["ref_nocfg"] = t / "ref_nocfg.pt"
    torch.save({"model_state_dict": state}, f["ref_nocfg"])
    f["ref_badcfg"] = t / "ref_badcfg.pt"
    torch.save({"model_state_dict": state, "model_config": {**cfg, "n_kv_head": 0}}, f["ref_badcfg"])
    f["wrong_suffix"] = t / "model.pkl"
    shutil.copy(f["ref"], f["wrong_suffix"])
    # a tokenizer directory asking transformers to import code that would create a marker
    evil_tok = t / "tok_remote_code"
    tok.save_pretrained(evil_tok)
    tc = json.loads((evil_tok / "tokenizer_config.json").read_text())
    tc["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    tc["tokenizer_class"] = "EvilTokenizer"
    (evil_tok / "tokenizer_config.json").write_text(json.dumps(tc))
    f["marker_remote"] = t / "PAYLOAD_RAN_remote_code"
    (evil_tok / "tokenization_evil.py").write_text(f"import pathlib\npathlib.Path({str(f['marker_remote'])!r}).touch()\n"
                                                   "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    f["tok_remote_code"] = evil_tok
    # a Hugging Face causal LM directory (a distillation teacher) whose pytorch_model.bin carries a payload
    from transformers import LlamaConfig

    hf = t / "hf_teacher"
    LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1).save_pretrained(hf)
    tok.save_pretrained(hf)
    f["marker_hf"] = t / "PAYLOAD_RAN_hf_bin"
    torch.save({"model.embed_tokens.weight": Payload(f["marker_hf"])}, hf / "pytorch_model.bin")
    f["hf_teacher"] = hf
    (t / "empty_tok").mkdir()
    f["empty_tok"] = t / "empty_tok"

    # images
    img_dir = t / "images"
    img_dir.mkdir()
    Image.new("RGB", (48, 32), (200, 30, 30)).save(img_dir / "good.png")
    noise = Image.frombytes("RGB", (128, 128), os.urandom(128 * 128 * 3))
    noise.save(img_dir / "noise.png")
    (img_dir / "truncated.png").write_bytes((img_dir / "noise.png").read_bytes()[:20000])
    (img_dir / "text.png").write_text("this is not an image\n")
    (img_dir / "zero.png").write_bytes(b"")
    (img_dir / "folder.png").mkdir()
    (img_dir / "bomb.png").write_bytes(bomb_png(12_000))  # 144 Mpx: over PIL's 89 Mpx warning, under its error
    (img_dir / "bomb_huge.png").write_bytes(bomb_png(40_000))  # 1.6 Gpx: PIL raises DecompressionBombError
    Image.new("CMYK", (20, 30), (0, 50, 100, 0)).save(img_dir / "cmyk.jpg")
    Image.new("I;16", (16, 16), 300).save(img_dir / "gray16.png")
    Image.new("P", (16, 16), 3).save(img_dir / "palette.gif")
    f["images"] = img_dir

    from mu.vision import VisionTowerConfig, build_vlm

    tower = VisionTowerConfig(image_size=32, patch_size=8, width=32, depth=1, n_head=2)
    vlm = build_vlm("tiny", tower=tower, n_encoder_layer=1, n_decoder_layer=1)
    f["vlm"] = vlm.save_pretrained(t / "vlm")

    # data files
    data = t / "data"
    data.mkdir()
    squad = [{"id": f"q{i}", "context": f"The box holds {i} red balls.", "question": "How many balls?",
              "answers": [str(i)]} for i in range(5)]

    def jsonl(name: str, rows) -> Path:
        p = data / name
        p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
        return p

    f["squad"] = jsonl("squad.jsonl", squad)
    f["seq2seq"] = jsonl("seq2seq.jsonl", [{"source": f"what is {i} plus 1?", "target": str(i + 1)} for i in range(8)])
    f["d_answers_str"] = jsonl("answers_str.jsonl", [{**squad[0], "answers": "4"}])
    f["d_question_num"] = jsonl("question_num.jsonl", [{**squad[0], "question": 7}])
    f["d_context_null"] = jsonl("context_null.jsonl", [squad[0], {**squad[1], "context": None}])
    f["d_id_list"] = jsonl("id_list.jsonl", [{**squad[0], "id": [1, 2]}])
    f["d_record_list"] = jsonl("record_list.jsonl", [[1, 2, 3]])
    f["d_missing_field"] = jsonl("missing_field.jsonl", [{"id": "a", "context": "c", "question": "q"}])
    f["d_pretty"] = data / "pretty.jsonl"
    f["d_pretty"].write_text(json.dumps(squad[0], indent=2) + "\n")
    f["d_array_jsonl"] = data / "array.jsonl"
    f["d_array_jsonl"].write_text(json.dumps(squad, indent=1) + "\n")
    f["d_json_dict"] = data / "dict.json"
    f["d_json_dict"].write_text(json.dumps({"records": squad}))
    f["d_json_scalar"] = data / "scalar.json"
    f["d_json_scalar"].write_text("42\n")
    f["d_json_items_bad"] = data / "items_bad.json"
    f["d_json_items_bad"].write_text(json.dumps([squad[0], "not a record"]))
    f["d_binary"] = data / "binary.jsonl"
    f["d_binary"].write_bytes(os.urandom(3000))
    f["d_empty"] = data / "empty.jsonl"
    f["d_empty"].write_text("")
    f["d_dir"] = data / "a_directory"
    f["d_dir"].mkdir()
    (f["d_dir"] / "notes.txt").write_text("hello\n")
    f["d_enormous"] = data / "enormous.jsonl"
    with open(f["d_enormous"], "w") as fh:  # one 64 MiB line (e.g. a file without newlines)
        fh.write('{"source": "')
        chunk = "x" * (1 << 20)
        for _ in range(64):
            fh.write(chunk)
        fh.write('", "target": "y"}\n')
    f["d_text_num"] = jsonl("text_num.jsonl", [{"text": 12}])
    f["d_dup_ids"] = jsonl("dup_ids.jsonl", [squad[0], squad[0]])
    f["vqa_bad_image"] = jsonl("vqa_bad_image.jsonl", [
        {"id": "v0", "image": "../images/good.png", "question": "what colour?", "answers": ["red"]},
        {"id": "v1", "image": "../images/truncated.png", "question": "what colour?", "answers": ["red"]}])
    f["vqa_bomb"] = jsonl("vqa_bomb.jsonl", [
        {"id": "v0", "image": "../images/bomb.png", "question": "what colour?", "answers": ["black"]}])
    f["vqa_answers_str"] = jsonl("vqa_answers_str.jsonl", [
        {"id": "v0", "image": "../images/good.png", "question": "what colour?", "answers": "red"}])

    # predictions for scoring
    preds = t / "preds"
    preds.mkdir()
    f["p_good"] = preds / "good.json"
    f["p_good"].write_text(json.dumps({f"q{i}": str(i) for i in range(5)}))
    f["p_partial"] = preds / "partial.json"
    f["p_partial"].write_text(json.dumps({"q0": "0", "q1": "1"}))
    f["p_partial_jsonl"] = preds / "partial.jsonl"
    f["p_partial_jsonl"].write_text("".join(json.dumps({"id": f"q{i}", "prediction": str(i)}) + "\n" for i in range(4)))
    f["p_empty_obj"] = preds / "empty_obj.json"
    f["p_empty_obj"].write_text("{}")
    f["p_notjson"] = preds / "notjson.json"
    f["p_notjson"].write_text("q0: 0\nq1: 1\n")
    f["p_list"] = preds / "list.json"
    f["p_list"].write_text(json.dumps([str(i) for i in range(5)]))
    f["p_nonstring"] = preds / "nonstring.json"
    f["p_nonstring"].write_text(json.dumps({f"q{i}": i for i in range(5)}))
    f["p_jsonl_noid"] = preds / "noid.jsonl"
    f["p_jsonl_noid"].write_text(json.dumps({"prediction": "0"}) + "\n")
    f["p_binary"] = preds / "binary.json"
    f["p_binary"].write_bytes(os.urandom(2000))
    f["p_empty"] = preds / "empty.json"
    f["p_empty"].write_text("")
    f["p_dir"] = preds / "a_dir"
    f["p_dir"].mkdir()
    f["out_dir_exists"] = t / "existing_dir"
    f["out_dir_exists"].mkdir()
    return f


# -- cases -------------------------------------------------------------------------------------------------


def cases(f: dict[str, Path], t: Path) -> list[Case]:
    out: list[Case] = []
    enc, dec, img = str(f["enc"]), str(f["dec"]), f["images"]
    o = t / "outputs"

    def add(cat, name, cmd, **kw):
        out.append(Case(cat, name, [str(c) for c in cmd], **kw))

    def gen(model, *extra):
        device = [] if "--device" in extra else ["--device", "cpu"]
        return [MU, "generate", "--model", model, "--prompt", "hello", "--max-new-tokens", "2", *device, *extra]

    train_base = [MU, "train", "--preset", "tiny", "--tokenizer", "byte", "--max-steps", "1", "--batch-size", "2",
                  "--no-progress", "--device", "cpu", "--val-limit", "2", "--num-samples", "0"]
    distill_base = [MU, "distill", "--task", "seq2seq", "--train-data", f["seq2seq"], "--max-steps", "1",
                    "--batch-size", "2", "--no-progress", "--device", "cpu", "--num-samples", "0"]
    kd_seed = [PY, "-m", "mu.train_text2text_by_kd", "--train_data_path", f["seq2seq"], "--val_data_path",
               f["seq2seq"], "--max_steps", "1", "--batch_size", "2", "--global_batch_size", "2", "--no_progress",
               "--device", "cpu", "--encoder_seq_len", "32", "--decoder_seq_len", "8"]

    # 1. model files -------------------------------------------------------------------------------------
    for kind in ("zip", "legacy", "plain", "plain_p2"):
        p, m = f[f"payload_{kind}"], f[f"marker_{kind}"]
        n = p.name
        verbs = {
            "generate": gen(p, "--tokenizer", enc),
            "info": [MU, "info", p],
            "eval": [MU, "eval", "--model", p, "--tokenizer", enc, "--task", "squad_v2", "--data", f["squad"],
                     "--device", "cpu", "--quiet", "--out", o / f"eval_{kind}.json"],
            "convert-reference": [MU, "convert-reference", p, o / f"conv_{kind}"],
            "train --init": [*train_base, "--task", "seq2seq", "--train-data", f["seq2seq"], "--init", p,
                             "--out", o / f"train_init_{kind}"],
            "distill --teacher": [*distill_base, "--teacher", p, "--student", enc, "--out", o / f"kd_t_{kind}"],
            "distill --student": [*distill_base, "--teacher", dec, "--student", p, "--out", o / f"kd_s_{kind}"],
            "generate_text2text": [PY, "-m", "mu.generate_text2text", "--model_path", p, "--tokenizer_path", enc,
                                   "--max_new_tokens", "2"],
            "train_text2text_by_kd --student_path": [*kd_seed, "--student_path", p, "--teacher_path", dec,
                                                     "--output_path", o / f"seed_kd_s_{kind}"],
            "train_text2text_by_kd --teacher_path": [*kd_seed, "--student_path", enc, "--teacher_path", p,
                                                     "--output_path", o / f"seed_kd_t_{kind}"],
        }
        leftover = {"eval": (o / f"eval_{kind}.json",), "convert-reference": (o / f"conv_{kind}",),
                    "train --init": (o / f"train_init_{kind}/final", o / f"train_init_{kind}/checkpoints"),
                    "distill --teacher": (o / f"kd_t_{kind}/final",), "distill --student": (o / f"kd_s_{kind}/final",)}
        for verb, cmd in verbs.items():
            add(1, f"{kind} pickle payload: {verb}", cmd, mention=(n, "refused"), marker=m,
                leftovers=leftover.get(verb, ()))
    add(1, "HF teacher with a payload in pytorch_model.bin: distill --teacher",
        [*distill_base, "--teacher", f["hf_teacher"], "--student-preset", "tiny", "--out", o / "kd_hf"],
        mention=("hf_teacher", "refused"), marker=f["marker_hf"], leftovers=(o / "kd_hf/final",))
    add(1, "tokenizer with remote code: generate", gen(enc, "--tokenizer", f["tok_remote_code"]),
        mention=("tok_remote_code",), marker=f["marker_remote"])
    model_cases = [
        ("missing path", t / "no_such_model", ("no_such_model",)),
        ("empty directory", f["empty_dir"], ("empty_dir", "config.json")),
        ("truncated weights", f["truncated"], ("truncated", "model.safetensors")),
        ("corrupt weights", f["corrupt"], ("corrupt", "model.safetensors")),
        ("config.json not JSON", f["cfg_notjson"], ("config.json", "JSON")),
        ("config.json a list", f["cfg_list"], ("config.json",)),
        ("config unknown field", f["cfg_unknown"], ("config.json", "n_layers")),
        ("config missing field", f["cfg_missing"], ("config.json", "n_embd")),
        ("heads do not divide width", f["cfg_heads"], ("config.json", "n_head")),
        ("zero width", f["cfg_zero_width"], ("config.json", "n_embd")),
        ("negative heads", f["cfg_neg_heads"], ("config.json", "n_head")),
        ("zero kv heads", f["cfg_zero_kv"], ("config.json", "n_kv_head")),
        ("negative layers", f["cfg_neg_layers"], ("config.json", "n_decoder_layer")),
        ("zero vocab", f["cfg_zero_vocab"], ("config.json", "vocab_size")),
        ("string width", f["cfg_string"], ("config.json", "n_embd")),
        ("dropout 1.5", f["cfg_dropout"], ("config.json", "dropout")),
        ("unknown architecture", f["cfg_arch"], ("config.json", "gpt2")),
        ("weights do not match config", f["cfg_mismatch"], ("cfg_mismatch", "do not match")),
        ("truncated .pt", f["ref_truncated"], ("ref_truncated.pt",)),
        (".pt holding a list", f["ref_list"], ("ref_list.pt", "model_state_dict")),
        (".pt without model_config", f["ref_nocfg"], ("ref_nocfg.pt", "model_config")),
        (".pt with impossible config", f["ref_badcfg"], ("ref_badcfg.pt", "n_kv_head")),
        ("model file with another suffix", f["wrong_suffix"], ("model.pkl",)),
    ]
    for name, path, mention in model_cases:
        add(1, f"{name}: generate", gen(path, "--tokenizer", enc), mention=mention)
    for name, path, mention in model_cases[:1] + model_cases[18:22] + [("a model directory", f["enc"],
                                                                          ("enc", "directory"))]:
        add(1, f"{name}: convert-reference", [MU, "convert-reference", path, o / f"conv_{name}"], mention=mention,
            leftovers=(o / f"conv_{name}",))
    for name, path, mention in model_cases[:1] + model_cases[5:6] + model_cases[10:12] + model_cases[18:19]:
        add(1, f"{name}: train --init", [*train_base, "--task", "seq2seq", "--train-data", f["seq2seq"], "--init",
                                         path, "--out", o / f"init_{name}"], mention=mention,
            leftovers=(o / f"init_{name}/final", o / f"init_{name}/checkpoints"))
    for name, path, mention in model_cases[:1] + model_cases[11:12]:
        add(1, f"{name}: generate_text2text", [PY, "-m", "mu.generate_text2text", "--model_path", path,
                                               "--tokenizer_path", enc], mention=mention)
        add(1, f"{name}: distill --teacher", [*distill_base, "--teacher", path, "--student", enc, "--out",
                                              o / f"kd_{name}"], mention=mention, leftovers=(o / f"kd_{name}/final",))

    # 2. generation arguments ------------------------------------------------------------------------------
    g2 = [
        ("max-new-tokens 0", ["--max-new-tokens", "0"], ("max-new-tokens", "0")),
        ("max-new-tokens -3", ["--max-new-tokens", "-3"], ("max-new-tokens", "-3")),
        ("num-beams 0", ["--num-beams", "0"], ("num-beams", "0")),
        ("num-beams -1", ["--num-beams", "-1"], ("num-beams", "-1")),
        ("temperature 0 with sampling", ["--sample", "--temperature", "0"], ("temperature", "0")),
        ("temperature -1 with sampling", ["--sample", "--temperature", "-1"], ("temperature", "-1")),
        ("temperature nan with sampling", ["--sample", "--temperature", "nan"], ("temperature", "nan")),
        ("top-p 0", ["--sample", "--top-p", "0"], ("top-p", "0")),
        ("top-p 1.5", ["--sample", "--top-p", "1.5"], ("top-p", "1.5")),
        ("top-p -0.1", ["--sample", "--top-p", "-0.1"], ("top-p", "-0.1")),
        ("top-k 0", ["--sample", "--top-k", "0"], ("top-k", "0")),
        ("top-k -5", ["--sample", "--top-k", "-5"], ("top-k", "-5")),
        ("sampling with beams", ["--sample", "--num-beams", "2"], ("sample", "num-beams")),
        ("stream with beams", ["--stream", "--num-beams", "2"], ("stream", "num-beams")),
        ("unknown dtype", ["--dtype", "float8"], ("float8",)),
        ("cuda on a CPU machine", ["--device", "cuda"], ("cuda",)),
        ("cuda:7", ["--device", "cuda:7"], ("cuda:7",)),
        ("unknown device", ["--device", "tpu"], ("tpu",)),
        ("missing tokenizer path", ["--tokenizer", t / "no_such_tokenizer"], ("no_such_tokenizer",)),
        ("empty tokenizer directory", ["--tokenizer", f["empty_tok"]], ("empty_tok",)),
    ]
    import torch

    for name, extra, mention in g2:
        if name == "cuda on a CPU machine" and torch.cuda.is_available():
            continue
        add(2, f"generate: {name}", gen(enc, *extra), mention=mention)
    add(2, "generate: empty prompt", [MU, "generate", "--model", enc, "--prompt", "", "--device", "cpu"],
        mention=("prompt",))
    add(2, "generate: empty stdin", [MU, "generate", "--model", enc, "--device", "cpu"], mention=("prompt",))
    add(2, "generate: tokenizer bigger than the model's vocabulary",
        gen(str(f["vocab_mismatch"]), "--prompt", "\u00ff\u00fe hello"), mention=("vocab_size", "128"))
    long_prompt = "word " * 400  # 2000 byte tokens > block_size 64
    add(2, "generate: prompt longer than the context (encdec)", [*gen(enc), "--prompt", long_prompt], expect="ok",
        mention=("truncated", "64"))
    add(2, "generate: prompt longer than the context (deconly)", [*gen(dec), "--prompt", long_prompt], expect="ok",
        mention=("truncated",))
    add(2, "generate: good arguments (control)", gen(enc, "--sample", "--top-p", "0.9", "--top-k", "5"), expect="ok")
    seed = [PY, "-m", "mu.generate_text2text", "--model_path", enc, "--max_new_tokens", "2"]
    for name, extra, mention in [("max_new_tokens 0", ["--max_new_tokens", "0"], ("max_new_tokens", "0")),
                                 ("sample temperature 0", ["--sample", "--temperature", "0"], ("temperature",)),
                                 ("top_k 0", ["--sample", "--top_k", "0"], ("top_k", "0")),
                                 ("device cuda", ["--device", "cuda"], ("cuda",)),
                                 ("missing tokenizer", ["--tokenizer_path", t / "nope_tok"], ("nope_tok",))]:
        add(2, f"generate_text2text: {name}", [*seed, *extra], mention=mention)
    api = ("import sys, mu, torch\nm = mu.load_model(sys.argv[1])\ntry:\n    m.generate(torch.tensor([[5, 6, 7]]), "
           "**eval(sys.argv[2]))\nexcept mu.MuError as e:\n    print(f'error: {e}', file=sys.stderr)\n    sys.exit(2)")
    for kw, mention in [("dict(max_new_tokens=0)", "max_new_tokens"), ("dict(num_beams=0)", "num_beams"),
                        ("dict(do_sample=True, temperature=0.0)", "temperature"),
                        ("dict(do_sample=True, top_p=1.5)", "top_p"), ("dict(do_sample=True, top_k=0)", "top_k"),
                        ("dict(do_sample=True, num_beams=3)", "num_beams")]:
        add(2, f"python API: generate({kw[5:-1]})", [PY, "-c", api, enc, kw], mention=(mention,))
    add(2, "python API: token id outside the vocabulary", [PY, "-c", api.replace("5, 6, 7", "5, 999"), enc,
                                                               "dict(max_new_tokens=2)"], mention=("999", "vocab_size"))
    add(2, "vqa: num-beams 0", [MU, "vqa", "--model", f["vlm"], "--image", img / "good.png", "--question", "q",
                                "--num-beams", "0", "--device", "cpu"], mention=("num-beams", "0"))
    add(2, "eval: num-beams 0", [MU, "eval", "--model", enc, "--task", "squad_v2", "--data", f["squad"],
                                 "--num-beams", "0"], mention=("num-beams", "0"))

    # 3. images ------------------------------------------------------------------------------------------------
    vqa = [MU, "vqa", "--model", f["vlm"], "--question", "what colour?", "--max-new-tokens", "2", "--device", "cpu",
           "--image"]
    seed_vqa = [PY, "-m", "mu.generate_text+image2text", "--model", f["vlm"], "--question", "what colour?",
                "--max_new_tokens", "2", "--device", "cpu", "--image_file"]
    images = [("not an image", "text.png", ("text.png",)), ("truncated", "truncated.png", ("truncated.png",)),
              ("zero bytes", "zero.png", ("zero.png",)), ("missing file", "missing.png", ("missing.png",)),
              ("a directory", "folder.png", ("folder.png",)),
              ("decompression bomb 12000x12000", "bomb.png", ("bomb.png", "pixels")),
              ("decompression bomb 40000x40000", "bomb_huge.png", ("bomb_huge.png", "pixels"))]
    for name, file, mention in images:
        add(3, f"vqa: {name}", [*vqa, img / file], mention=mention)
        add(3, f"generate_text+image2text: {name}", [*seed_vqa, img / file], mention=mention)
    for file in ("good.png", "cmyk.jpg", "gray16.png", "palette.gif"):
        add(3, f"vqa: {file} (control)", [*vqa, img / file], expect="ok")
    add(3, "vqa: text-only model", [MU, "vqa", "--model", enc, "--image", img / "good.png", "--question", "q",
                                    "--device", "cpu"], mention=("enc",))
    add(3, "generate_text+image2text: text-only model",
        [PY, "-m", "mu.generate_text+image2text", "--model", enc, "--image_file", img / "good.png", "--question", "q"],
        mention=("enc",))
    add(3, "eval --task vqa: truncated image in the data", [MU, "eval", "--task", "vqa", "--model", f["vlm"],
                                                            "--data", f["vqa_bad_image"], "--quiet", "--device", "cpu",
                                                            "--out", o / "vqa_eval.json"],
        mention=("truncated.png",), leftovers=(o / "vqa_eval.json",))
    add(3, "eval --task vqa: decompression bomb in the data", [MU, "eval", "--task", "vqa", "--model", f["vlm"],
                                                               "--data", f["vqa_bomb"], "--quiet", "--device", "cpu"],
        mention=("bomb.png",))

    # 4. data files -----------------------------------------------------------------------------------------
    def train_cmd(data, name, *extra, task="squad_v2"):
        return [*train_base, "--task", task, "--train-data", data, "--out", o / f"train_{name}", *extra]

    data_cases = [
        ("answers is a string", f["d_answers_str"], ("answers_str.jsonl", "line 1", "answers")),
        ("question is a number", f["d_question_num"], ("question_num.jsonl", "line 1", "question")),
        ("context is null", f["d_context_null"], ("context_null.jsonl", "line 2", "context")),
        ("id is a list", f["d_id_list"], ("id_list.jsonl", "line 1", "'id'")),
        ("record is a list", f["d_record_list"], ("record_list.jsonl", "line 1")),
        ("missing field", f["d_missing_field"], ("missing_field.jsonl", "answers")),
        ("pretty-printed JSON in .jsonl", f["d_pretty"], ("pretty.jsonl", "line 1")),
        ("JSON array in .jsonl", f["d_array_jsonl"], ("array.jsonl",)),
        (".json object without records", f["d_json_dict"], ("dict.json",)),
        (".json scalar", f["d_json_scalar"], ("scalar.json",)),
        (".json list with a bad item", f["d_json_items_bad"], ("items_bad.json", "item 1")),
        ("binary file", f["d_binary"], ("binary.jsonl",)),
        ("empty file", f["d_empty"], ("empty.jsonl",)),
        ("a directory", f["d_dir"], ("a_directory",)),
        ("one enormous line", f["d_enormous"], ("enormous.jsonl", "line 1")),
        ("duplicate ids", f["d_dup_ids"], ("dup_ids.jsonl", "line 2")),
        ("missing file", t / "data" / "nope.jsonl", ("nope.jsonl",)),
    ]
    for name, path, mention in data_cases:
        task = "seq2seq" if name == "one enormous line" else "squad_v2"
        add(4, f"train: {name}", train_cmd(path, name, task=task), mention=mention,
            leftovers=(o / f"train_{name}/final", o / f"train_{name}/checkpoints"))
    for name, path, mention in data_cases[:3] + data_cases[6:8] + data_cases[13:15]:
        task = "seq2seq" if name == "one enormous line" else "squad_v2"
        add(4, f"eval: {name}", [MU, "eval", "--model", enc, "--task", task, "--data", path, "--quiet",
                                 "--out", o / f"eval_{name}.json"], mention=mention,
            leftovers=(o / f"eval_{name}.json",))
    add(4, "pretrain: text is a number", [MU, "pretrain", "--preset", "tiny", "--tokenizer", "byte", "--train-data",
                                          f["d_text_num"], "--out", o / "pre_num", "--max-steps", "1", "--no-progress",
                                          "--device", "cpu"], mention=("text_num.jsonl", "text"),
        leftovers=(o / "pre_num/final",))
    add(4, "pretrain: binary file", [MU, "pretrain", "--preset", "tiny", "--tokenizer", "byte", "--train-data",
                                     f["d_binary"], "--out", o / "pre_bin", "--max-steps", "1", "--no-progress",
                                     "--device", "cpu"], mention=("binary.jsonl",), leftovers=(o / "pre_bin/final",))
    add(4, "train: unknown task", train_cmd(f["squad"], "task", task="squad_v3"), mention=("squad_v3",))
    add(4, "score: unknown task", [MU, "score", "--task", "trivia", "--data", f["squad"], "--predictions",
                                   f["p_good"]], mention=("trivia",))
    add(4, "train --task vqa: answers is a string", train_cmd(f["vqa_answers_str"], "vqa_str", task="vqa"),
        mention=("vqa_answers_str.jsonl", "answers"))
    hyper = [("negative learning rate", ["--lr=-1e-3"], ("lr", "-0.001")),
             ("zero learning rate", ["--lr", "0"], ("lr",)),
             ("nan learning rate", ["--lr", "nan"], ("lr", "nan")),
             ("inf learning rate", ["--lr", "inf"], ("lr", "inf")),
             ("zero batch size", ["--batch-size", "0"], ("batch-size", "0")),
             ("negative batch size", ["--batch-size", "-4"], ("batch-size", "-4")),
             ("zero global batch", ["--global-batch-size", "0"], ("global-batch-size", "0")),
             ("zero max steps", ["--max-steps", "0"], ("max-steps", "0")),
             ("negative epochs", ["--epochs", "-1"], ("epochs", "-1")),
             ("negative warmup", ["--warmup", "-5"], ("warmup", "-5")),
             ("nan grad clip", ["--grad-clip", "nan"], ("grad-clip", "nan")),
             ("negative weight decay", ["--weight-decay", "-0.1"], ("weight-decay", "-0.1")),
             ("min-lr-ratio 2", ["--min-lr-ratio", "2"], ("min-lr-ratio", "2")),
             ("zero max source len", ["--max-source-len", "0"], ("max-source-len", "0")),
             ("negative dropout", ["--dropout", "-0.5"], ("dropout", "-0.5")),
             ("dropout 1", ["--dropout", "1"], ("dropout", "1")),
             ("unknown preset", ["--preset", "huge"], ("huge",))]
    for name, extra, mention in hyper:
        add(4, f"train: {name}", train_cmd(f["seq2seq"], name.replace(" ", "_"), *extra, task="seq2seq"),
            mention=mention, leftovers=(o / f"train_{name.replace(' ', '_')}",))
    for name, extra, mention in [("alpha 2", ["--alpha", "2"], ("alpha", "2")),
                                 ("temperature 0", ["--temperature", "0"], ("temperature", "0")),
                                 ("on-policy 1.5", ["--on-policy", "1.5"], ("on-policy", "1.5")),
                                 ("negative lr", ["--lr", "-1"], ("lr", "-1"))]:
        add(4, f"distill: {name}", [*distill_base, "--teacher", dec, "--student", enc, "--out",
                                    o / f"kd_{name}", *extra], mention=mention, leftovers=(o / f"kd_{name}",))
    add(4, "train: good data (control)", train_cmd(f["squad"], "control"), expect="ok")

    # 6. scoring ------------------------------------------------------------------------------------------------
    score = [MU, "score", "--task", "squad_v2", "--data", f["squad"], "--predictions"]
    for name, p, mention in [("partial {id: text}", f["p_partial"], ("partial.json", "3 of the 5")),
                             ("partial JSON lines", f["p_partial_jsonl"], ("partial.jsonl", "1 of the 5")),
                             ("empty object", f["p_empty_obj"], ("empty_obj.json", "5 of the 5")),
                             ("not JSON", f["p_notjson"], ("notjson.json",)),
                             ("a JSON list", f["p_list"], ("list.json", "list")),
                             ("non-string predictions", f["p_nonstring"], ("nonstring.json", "q0")),
                             ("JSON lines without id", f["p_jsonl_noid"], ("noid.jsonl", "id")),
                             ("binary", f["p_binary"], ("binary.json",)),
                             ("empty file", f["p_empty"], ("empty.json",)),
                             ("a directory", f["p_dir"], ("a_dir",)),
                             ("missing file", t / "preds" / "nope.json", ("nope.json",))]:
        add(6, f"score: {name}", [*score, p, "--out", o / f"score_{name}.json"], mention=mention,
            leftovers=(o / f"score_{name}.json",))
    add(6, "score: --out is a directory", [*score, f["p_good"], "--out", f["out_dir_exists"]],
        mention=("existing_dir",))
    add(6, "score: partial with --allow-missing (warns, scores the rest)",
        [*score, f["p_partial"], "--allow-missing"], expect="ok", mention=("3 of the 5",))
    add(6, "score: good predictions (control)", [*score, f["p_good"]], expect="ok")
    add(6, "score --task vqa: partial", [MU, "score", "--task", "vqa", "--data", f["vqa_bad_image"], "--predictions",
                                         f["p_partial"]], mention=("partial.json", "2 of 2"))
    add(6, "eval: --predictions is a directory", [MU, "eval", "--model", enc, "--task", "squad_v2", "--data",
                                                  f["squad"], "--max-new-tokens", "2", "--quiet", "--device", "cpu",
                                                  "--predictions", f["out_dir_exists"]], mention=("existing_dir",))

    # 7. CPU DDP threads ------------------------------------------------------------------------------------------
    ncores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    share = max(1, ncores // 2)
    ddp = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mu", "train",
           "--preset", "tiny", "--tokenizer", "byte", "--task", "seq2seq", "--train-data", f["seq2seq"],
           "--max-steps", "1", "--batch-size", "2", "--no-progress", "--device", "cpu", "--save-every", "0",
           "--num-samples", "0"]
    add(7, f"torchrun 2 procs, OMP_NUM_THREADS={ncores} (whole machine)", [*ddp, "--out", o / "ddp_omp"],
        expect="ok", mention=(f"cpu threads: {share} per process",), env={"OMP_NUM_THREADS": str(ncores)})
    add(7, "torchrun 2 procs, OMP_NUM_THREADS unset", [*ddp, "--out", o / "ddp_unset"], expect="ok",
        mention=("cpu threads: 1 per process",), env={"OMP_NUM_THREADS": None})
    return out


# -- running -------------------------------------------------------------------------------------------------


def run_case(c: Case, cwd: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    for k, v in c.env.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    t0 = time.perf_counter()
    try:
        p = subprocess.run(c.cmd, input=c.stdin, capture_output=True, text=True, env=env, cwd=cwd, timeout=c.timeout)
        rc, stderr = p.returncode, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, stderr = "timeout", (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else ""
    seconds = time.perf_counter() - t0
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    traceback = "Traceback (most recent call last)" in stderr
    idx = max((i for i, ln in enumerate(lines) if ERROR_LINE.search(ln)), default=None)
    message = lines[idx] if idx is not None else (lines[-1] if lines else "")
    one_line = idx is not None and idx == len(lines) - 1
    payload = bool(c.marker and c.marker.exists())
    leftover = [p for p in c.leftovers if Path(p).exists()]
    if c.expect == "error":
        named = all(m.lower() in message.lower() for m in c.mention)
        ok = rc == 2 and not traceback and one_line and named and not payload and not leftover
    else:
        named = all(m.lower() in stderr.lower() for m in c.mention)
        ok = rc == 0 and not traceback and named
    return {"cat": c.cat, "name": c.name, "pass": ok, "rc": rc, "traceback": traceback, "one_line": one_line,
            "named": named, "payload_ran": payload, "leftover": [str(p) for p in leftover], "message": message[:400],
            "seconds": round(seconds, 2), "cmd": " ".join(c.cmd)[:600]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", type=int, action="append", help="run only this category (repeatable)")
    ap.add_argument("--match", help="run only cases whose name contains this text")
    ap.add_argument("--out", help="write every case's record to this JSON file")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()
    t = Path(tempfile.mkdtemp(prefix="mu-battery-"))
    try:
        t0 = time.perf_counter()
        fixtures = build_fixtures(t)
        todo = [c for c in cases(fixtures, t) if (not args.only or c.cat in args.only)
                and (not args.match or args.match in c.name)]
        (t / "outputs").mkdir(exist_ok=True)
        records = []
        for c in todo:
            r = run_case(c, t)
            records.append(r)
            flags = "" if r["pass"] else (f"  rc={r['rc']}{' TRACEBACK' if r['traceback'] else ''}"
                                          f"{'' if r['one_line'] else ' multi-line'}"
                                          f"{'' if r['named'] else ' unnamed'}{' PAYLOAD RAN' if r['payload_ran'] else ''}"
                                          f"{' leftover' if r['leftover'] else ''}")
            print(f"[{'pass' if r['pass'] else 'FAIL'}] {r['cat']} {r['name']}{flags}\n        {r['message'][:240]}",
                  flush=True)
        summary = {"cases": len(records), "passed": sum(r["pass"] for r in records),
                   "payload_ran": sum(r["payload_ran"] for r in records),
                   "tracebacks": sum(r["traceback"] for r in records),
                   "per_category": {str(k): {"cases": sum(r["cat"] == k for r in records),
                                             "passed": sum(r["pass"] for r in records if r["cat"] == k)}
                                    for k in sorted({r["cat"] for r in records})},
                   "seconds": round(time.perf_counter() - t0, 1)}
        if args.out:
            Path(args.out).write_text(json.dumps({"summary": summary, "cases": records}, indent=2) + "\n")
        print(json.dumps(summary))
        return 0
    finally:
        if args.keep:
            print(f"kept {t}", file=sys.stderr)
        else:
            shutil.rmtree(t, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
