"""Shared pieces of the tests/test_reliability_*.py modules: a tiny model on disk, pickles that carry code,
and the check every bad-input case makes (exit status 2, one line naming what was wrong, no traceback)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import torch

import mu
from mu.cli import main as cli_main
from mu.tokenizer import byte_tokenizer

SMALL = dict(n_encoder_layer=1, n_decoder_layer=1, block_size=64)


def save_tiny(path: Path, arch: str = "encdec", **overrides) -> Path:
    torch.manual_seed(0)
    kw = dict(SMALL, n_encoder_layer=0) if arch == "deconly" else dict(SMALL)
    model = mu.build_model("tiny", arch=arch, **{**kw, **overrides})
    model.tokenizer = byte_tokenizer()
    return model.save_pretrained(path)


class Payload:
    """Unpickling this runs `touch MARKER`: the stand-in for whatever code a hostile checkpoint carries."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


PAYLOAD_KINDS = ("zip", "legacy", "plain", "plain_p2")


def write_payload(path: Path, kind: str, marker: Path, config: dict) -> Path:
    """A `.pt` in the paper's layout whose state dict holds a code payload: torch's zip or legacy format, or a
    plain pickle (default protocol, or protocol 2 where the import is a plain GLOBAL opcode)."""
    obj = {"model_state_dict": {"x": Payload(marker)}, "model_config": config}
    if kind == "zip":
        torch.save(obj, path)
    elif kind == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2 if kind == "plain_p2" else pickle.DEFAULT_PROTOCOL))
    return path


def run_cli(capsys, *argv) -> tuple[int, str]:
    """`mu ARGV` in this process -> (exit status, stderr), as the `mu` command would exit."""
    capsys.readouterr()
    try:
        rc = cli_main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors (unknown choice, missing value): status 2 as well
        rc = e.code
    return rc, capsys.readouterr().err


def run_subprocess(*argv, stdin: str = "") -> tuple[int, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([str(a) for a in argv], input=stdin, capture_output=True, text=True, env=env, timeout=180)
    return p.returncode, p.stderr


def assert_refused(rc: int, stderr: str, *mentions: str) -> str:
    """Exit status 2, no traceback, and the error is the last line of stderr, one line naming each of `mentions`."""
    assert rc == 2, stderr
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines and "error: " in lines[-1], stderr
    for m in mentions:
        assert m in lines[-1], (m, lines[-1])
    return lines[-1]


MU_BIN = str(Path(sys.executable).parent / "mu")
