"""The HTTP application: OpenAI-compatible endpoints over the continuous-batching engine, and a page.

    server = Server(model, tokenizer, ServeConfig(model_name="squad-small"))
    uvicorn.run(server.app, host="127.0.0.1", port=8000)        # what `mu serve` does

Endpoints (see docs/serving.md):
    POST /v1/completions         prompt -> text (OpenAI "text_completion"; stream: server-sent events)
    POST /v1/chat/completions    the last user message -> text; an image_url data URI goes to a VLM
    POST /v1/answer              context + question -> answer, with the squad_v2 task's own prompt
    GET  /v1/models, /health, /metrics (Prometheus text), /  (the page)

Every refusal is a JSON error `{"error": {"message", "type", "param", "code"}}` with a 4xx status:
400 a bad body or field (named in `param` and in the message), 401 a missing or wrong API key,
404 an unknown model or path, 413 a body or image over the limits, 429 when the queue or the
concurrency limit is full. A failure inside the model is a 500 for that request only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import json
import logging
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from typing import Any, AsyncIterator, Callable, Iterator, Optional, Sequence

import torch
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mu.data.tasks import encode_source, make_example
from mu.errors import MuError
from mu.eval.metrics import answer_text
from mu.eval.runner import MAX_NEW_TOKENS
from mu.serve.engine import Engine, Event, Prompt, QueueFull, SamplingParams, TorchBackend
from mu.serve.metrics import ServerMetrics
from mu.serve.schemas import AnswerRequest, ChatRequest, CompletionRequest, describe

log = logging.getLogger("mu.serve")

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "server_error"}
PROTECTED = ("/v1/", "/metrics")  # paths that need the API key when one is set


@dataclass
class ServeConfig:
    model_name: str = "mu"  # the id clients send as "model" (default: the model directory's name)
    max_batch: int = 16  # rows (choices) decoding together at most
    max_queue: int = 128  # requests waiting for free rows at most; more get 429
    max_concurrent: int = 256  # generation requests in flight (waiting, decoding, streaming) at most; more get 429
    max_input_tokens: Optional[int] = None  # prompt tokens at most (encoder positions for a VLM); None: block_size
    max_new_tokens: int = 256  # tokens generated per choice at most (and the default max_tokens)
    max_body_bytes: int = 16 * 2 ** 20  # request body size at most; more gets 413
    max_image_bytes: int = 8 * 2 ** 20  # decoded image size at most; more gets 413
    max_image_pixels: int = 4096 * 4096  # width x height at most; more gets 413
    prefill_tokens: int = 4096  # prompt tokens admitted into the batch per engine turn (see Engine)
    api_key: Optional[str] = None  # when set, /v1/* and /metrics need "Authorization: Bearer <key>"
    # torch CPU threads of the engine's thread, which then is the only one running torch's parallel kernels (the
    # image preprocessing in request threads runs on one): a second OpenMP team in the process makes libgomp
    # throttle both (docs/serving.md). None: threads as the process has them (tests, notebooks)
    threads: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_new_tokens", "max_body_bytes", "max_image_bytes", "max_image_pixels",
                     "max_concurrent", "prefill_tokens"):
            if getattr(self, name) < 1:
                raise MuError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise MuError(f"--threads must be >= 1, got {self.threads}")
        if self.max_input_tokens is not None and self.max_input_tokens < 1:
            raise MuError(f"--max-input-tokens must be >= 1, got {self.max_input_tokens}")
        if self.max_queue < 0:
            raise MuError(f"--max-queue must be >= 0, got {self.max_queue}")
        if self.api_key is not None and not self.api_key.strip():
            raise MuError("--api-key is empty")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                   headers: Optional[dict] = None) -> JSONResponse:
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Generation:
    """The engine requests of one HTTP request (one per prompt), their events merged into the event loop.

    Streamed, every event goes to the loop as it comes. Not streamed, the text of each choice is gathered in
    the engine's thread (`texts`) and only the choices' ends wake the loop, so a batch's decode step does not
    hand the loop one call per row."""

    def __init__(self, engine: Engine, prompts: Sequence[Prompt], params: SamplingParams, stream: bool = True):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.total = len(prompts) * params.n
        self.texts = [""] * self.total  # not streamed: each choice's text so far (written by the engine's thread)
        self.handles = []
        loop = asyncio.get_running_loop()

        def listener(offset: int) -> Callable[[Event], None]:
            def on_event(event: Event) -> None:
                if not stream and event.kind == "token":
                    self.texts[offset + event.index] += event.text
                    return
                with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening any more
                    loop.call_soon_threadsafe(self.queue.put_nowait, (offset, event))
            return on_event

        try:
            for k, prompt in enumerate(prompts):
                self.handles.append(engine.submit(prompt, params, listener(k * params.n)))
        except BaseException:
            self.cancel()
            raise

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """(choice index, event) until every choice is done (not streamed: "done" events only); an engine error
        raises ApiError."""
        remaining = self.total
        while remaining:
            offset, event = await self.queue.get()
            if event.kind == "error":
                raise ApiError(event.status, event.error)
            yield offset + event.index, event
            remaining -= event.kind == "done"

    def cancel(self) -> None:
        """Free the rows; a reader still waiting in `events` gets an error (499, the client closed the request)."""
        for handle in self.handles:
            if not handle.done:
                handle.cancel()
        self.queue.put_nowait((0, Event("error", error="the client closed the request", status=499)))


class _EventStream(StreamingResponse):
    """Server-sent events whose `on_close` runs however the response ends (finished, failed, disconnected)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class Server:
    """One served model: tokenizer, engine (one model copy), limits, metrics, and the Starlette app."""

    def __init__(self, model, tokenizer=None, config: Optional[ServeConfig] = None, backend=None):
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        if self.tokenizer is None:
            raise MuError("the model has no tokenizer: pass --tokenizer DIR (e.g. the paper's phi3_tokenizer)")
        self.config = config or ServeConfig()
        c = self.config
        if c.max_input_tokens is None:
            c.max_input_tokens = model.config.block_size
        self.vision = hasattr(model, "vision_config")
        self.vocab_size = model.config.vocab_size
        self.engine: Optional[Engine] = None
        self.metrics = ServerMetrics(lambda: self.engine.queue_length if self.engine else 0,
                                     lambda: self.engine.running if self.engine else 0)
        self.backend = backend or TorchBackend(model, c.max_batch)
        self.engine = Engine(self.backend, self.tokenizer, max_queue=c.max_queue, prefill_tokens=c.prefill_tokens,
                             stats=self.metrics, threads=c.threads)
        self.inflight = 0
        self.created = int(time.time())
        routes = [
            Route("/", self.page, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/answer", self.answer, methods=["POST"]),
        ]
        self.endpoints = {r.path for r in routes}
        app = Starlette(routes=routes, lifespan=self._lifespan,
                        exception_handlers={ApiError: self._api_error, MuError: self._mu_error,
                                            HTTPException: self._http_error, Exception: self._internal_error})
        self.app = _Guard(app, self)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        self.engine.start()
        try:
            yield
        finally:
            self.engine.stop()

    # -- errors ---------------------------------------------------------------------------------------

    async def _api_error(self, request: Request, exc: ApiError) -> Response:
        return error_response(exc.status, exc.message, exc.param, exc.code)

    async def _mu_error(self, request: Request, exc: MuError) -> Response:
        return error_response(400, str(exc))

    async def _http_error(self, request: Request, exc: HTTPException) -> Response:
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"method {request.method} not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    async def _internal_error(self, request: Request, exc: Exception) -> Response:
        log.exception("internal error on %s", request.url.path, exc_info=exc)
        return error_response(500, f"internal error: {type(exc).__name__}")

    # -- plain endpoints ------------------------------------------------------------------------------

    async def page(self, request: Request) -> Response:
        html = resources.files("mu.serve").joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(html)

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.config.model_name, "running": self.engine.running,
                             "queued": self.engine.queue_length, "max_batch": self.config.max_batch})

    async def prometheus(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(self, request: Request) -> Response:
        c, mc = self.config, self.model.config
        return JSONResponse({"object": "list", "data": [{
            "id": c.model_name, "object": "model", "created": self.created, "owned_by": "mu",
            "mu": {"arch": mc.arch, "vision": self.vision, "max_input_tokens": c.max_input_tokens,
                   "max_new_tokens": c.max_new_tokens, "max_batch": c.max_batch}}]})

    # -- request checks -------------------------------------------------------------------------------

    async def _body(self, request: Request, schema):
        raw = await request.body()
        if not raw.strip():
            raise ApiError(400, "body: empty; expected a JSON object", "body")
        try:
            data = json.loads(raw)
        except UnicodeDecodeError:
            raise ApiError(400, "body: not UTF-8 text; expected a JSON object", "body") from None
        except json.JSONDecodeError as e:
            raise ApiError(400, f"body: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})", "body") from None
        if not isinstance(data, dict):
            raise ApiError(400, f"body: expected a JSON object, got {type(data).__name__}", "body")
        try:
            return schema.model_validate(data)
        except ValidationError as e:
            field, message = describe(e)
            raise ApiError(400, message, field) from None

    def _check_model(self, name: Optional[str]) -> None:
        if name is not None and name != self.config.model_name:
            raise ApiError(404, f"model: unknown model {name!r}; this server serves {self.config.model_name!r}",
                           "model", "model_not_found")

    def _params(self, req, max_tokens: Optional[int], default_max: Optional[int] = None,
                field: str = "max_tokens") -> SamplingParams:
        c = self.config
        if max_tokens is not None and max_tokens > c.max_new_tokens:
            raise ApiError(400, f"{field}: {max_tokens} is more than this server's limit of {c.max_new_tokens} "
                                f"new tokens (--max-new-tokens)", field)
        n = getattr(req, "n", 1)
        if n > c.max_batch:
            raise ApiError(400, f"n: {n} choices do not fit this server's batch of {c.max_batch} rows (--max-batch)",
                           "n")
        best_of = getattr(req, "best_of", None)
        if best_of is not None and best_of != n:
            raise ApiError(400, "best_of: not supported by this server (only null or equal to n)", "best_of")
        return SamplingParams(max_new_tokens=max_tokens or min(default_max or c.max_new_tokens, c.max_new_tokens),
                              temperature=req.temperature, top_p=req.top_p, top_k=getattr(req, "top_k", None),
                              stop=tuple(getattr(req, "stop", None) or ()), seed=req.seed, n=n,
                              ignore_eos=getattr(req, "ignore_eos", False))

    def _check_length(self, n_tokens: int, field: str) -> None:
        if n_tokens > self.config.max_input_tokens:
            raise ApiError(400, f"{field}: {n_tokens} input tokens, more than this server's limit of "
                                f"{self.config.max_input_tokens} (--max-input-tokens)", field)

    def _encode(self, text: str, field: str) -> list[int]:
        """User text -> ids; special-token strings in it stay text (a prompt cannot forge <pad> or <image>)."""
        ids = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        if not ids:
            raise ApiError(400, f"{field}: empty; at least one token of input is needed", field)
        self._check_length(len(ids), field)
        return ids

    def _token_prompt(self, ids: list[int]) -> list[int]:
        for i, t in enumerate(ids):
            if not 0 <= t < self.vocab_size:
                raise ApiError(400, f"prompt[{i}]: token id {t} is outside the vocabulary (0..{self.vocab_size - 1})",
                               f"prompt[{i}]")
            if self.vision and t == self.model.image_token_id:
                raise ApiError(400, f"prompt[{i}]: the image placeholder needs an image; send images to "
                                    f"/v1/chat/completions", f"prompt[{i}]")
        self._check_length(len(ids), "prompt")
        return ids

    def _views(self, image):
        """The model's preprocessed views of `image` (in a request thread: on one torch thread when the engine owns
        the threads, `ServeConfig.threads`)."""
        if self.config.threads is not None:
            torch.set_num_threads(1)  # this thread's own setting; the engine's thread set its own when it started
        return self.model.processor(image)

    def _decode_image(self, url: str, field: str):
        """A data: URI -> an RGB PIL image, or an ApiError naming `field`."""
        from PIL import Image, ImageOps, UnidentifiedImageError

        c = self.config
        if not url.startswith("data:"):
            raise ApiError(400, f"{field}: only data: URIs are accepted (data:image/png;base64,...); this server "
                                f"fetches nothing", field)
        header, comma, payload = url[5:].partition(",")
        parts = header.split(";")
        if not comma or "base64" not in parts[1:]:
            raise ApiError(400, f"{field}: expected a base64 data URI (data:image/png;base64,...)", field)
        if not parts[0].startswith("image/"):
            raise ApiError(400, f"{field}: media type {parts[0] or '(none)'!r} is not an image (expected image/png, "
                                f"image/jpeg, ...)", field)
        if len(payload) > 4 * (c.max_image_bytes // 3 + 1):
            raise ApiError(413, f"{field}: the image is larger than this server's limit of {c.max_image_bytes} "
                                f"bytes", field)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{field}: not valid base64", field) from None
        try:
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > c.max_image_pixels:
                    raise ApiError(413, f"{field}: a {w}x{h} image is larger than this server's limit of "
                                        f"{c.max_image_pixels} pixels", field)
                im.load()
                return ImageOps.exif_transpose(im).convert("RGB")
        except UnidentifiedImageError:
            raise ApiError(400, f"{field}: not an image PIL can read (expected PNG, JPEG, GIF, BMP, WebP, ...)",
                           field) from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise ApiError(400, f"{field}: could not decode the image ({e})", field) from None

    # -- generation endpoints ---------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        req = await self._body(request, CompletionRequest)
        self._check_model(req.model)
        params = self._params(req, req.max_tokens)
        if isinstance(req.prompt, str):
            prompts = [Prompt(self._encode(req.prompt, "prompt"))]
        elif isinstance(req.prompt[0], str):
            prompts = [Prompt(self._encode(p, f"prompt[{i}]")) for i, p in enumerate(req.prompt)]
        else:
            prompts = [Prompt(self._token_prompt(list(req.prompt)))]
        return await self._respond(request, "/v1/completions", prompts, params, req.stream,
                                   req.stream_options and req.stream_options.include_usage, _CompletionFormat())

    async def chat(self, request: Request) -> Response:
        req = await self._body(request, ChatRequest)
        self._check_model(req.model)
        if req.max_tokens is not None and req.max_completion_tokens is not None:
            raise ApiError(400, "max_completion_tokens: give max_tokens or max_completion_tokens, not both",
                           "max_completion_tokens")
        field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        params = self._params(req, req.max_completion_tokens or req.max_tokens, field=field)
        prompt = await self._chat_prompt(req)
        return await self._respond(request, "/v1/chat/completions", [prompt], params, req.stream,
                                   req.stream_options and req.stream_options.include_usage, _ChatFormat())

    async def _chat_prompt(self, req: ChatRequest) -> Prompt:
        """The last user message -> a Prompt (text parts joined by newlines; at most one image, for a VLM)."""
        last = next((i for i in range(len(req.messages) - 1, -1, -1) if req.messages[i].role == "user"), None)
        if last is None:
            raise ApiError(400, "messages: no message with role 'user' (its content is the prompt)", "messages")
        content, where = req.messages[last].content, f"messages[{last}].content"
        if content is None:
            raise ApiError(400, f"{where}: required for the user message", where)
        texts, images = ([content], []) if isinstance(content, str) else ([], [])
        if not isinstance(content, str):
            for j, part in enumerate(content):
                if part.type == "text":
                    texts.append(part.text)
                else:
                    images.append((f"{where}[{j}].image_url.url", part.image_url.url))
        text = "\n".join(texts)
        if not images:
            return Prompt(self._encode(text, where))
        if not self.vision:
            raise ApiError(400, f"{images[0][0]}: model {self.config.model_name!r} reads text only; images need a "
                                f"vision-language model", images[0][0])
        if len(images) > 1:
            raise ApiError(400, f"{images[1][0]}: at most one image per request", images[1][0])
        field, url = images[0]
        image = await run_in_threadpool(self._decode_image, url, field)
        views = await run_in_threadpool(self._views, image)
        ids = self.tokenizer(self.model.prompt(text), add_special_tokens=False)["input_ids"]
        if ids.count(self.model.image_token_id) != 1:
            token = self.model.vision_config.image_token
            raise ApiError(400, f"{where}: the text may not contain the image placeholder {token!r}", where)
        self._check_length(len(ids) - 1 + self.model.num_image_tokens(views.shape[0]), where)
        return Prompt(ids, images=views)

    async def answer(self, request: Request) -> Response:
        req = await self._body(request, AnswerRequest)
        self._check_model(req.model)
        for name in ("context", "question"):
            if not getattr(req, name).strip():
                raise ApiError(400, f"{name}: empty", name)
        example = make_example("squad_v2", {"context": req.context, "question": req.question, "answers": []},
                               where="request")
        ids, truncated = encode_source(self.tokenizer, example.source, self.config.max_input_tokens, "squad_v2")
        params = self._params(req, req.max_tokens, default_max=MAX_NEW_TOKENS["squad_v2"])
        return await self._respond(request, "/v1/answer", [Prompt(ids)], params, req.stream,
                                   req.stream_options and req.stream_options.include_usage, _AnswerFormat(truncated))

    # -- running a generation ---------------------------------------------------------------------------

    def _start(self, prompts: list[Prompt], params: SamplingParams, stream: bool) -> _Generation:
        if self.inflight >= self.config.max_concurrent:
            raise ApiError(429, f"too many requests in flight (limit {self.config.max_concurrent}, "
                                f"--max-concurrent); retry later", code="server_busy")
        try:
            generation = _Generation(self.engine, prompts, params, stream)
        except QueueFull as e:
            raise ApiError(429, f"{e}; retry later", code="queue_full") from None
        except MuError as e:
            raise ApiError(400, str(e)) from None
        self.inflight += 1
        return generation

    def _usage(self, prompts: list[Prompt], completion_tokens: int) -> dict:
        prompt_tokens = sum(self._prompt_tokens(p) for p in prompts)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def _prompt_tokens(self, prompt: Prompt) -> int:
        if prompt.images is None:
            return len(prompt.input_ids)
        return len(prompt.input_ids) - 1 + self.model.num_image_tokens(prompt.images.shape[0])

    async def _respond(self, request: Request, endpoint: str, prompts: list[Prompt], params: SamplingParams,
                       stream: bool, include_usage: bool, fmt: "_Format") -> Response:
        generation = self._start(prompts, params, stream)
        self.metrics.prompt_tokens.inc(sum(self._prompt_tokens(p) for p in prompts))
        t0 = time.perf_counter()
        head = {"id": f"{fmt.prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.config.model_name}
        closed = False

        def close() -> None:
            nonlocal closed
            if not closed:
                closed = True
                generation.cancel()
                self.inflight -= 1
                self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)

        if stream:
            return _EventStream(self._stream(generation, prompts, fmt, head, include_usage), close)
        watcher = asyncio.create_task(_cancel_on_disconnect(request, generation))
        try:
            reasons, tokens = [None] * generation.total, 0
            async for index, event in generation.events():
                reasons[index] = event.finish_reason
                tokens += event.completion_tokens
            return JSONResponse(fmt.response(head, generation.texts, reasons, self._usage(prompts, tokens)))
        finally:
            watcher.cancel()
            close()

    async def _stream(self, generation: _Generation, prompts: list[Prompt], fmt: "_Format", head: dict,
                      include_usage: bool) -> AsyncIterator[str]:
        tokens = 0
        for index in range(generation.total):
            first = fmt.first_chunk(head, index)
            if first is not None:
                yield _sse(first)
        try:
            async for index, event in generation.events():
                if event.kind == "token":
                    if event.text:
                        yield _sse(fmt.chunk(head, index, event.text))
                else:
                    tokens += event.completion_tokens
                    yield _sse(fmt.chunk(head, index, "", event.finish_reason))
        except ApiError as e:
            yield _sse({"error": {"message": e.message, "type": ERROR_TYPES.get(e.status, "server_error"),
                                  "param": None, "code": e.code}})
        else:
            if include_usage:
                yield _sse({**head, "object": fmt.chunk_object, "choices": [], "usage": self._usage(prompts, tokens)})
        yield "data: [DONE]\n\n"


async def _cancel_on_disconnect(request: Request, generation: _Generation) -> None:
    """Cancel the generation when the client goes away (a non-streaming request has nothing to send until the
    end, so the disconnect is seen on the receive side)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            generation.cancel()
            return


# -- response shapes ------------------------------------------------------------------------------------


class _Format:
    prefix = "cmpl"
    chunk_object = "text_completion"

    def first_chunk(self, head: dict, index: int) -> Optional[dict]:
        return None

    def chunk(self, head: dict, index: int, text: str, finish_reason: Optional[str] = None) -> dict:
        return {**head, "object": self.chunk_object,
                "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}]}

    def response(self, head: dict, texts: list[str], reasons: list, usage: dict) -> dict:
        raise NotImplementedError


class _CompletionFormat(_Format):
    def response(self, head, texts, reasons, usage):
        return {**head, "object": "text_completion", "usage": usage,
                "choices": [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                            for i, (t, r) in enumerate(zip(texts, reasons))]}


class _ChatFormat(_Format):
    prefix = "chatcmpl"
    chunk_object = "chat.completion.chunk"

    def first_chunk(self, head, index):
        return {**head, "object": self.chunk_object, "choices": [
            {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}

    def chunk(self, head, index, text, finish_reason=None):
        return {**head, "object": self.chunk_object, "choices": [
            {"index": index, "delta": {"content": text} if text else {}, "logprobs": None,
             "finish_reason": finish_reason}]}

    def response(self, head, texts, reasons, usage):
        return {**head, "object": "chat.completion", "usage": usage,
                "choices": [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                             "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))]}


class _AnswerFormat(_Format):
    """/v1/answer: streams like a completion; the full response adds whether the answer is "no answer"."""

    prefix = "answer"

    def __init__(self, truncated: bool):
        self.truncated = truncated

    def response(self, head, texts, reasons, usage):
        answer = texts[0].strip()
        return {**head, "object": "answer", "answer": answer, "no_answer": answer_text(answer) == "",
                "finish_reason": reasons[0], "context_truncated": self.truncated, "usage": usage}


# -- ASGI guard: body size, API key, request counting ---------------------------------------------------


class _Guard:
    """Wraps the app: refuses bodies over the limit (413) and requests without the API key (401), and
    counts every response by endpoint and status."""

    def __init__(self, app, server: Server):
        self.app = app
        self.server = server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in self.server.endpoints else "other"
        status_seen = []

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status_seen.append(message["status"])
                self.server.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        key = self.server.config.api_key
        if key is not None and path.startswith(PROTECTED) and not _authorized(scope, key):
            await error_response(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                                 headers={"WWW-Authenticate": "Bearer"})(scope, receive, counting_send)
            return
        limit = self.server.config.max_body_bytes
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await _too_large(limit)(scope, receive, counting_send)
            return
        chunks, size = [], 0
        if scope["method"] in ("POST", "PUT", "PATCH"):
            more = True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    await _too_large(limit)(scope, receive, counting_send)
                    return
                chunks.append(chunk)
                more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed and chunks:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay if chunks else receive, counting_send)


def _authorized(scope, key: str) -> bool:
    header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), key.encode())


def _too_large(limit: int) -> Response:
    return error_response(413, f"body: larger than this server's limit of {limit} bytes (--max-body-bytes)", "body")


# -- running in a thread (tests, benchmarks, notebooks) -------------------------------------------------


@contextlib.contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `app` with uvicorn in a background thread; yields its base URL (port 0 picks a free port)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, name="mu-serve-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(30)
