"""`mu serve`: an HTTP server with continuous batching (OpenAI-compatible endpoints and a web page)."""

from __future__ import annotations

import ipaddress
import json
import os
import sys
from pathlib import Path

import torch

from mu.errors import MuError
from mu.model.io import load_model
from mu.tokenizer import load_tokenizer
from mu.utils import pick_device
from mu.vision.model import MODEL_TYPE, load_vlm

BACKENDS = ("torch",)  # a runtime goes here once it implements the engine's backend methods (mu.serve.engine)


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="model directory (text model or VLM) or the paper's model.pt")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the one saved with the model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", help="the id clients send as 'model' (default: the model directory's name)")
    p.add_argument("--max-batch", type=int, default=16, help="rows decoding together at most")
    p.add_argument("--max-queue", type=int, default=128, help="requests waiting for a free row at most (more: 429)")
    p.add_argument("--max-concurrent", type=int, default=256, help="generation requests in flight at most (more: 429)")
    p.add_argument("--max-input-tokens", type=int, help="prompt tokens at most (default: the model's block_size)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="new tokens per choice at most, and the default")
    p.add_argument("--max-body-bytes", type=int, default=16 * 2 ** 20, help="request body size at most (more: 413)")
    p.add_argument("--max-image-bytes", type=int, default=8 * 2 ** 20, help="decoded image size at most (more: 413)")
    p.add_argument("--api-key", default=os.environ.get("MU_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on /v1/* and /metrics (default: $MU_API_KEY, if set)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", help="fp32, bf16 or fp16 (default: as stored)")
    p.add_argument("--threads", type=int, help="torch CPU threads of the engine (default: torch's choice, the physical "
                   "cores; the model loads on one)")
    p.add_argument("--backend", default="torch", choices=BACKENDS, help="what runs the model")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def load_served_model(path: str, device=None, dtype=None, tokenizer=None):
    """A text model or a VLM directory (told apart by config.json's model_type), in eval mode."""
    config = Path(path) / "config.json"
    model_type = None
    if config.is_file():
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            pass  # load_model reports the problem with the file
    if model_type == MODEL_TYPE:
        model = load_vlm(path, device=device, dtype=dtype)
        if tokenizer is not None:
            model.tokenizer = model.lm.tokenizer = tokenizer
        return model
    return load_model(path, device=device, dtype=dtype, tokenizer=tokenizer)


def run(args) -> int:
    try:
        import uvicorn

        from mu.serve.app import Server, ServeConfig
    except ImportError as e:
        raise MuError(f"`mu serve` needs the serve extra ({e.name} is missing): pip install 'mu[serve]'") from None

    if not 0 <= args.port <= 65535:
        raise MuError(f"--port must be in 0..65535, got {args.port}")
    config = ServeConfig(max_batch=args.max_batch, max_queue=args.max_queue, max_concurrent=args.max_concurrent,
                         max_input_tokens=args.max_input_tokens, max_new_tokens=args.max_new_tokens,
                         max_body_bytes=args.max_body_bytes, max_image_bytes=args.max_image_bytes,
                         api_key=args.api_key, threads=args.threads)  # checked before the model loads
    # The engine's thread runs the model with these threads; this one loads it on one, so that the process keeps a
    # single OpenMP team (with two, libgomp throttles both: docs/serving.md). It runs no torch work afterwards.
    threads = torch.get_num_threads()
    config.threads = config.threads or threads
    torch.set_num_threads(1)
    try:
        device = pick_device(args.device)
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
        model = load_served_model(args.model, device=device, dtype=args.dtype, tokenizer=tokenizer)
        name = config.model_name = args.model_name or Path(args.model).resolve().name
        server = Server(model, getattr(model, "tokenizer", None), config)
    finally:
        torch.set_num_threads(threads)  # this thread's setting back (it has no team); a caller's is as it was
    if args.api_key is None and not _is_loopback(args.host):
        print(f"mu serve: warning: listening on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    print(f"mu serve: {name} ({model.config.arch}{', vision' if server.vision else ''}) on "
          f"http://{args.host}:{args.port}/ (max batch {config.max_batch})", file=sys.stderr, flush=True)
    uvicorn.run(server.app, host=args.host, port=args.port, log_level=args.log_level, lifespan="on")
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
