"""Shared by the serving tests: tiny models with printable output, HTTP helpers, a slowed backend."""

from __future__ import annotations

import base64
import http.client
import io
import json
import threading
import time
from typing import Optional
from urllib.parse import urlparse

import torch

import mu
from mu.serve.engine import TorchBackend

LETTERS = list("abcdefghijklmnopqrstuvwxyz") + ["\u0120"]  # \u0120: the byte-level tokenizer's space


def _letters_head(model, tok) -> None:
    """Give `model` an output head that only knows lower-case letters and the space, so its greedy text is
    printable and varied (a tied random head mostly repeats the last input token)."""
    ids = tok.convert_tokens_to_ids(LETTERS)
    head = torch.zeros_like(model.lm_head.weight)
    head[ids] = torch.randn(len(ids), head.shape[1])
    model.lm_head.weight = torch.nn.Parameter(head)


def printable_model(arch: str, tok, seed: int = 0):
    torch.manual_seed(seed)
    model = mu.build_model("tiny", arch=arch, vocab_size=len(tok))
    _letters_head(model, tok)
    return model.eval()


def printable_vlm(seed: int = 0):
    from mu.vision import VisionTowerConfig, build_vlm

    torch.manual_seed(seed)
    tower = VisionTowerConfig(image_size=32, patch_size=8, width=32, depth=1, n_head=2)
    vlm = build_vlm("tiny", tower=tower, n_encoder_layer=2, n_decoder_layer=2, dropout=0.0)
    _letters_head(vlm.lm, vlm.tokenizer)
    return vlm.eval()


def reference(model, ids, max_new: int, eos: Optional[int] = None, **kwargs) -> list[int]:
    """The new tokens `model.generate` gives for one prompt (up to, not including, EOS)."""
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, eos_token_id=eos, **kwargs)
    new = (out[0, 1:] if model.config.arch == "encdec" else out[0, len(ids):]).tolist()
    return new[:new.index(eos)] if eos is not None and eos in new else new


def png_data_uri(size=(40, 30), color=(200, 30, 30), fmt="PNG") -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


class SlowBackend(TorchBackend):
    """A backend whose decode steps take at least `delay` seconds and that records each step's batch size,
    so tests can keep requests in flight long enough to overlap, disconnect or fill the queue. While `gate` is
    a cleared event, steps wait for it: a test holds its rows for as long as it needs, whatever the machine's load."""

    def __init__(self, model, max_batch: int, delay: float = 0.0):
        super().__init__(model, max_batch)
        self.delay = delay
        self.gate: Optional[threading.Event] = None
        self.batch_sizes: list[int] = []

    def step(self, tokens):
        self.batch_sizes.append(len(tokens))
        if self.gate is not None:
            self.gate.wait(60)
        if self.delay:
            time.sleep(self.delay)
        return super().step(tokens)


# -- HTTP -------------------------------------------------------------------------------------------------


def _conn(base: str, timeout: float = 60) -> http.client.HTTPConnection:
    u = urlparse(base)
    return http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)


def request(base: str, method: str, path: str, body=None, headers: Optional[dict] = None, raw: Optional[bytes] = None):
    """(status, parsed JSON or text, headers)."""
    conn = _conn(base)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    conn.request(method, path, body=data, headers=hdrs)
    r = conn.getresponse()
    payload = r.read()
    conn.close()
    kind = r.getheader("Content-Type", "")
    parsed = json.loads(payload) if kind.startswith("application/json") else payload.decode()
    return r.status, parsed, dict(r.getheaders())


def post(base: str, path: str, body=None, **kw):
    return request(base, "POST", path, body, **kw)


def sse(base: str, path: str, body: dict, headers: Optional[dict] = None) -> list:
    """All events of a streamed request: parsed JSON objects, and the final "[DONE]"."""
    conn = _conn(base)
    conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json",
                                                                       **(headers or {})})
    r = conn.getresponse()
    assert r.status == 200, r.read()
    assert r.getheader("Content-Type").startswith("text/event-stream")
    events = []
    for line in r.read().decode().split("\n\n"):
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    conn.close()
    return events
