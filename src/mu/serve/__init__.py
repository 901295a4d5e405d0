"""Serving: `mu serve`, an HTTP server that batches requests continuously (see docs/serving.md).

    slots.py   SlotCache: a KV cache whose rows join and leave between decode steps
    detok.py   incremental detokenization with stop strings
    engine.py  the continuous-batching loop and the backend that runs the model
    app.py     the FastAPI application: OpenAI-compatible endpoints, /v1/answer, /health, /metrics, the page

The HTTP part needs the optional `serve` extra (FastAPI, uvicorn, prometheus-client).
"""
