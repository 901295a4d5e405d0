"""`mu serve` over real HTTP (uvicorn on 127.0.0.1): OpenAI-shaped responses that equal `model.generate`,
streaming, batching of concurrent requests, cancellation on disconnect, and a 4xx for every bad request."""

import json
import socket
import threading
import time

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from mu.data.tasks import encode_source, make_example  # noqa: E402
from mu.serve.app import ServeConfig, Server, serve_in_thread  # noqa: E402
from mu.tokenizer import byte_tokenizer  # noqa: E402
from tests.serve_helpers import (SlowBackend, png_data_uri, post, printable_model, printable_vlm,  # noqa: E402
                                 reference, request, sse)


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module", params=["encdec", "deconly"])
def served(request, tok):
    """(model, base URL) of a server with default limits (but a 64-token input limit)."""
    model = printable_model(request.param, tok)
    server = Server(model, tok, ServeConfig(model_name="tiny", max_batch=4, max_input_tokens=64, max_new_tokens=32))
    with serve_in_thread(server.app) as base:
        yield model, base


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_completions_equal_generate_streamed_or_not(served, tok):
    model, base = served
    prompt = "The quick brown fox"
    ids = _ids(tok, prompt)
    want_ids = reference(model, ids, 12, eos=tok.eos_token_id)
    want = tok.decode(want_ids, skip_special_tokens=True)

    status, body, _ = post(base, "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 12,
                                                     "temperature": 0})
    assert status == 200 and body["object"] == "text_completion"
    assert body["choices"][0]["text"] == want and len(want) >= 4
    assert body["choices"][0]["finish_reason"] == ("length" if len(want_ids) == 12 else "stop")
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(want_ids),
                             "total_tokens": len(ids) + len(want_ids)}

    events = sse(base, "/v1/completions", {"prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": True,
                                           "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == want
    assert chunks[-2]["choices"][0]["finish_reason"] == body["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == body["usage"]

    # the same prompt as token ids, and two prompts in one request
    status, body, _ = post(base, "/v1/completions", {"prompt": ids, "max_tokens": 12, "temperature": 0})
    assert body["choices"][0]["text"] == want
    other = "jumps over"
    want_other = tok.decode(reference(model, _ids(tok, other), 12, eos=tok.eos_token_id), skip_special_tokens=True)
    status, body, _ = post(base, "/v1/completions", {"prompt": [prompt, other], "max_tokens": 12, "temperature": 0,
                                                     "n": 2})
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in body["choices"]] == [want, want, want_other, want_other]


def test_chat_equals_generate_streamed_or_not(served, tok):
    model, base = served
    messages = [{"role": "system", "content": "ignored"}, {"role": "user", "content": "first question"},
                {"role": "assistant", "content": "an answer"},
                {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}]
    ids = _ids(tok, "Hello\nthere")  # the last user message, text parts joined by newlines
    want = tok.decode(reference(model, ids, 10, eos=tok.eos_token_id), skip_special_tokens=True)
    status, body, _ = post(base, "/v1/chat/completions", {"messages": messages, "max_tokens": 10, "temperature": 0})
    assert status == 200 and body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": want}
    assert body["usage"]["prompt_tokens"] == len(ids)

    events = sse(base, "/v1/chat/completions", {"messages": messages, "max_completion_tokens": 10, "temperature": 0,
                                                "stream": True})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")


def test_answer_uses_the_squad_task_prompt(served, tok):
    model, base = served
    context, question = "Ada Lovelace wrote the first program.", "Who wrote the first program?"
    source = make_example("squad_v2", {"context": context, "question": question, "answers": []}).source
    ids, cut = encode_source(tok, source, 64, "squad_v2")  # the server's --max-input-tokens is 64
    assert cut  # the squad prompt is longer than 64 bytes: the context's end is cut, the ###Answer marker kept
    want = tok.decode(reference(model, ids, 8, eos=tok.eos_token_id), skip_special_tokens=True).strip()
    status, body, _ = post(base, "/v1/answer", {"context": context, "question": question, "max_tokens": 8})
    assert status == 200 and body["object"] == "answer"
    assert body["answer"] == want and body["context_truncated"] is True
    assert body["usage"]["prompt_tokens"] == 64
    events = sse(base, "/v1/answer", {"context": context, "question": question, "max_tokens": 8, "stream": True})
    assert "".join(c["choices"][0]["text"] for c in events[:-1]).strip() == want


def test_two_concurrent_requests_of_different_lengths_share_one_batch(tok):
    model = printable_model("encdec", tok, seed=1)
    backend = SlowBackend(model, max_batch=4, delay=0.02)
    server = Server(model, tok, ServeConfig(model_name="tiny"), backend=backend)
    jobs = {"long": ("a longer prompt with more tokens in it", 40), "short": ("short", 6)}
    results = {}
    with serve_in_thread(server.app) as base:
        def call(name):
            prompt, n = jobs[name]
            results[name] = post(base, "/v1/completions", {"prompt": prompt, "max_tokens": n, "temperature": 0,
                                                           "ignore_eos": True})
        threads = [threading.Thread(target=call, args=(name,)) for name in jobs]
        threads[0].start()
        assert _wait_until(lambda: server.engine.running == 1)  # the long one is decoding when the short one comes
        threads[1].start()
        for t in threads:
            t.join(60)
    assert max(backend.batch_sizes) == 2  # they were decoded together
    assert backend.batch_sizes[-1] == 1  # and the short one left first
    for name, (prompt, n) in jobs.items():
        status, body, _ = results[name]
        assert status == 200
        assert body["choices"][0]["text"] == tok.decode(reference(model, _ids(tok, prompt), n),
                                                        skip_special_tokens=True)
        assert body["usage"]["completion_tokens"] == n


def _health(base):
    return request(base, "GET", "/health")[1]


def _wait_until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_frees_its_row(tok, stream):
    model = printable_model("encdec", tok, seed=2)
    backend = SlowBackend(model, max_batch=2, delay=0.02)
    server = Server(model, tok, ServeConfig(model_name="tiny", max_new_tokens=400), backend=backend)
    with serve_in_thread(server.app) as base:
        host, port = base.removeprefix("http://").split(":")
        body = json.dumps({"prompt": "hello", "max_tokens": 400, "ignore_eos": True, "stream": stream}).encode()
        sock = socket.create_connection((host, int(port)))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert _wait_until(lambda: _health(base)["running"] == 1)
        if stream:
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        sock.close()
        assert _wait_until(lambda: _health(base)["running"] == 0, timeout=5)  # 400 steps would take 8 s
        steps = len(backend.batch_sizes)
        assert steps < 300
        # the server goes on: a new request is answered in full
        status, out, _ = post(base, "/v1/completions", {"prompt": "again", "max_tokens": 3, "ignore_eos": True})
        assert status == 200 and out["usage"]["completion_tokens"] == 3


@pytest.fixture(scope="module")
def strict(tok):
    """A server with small limits, an API key and one slow row, for the refusals."""
    model = printable_model("encdec", tok, seed=3)
    backend = SlowBackend(model, max_batch=1, delay=0.02)
    config = ServeConfig(model_name="tiny", max_batch=1, max_queue=1, max_concurrent=3, max_input_tokens=32,
                         max_new_tokens=16, max_body_bytes=2000, api_key="sekret")
    server = Server(model, tok, config, backend=backend)
    with serve_in_thread(server.app) as base:
        yield base, server


AUTH = {"Authorization": "Bearer sekret"}
OK = {"prompt": "hi", "max_tokens": 2}
BAD_REQUESTS = [  # (path, body or raw bytes, status, param)
    ("/v1/completions", b"{not json", 400, "body"),
    ("/v1/completions", b"", 400, "body"),
    ("/v1/completions", b"\xff\xfe", 400, "body"),
    ("/v1/completions", [1, 2], 400, "body"),
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/completions", {"prompt": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x" * 40}, 400, "prompt"),  # 40 tokens > --max-input-tokens 32
    ("/v1/completions", {"prompt": [5, 999]}, 400, "prompt[1]"),
    ("/v1/completions", {"prompt": ["ok", 5]}, 400, "prompt[1]"),
    ("/v1/completions", {**OK, "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {**OK, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {**OK, "max_tokens": 17}, 400, "max_tokens"),  # > --max-new-tokens 16
    ("/v1/completions", {**OK, "max_tokens": 2.5}, 400, "max_tokens"),
    ("/v1/completions", {**OK, "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {**OK, "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {**OK, "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {**OK, "n": 0}, 400, "n"),
    ("/v1/completions", {**OK, "n": 2}, 400, "n"),  # > --max-batch 1
    ("/v1/completions", {**OK, "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {**OK, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {**OK, "stop": [""]}, 400, "stop"),
    ("/v1/completions", {**OK, "seed": 2 ** 70}, 400, "seed"),
    ("/v1/completions", {**OK, "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("/v1/completions", {**OK, "logprobs": 3}, 400, "logprobs"),
    ("/v1/completions", {**OK, "echo": True}, 400, "echo"),
    ("/v1/completions", {**OK, "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {**OK, "frobnicate": 1}, 400, "frobnicate"),
    ("/v1/completions", {**OK, "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {**OK, "stream_options": {"include_usage": 1}}, 400, "stream_options.include_usage"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "hi"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400,
     "messages[0].content[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_data_uri()}}]}]}, 400, "messages[0].content[0].image_url.url"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                              "max_completion_tokens": 2}, 400, "max_completion_tokens"),
    ("/v1/answer", {"context": "", "question": "who?"}, 400, "context"),
    ("/v1/answer", {"context": "Some text."}, 400, "question"),
    ("/v1/answer", {"context": "Some text.", "question": ["who?"]}, 400, "question"),
    ("/v1/answer", {"context": "Some text.", "question": "who?", "max_tokens": 100}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "y" * 2100}, 413, "body"),  # > --max-body-bytes 2000
]


@pytest.mark.parametrize("path,body,status,param", BAD_REQUESTS, ids=[f"{p}-{s}-{f}" for p, _, s, f in BAD_REQUESTS])
def test_bad_request_gets_a_4xx_naming_the_field(strict, path, body, status, param):
    base, _ = strict
    raw = body if isinstance(body, bytes) else None
    got, out, _ = post(base, path, None if raw is not None else body, raw=raw, headers=AUTH)
    assert got == status, out
    assert out["error"]["param"] == param, out
    assert out["error"]["message"].startswith(param.split("[")[0]) and len(out["error"]["message"]) > len(param) + 3


def test_paths_methods_and_api_key(strict):
    base, server = strict
    assert request(base, "GET", "/nowhere")[0] == 404
    status, out, _ = request(base, "GET", "/v1/completions", headers=AUTH)
    assert status == 405 and "not allowed" in out["error"]["message"]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
        status, out, hdrs = post(base, "/v1/completions", OK, headers=headers)
        assert status == 401 and out["error"]["type"] == "authentication_error" and hdrs["www-authenticate"] == "Bearer"
    assert request(base, "GET", "/metrics")[0] == 401
    assert request(base, "GET", "/v1/models")[0] == 401
    assert request(base, "GET", "/health")[0] == 200 and request(base, "GET", "/")[0] == 200  # open
    status, out, _ = post(base, "/v1/completions", OK, headers=AUTH)
    assert status == 200 and out["usage"]["completion_tokens"] >= 1


def test_queue_and_concurrency_limits_give_429(strict):
    base, server = strict  # one row, one waiting place, three requests in flight at most
    slow = {"prompt": "hi", "max_tokens": 16, "ignore_eos": True}
    results = []

    def call():
        results.append(post(base, "/v1/completions", slow, headers=AUTH)[0])

    server.backend.gate = gate = threading.Event()  # the first request holds its row until the refusals are seen
    first, second = threading.Thread(target=call), threading.Thread(target=call)
    try:
        first.start()
        assert _wait_until(lambda: server.engine.running == 1)
        second.start()
        assert _wait_until(lambda: server.engine.queue_length == 1)
        status, out, _ = post(base, "/v1/completions", slow, headers=AUTH)
        assert status == 429 and out["error"]["code"] == "queue_full"
        server.inflight += 10  # as if many streams were open
        try:
            status, out, _ = post(base, "/v1/completions", slow, headers=AUTH)
            assert status == 429 and out["error"]["code"] == "server_busy"
        finally:
            server.inflight -= 10
    finally:
        gate.set()
        server.backend.gate = None
    first.join(30)
    second.join(30)
    assert results == [200, 200]


def test_models_health_metrics_and_page(strict):
    base, _ = strict
    post(base, "/v1/completions", OK, headers=AUTH)
    status, out, _ = request(base, "GET", "/v1/models", headers=AUTH)
    assert out["data"][0]["id"] == "tiny" and out["data"][0]["mu"]["max_input_tokens"] == 32
    status, text, hdrs = request(base, "GET", "/metrics", headers=AUTH)
    assert status == 200 and hdrs["content-type"].startswith("text/plain")
    for name in ("mu_requests_total", "mu_prompt_tokens_total", "mu_generation_tokens_total", "mu_queue_length",
                 "mu_running_rows", "mu_batch_size_bucket", "mu_decode_step_seconds_bucket",
                 "mu_time_to_first_token_seconds_bucket", "mu_request_latency_seconds_bucket"):
        assert name in text
    assert 'mu_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert 'status="5' not in text  # no request of this module's server ended in a 5xx
    status, html, hdrs = request(base, "GET", "/")
    assert status == 200 and hdrs["content-type"].startswith("text/html") and 'id="run"' in html


# -- a vision-language model ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vlm_served():
    vlm = printable_vlm()
    config = ServeConfig(model_name="vlm", max_image_bytes=3000, max_image_pixels=300 * 300, max_new_tokens=16)
    server = Server(vlm, vlm.tokenizer, config)
    with serve_in_thread(server.app) as base:
        yield vlm, base


def _image_chat(url, text="What colour is it?", **kw):
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": text}]}], "temperature": 0,
            "max_tokens": 8, **kw}


def test_vlm_image_chat_equals_generate(vlm_served):
    from PIL import Image

    vlm, base = vlm_served
    ids = vlm.tokenizer(vlm.prompt("What colour is it?"), add_special_tokens=False)["input_ids"]
    views = vlm.processor(Image.new("RGB", (40, 30), (200, 30, 30)))
    want = vlm.tokenizer.decode(reference(vlm, ids, 8, eos=vlm.tokenizer.eos_token_id, images=[views]),
                                skip_special_tokens=True)
    status, out, _ = post(base, "/v1/chat/completions", _image_chat(png_data_uri()))
    assert status == 200 and out["choices"][0]["message"]["content"] == want
    assert out["usage"]["prompt_tokens"] == len(ids) - 1 + vlm.num_image_tokens(views.shape[0])
    events = sse(base, "/v1/chat/completions", _image_chat(png_data_uri(), stream=True))
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in events[:-1]) == want
    # a text-only request to the VLM goes through its text model
    status, out, _ = post(base, "/v1/completions", {"prompt": "hello", "max_tokens": 4, "temperature": 0})
    assert status == 200


def test_vlm_refuses_bad_images(vlm_served):
    import base64

    _, base = vlm_served
    field = "messages[0].content[0].image_url.url"
    cases = [
        ("https://example.com/cat.png", 400, "only data: URIs"),
        ("data:image/png,notbase64", 400, "base64 data URI"),
        ("data:text/plain;base64," + base64.b64encode(b"hello").decode(), 400, "not an image"),
        ("data:image/png;base64," + base64.b64encode(b"this is not a png").decode(), 400, "not an image PIL"),
        ("data:image/png;base64,@@@@", 400, "not valid base64"),
        (png_data_uri(size=(400, 400)), 413, "pixels"),
        ("data:image/png;base64," + "A" * 5000, 413, "bytes"),
    ]
    for url, status, words in cases:
        got, out, _ = post(base, "/v1/chat/completions", _image_chat(url))
        assert got == status and out["error"]["param"] == field and words in out["error"]["message"], (url[:40], out)
    two = _image_chat(png_data_uri())
    two["messages"][0]["content"].append({"type": "image_url", "image_url": {"url": png_data_uri()}})
    got, out, _ = post(base, "/v1/chat/completions", two)
    assert got == 400 and out["error"]["param"] == "messages[0].content[2].image_url.url"
    got, out, _ = post(base, "/v1/chat/completions", _image_chat(png_data_uri(), text="look: <image>"))
    assert got == 400 and out["error"]["param"] == "messages[0].content"
    got, out, _ = post(base, "/v1/completions", {"prompt": [5, 6, 260]})  # 260: the <image> token
    assert got == 400 and out["error"]["param"] == "prompt[2]"
    assert request(base, "GET", "/health")[0] == 200


def test_image_preprocessing_runs_on_one_torch_thread_when_the_engine_owns_them():
    """With `ServeConfig.threads` (what `mu serve` sets) a request thread preprocesses images on one torch thread,
    so the engine's thread keeps the process's only OpenMP team (docs/serving.md)."""
    from PIL import Image

    vlm = printable_vlm()
    server = Server(vlm, vlm.tokenizer, ServeConfig(threads=2))
    seen, real = [], vlm.processor
    vlm.processor = lambda image: (seen.append(torch.get_num_threads()), real(image))[1]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # what a new thread starts with
    try:
        worker = threading.Thread(target=server._views, args=(Image.new("RGB", (40, 30), (200, 30, 30)),))
        worker.start()
        worker.join()
    finally:
        torch.set_num_threads(threads)
    assert seen == [1]


def test_serve_command_refuses_bad_arguments(tmp_path, capsys):
    from mu.cli import main

    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert "no model at" in capsys.readouterr().err
    model = printable_model("encdec", byte_tokenizer())
    model.tokenizer = byte_tokenizer()
    model.save_pretrained(tmp_path / "m")
    assert main(["serve", "--model", str(tmp_path / "m"), "--max-batch", "0"]) == 2
    assert "--max-batch must be >= 1" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path / "m"), "--threads", "0"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path / "m"), "--port", "70000"]) == 2
