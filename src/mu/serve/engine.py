"""Continuous batching: one model, one decode batch that requests join and leave between steps.

    engine = Engine(TorchBackend(model, max_batch=16), tokenizer)
    engine.start()                                   # a background thread runs the loop below
    handle = engine.submit(Prompt(ids), SamplingParams(max_new_tokens=64), on_event)
    ...                                              # on_event(Event) is called from that thread
    handle.cancel()                                  # the row leaves the batch at the next step

Each turn of the loop:
  1. rows whose request was cancelled leave the batch;
  2. waiting requests are admitted while slots are free (at most `prefill_tokens` prompt tokens a
     turn, so a burst of arrivals does not stall the running rows for long): their prompts are
     prefilled together (the encoder once per prompt, cross-attention K/V once per prompt), the
     first token of each is picked from the prefill logits, and their K/V are copied into free slots
     of the batch cache (`SlotCache`); a request with n > 1 choices fills n slots from one prefill;
  3. one `decode_step` for every active row; each row picks its token (greedy rows together, sampled
     rows each with their own generator, so a seeded request gives the same text whatever else is in
     the batch), and leaves at EOS, at one of its stop strings or at its token limit.

The backend is the only part that touches the model: `prefill(prompts) -> (logits, cache)`,
`admit(cache, row) -> slot`, `step(tokens) -> logits`, `release(slot) -> moved slot`, `reset()`.
`TorchBackend` runs a mu model (encoder-decoder, its decoder-only twin, or a VLM); another runtime
can be swapped in with the same five methods.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from mu.errors import MuError
from mu.generation import DEFAULT_BOS_ID, _special_id, left_pad, sample_logits
from mu.model.fast import pack_linears_
from mu.serve.detok import TextStream
from mu.serve.slots import SlotCache

log = logging.getLogger("mu.serve")


class QueueFull(Exception):
    """The engine's waiting queue is at its limit; the caller should retry later."""


@dataclass
class SamplingParams:
    max_new_tokens: int = 16  # tokens to generate at most (EOS is not counted)
    temperature: float = 0.0  # 0 picks the most likely token (greedy); > 0 samples
    top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens reaching this probability
    top_k: Optional[int] = None  # keep only the k most likely tokens when sampling
    stop: tuple[str, ...] = ()  # generation ends before the first of these strings
    seed: Optional[int] = None  # choice i samples with a generator seeded seed + i (None: a random seed)
    n: int = 1  # choices (rows) generated for the prompt
    ignore_eos: bool = False  # keep generating past EOS (benchmarks: exactly max_new_tokens tokens)


@dataclass
class Prompt:
    input_ids: list[int]  # encoder input (encoder-decoder) or the prompt (decoder-only), no special tokens added
    images: Optional[Tensor] = None  # a VLM's preprocessed views (n_views, 3, S, S) for the prompt's one <image>


@dataclass
class Event:
    kind: str  # "token" (text delta of one step), "done" (a choice finished) or "error" (the request failed)
    index: int = 0  # the choice
    text: str = ""  # new text ("token"); may be "" while a character or a possible stop string is incomplete
    token: Optional[int] = None  # the token id ("token"; None when a stop string ended the choice)
    finish_reason: Optional[str] = None  # "stop" (EOS or a stop string) or "length" ("done")
    completion_tokens: int = 0  # tokens this choice generated, EOS excluded ("done")
    error: str = ""  # what went wrong ("error")
    status: int = 500  # HTTP status that fits the error


class EngineStats:
    """What the engine reports as it runs; the server's Prometheus metrics implement it (no-ops here)."""

    def step(self, batch_size: int, seconds: float) -> None: ...

    def prefill(self, prompts: int, seconds: float) -> None: ...

    def first_token(self, seconds: float) -> None: ...

    def tokens(self, count: int) -> None: ...


class Handle:
    """One submitted request: its events go to `on_event`; `cancel()` frees its rows at the next step."""

    def __init__(self, prompt: Prompt, params: SamplingParams, on_event: Callable[[Event], None],
                 wake: Callable[[], None]):
        self.prompt = prompt
        self.params = params
        self.on_event = on_event
        self.submitted = time.perf_counter()
        self.first_token_at: Optional[float] = None
        self.cancelled = False
        self.open = params.n  # choices not finished yet
        self._wake = wake

    def cancel(self) -> None:
        self.cancelled = True
        self._wake()

    @property
    def done(self) -> bool:
        return self.open == 0 or self.cancelled

    def emit(self, event: Event) -> None:
        try:
            self.on_event(event)
        except Exception:  # a listener that went away must not stop the engine
            log.exception("event listener failed")


class _Row:
    """One choice of one request, decoding in a slot."""

    def __init__(self, handle: Handle, index: int, tokenizer, device: torch.device):
        self.handle = handle
        self.index = index
        self.params = handle.params
        self.text = TextStream(tokenizer, self.params.stop)
        self.generated = 0  # tokens picked (EOS included once picked)
        self.last: int = 0  # the token the next step feeds
        self.generator: Optional[torch.Generator] = None
        if self.params.temperature > 0:
            self.generator = torch.Generator(device=device)
            if self.params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed((self.params.seed + index) % 2 ** 64)


class TorchBackend:
    """Runs a mu model (`MuEncoderDecoder`, `MuDecoderOnly` or `MuVLM`) for the engine, one copy of it."""

    def __init__(self, model, max_batch: int = 16):
        if max_batch < 1:
            raise MuError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model
        self.config = model.config
        self.max_batch = max_batch
        # a batch's decode step is mostly products of its rows by the head's and the decoder's weights: run them
        # on packed copies of those weights (mu.model.fast.pack_linears_)
        pack_linears_(getattr(model, "lm", model))
        self.encdec = model.config.arch == "encdec"
        self.device = model.device
        self.bos = _special_id(model, "bos_token_id", None, DEFAULT_BOS_ID)
        self._cache: Optional[SlotCache] = None

    @property
    def cache(self) -> SlotCache:
        if self._cache is None:  # made on first use, in the engine's thread (inference mode)
            text = getattr(self.model, "lm", self.model)
            c = self.config
            self._cache = SlotCache(len(text.decoder_blocks()), self.max_batch, c.n_kv_head, c.head_dim,
                                    self.model.dtype, self.device, cross=self.encdec)
        return self._cache

    @property
    def active(self) -> int:
        return 0 if self._cache is None else self._cache.n

    @property
    def free(self) -> int:
        return self.max_batch - self.active

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Prompt]) -> tuple[Tensor, object]:
        """Prompts (right-padded together) -> first-token logits (B, V) and their own prefilled KVCache."""
        pad = self.config.pad_token_id
        B, W = len(prompts), max(len(p.input_ids) for p in prompts)
        ids = torch.full((B, W), pad, dtype=torch.long)
        mask = torch.zeros((B, W), dtype=torch.bool)
        for i, p in enumerate(prompts):
            row = torch.tensor(p.input_ids, dtype=torch.long)
            ids[i, :len(row)] = row
            mask[i, :len(row)] = row != pad  # a pad id inside a prompt is masked, as `generate` masks it
        ids, mask = ids.to(self.device), mask.to(self.device)
        if self.encdec:
            cache = self.model.new_cache(B, 1)
            start = torch.full((B, 1), self.bos, dtype=torch.long, device=self.device)
            images = [p.images for p in prompts if p.images is not None]
            if images and len(images) != B:
                raise ValueError("prefill: prompts with and without images go in separate batches")
            kwargs = {"images": images} if images else {}
            logits = self.model.prefill(ids, mask, cache, start, **kwargs)
        else:
            ids, mask = left_pad(ids, mask, pad)
            cache = self.model.new_cache(B, W)
            logits = self.model.prefill(ids, mask, cache, None)
        return logits, cache

    @torch.inference_mode()
    def admit(self, cache, row: int) -> int:
        return self.cache.admit(cache, row)

    @torch.inference_mode()
    def step(self, tokens: Sequence[int]) -> Tensor:
        """One decode step for the active rows (slot order): their last tokens -> logits (n, V)."""
        t = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        return self.model.decode_step(t, self.cache)

    @torch.inference_mode()
    def release(self, slot: int) -> Optional[int]:
        return self.cache.release(slot)

    @torch.inference_mode()
    def reset(self) -> None:
        if self._cache is not None:
            self._cache.clear()


class Engine:
    def __init__(self, backend: TorchBackend, tokenizer, max_queue: int = 128, prefill_tokens: int = 4096,
                 stats: Optional[EngineStats] = None, threads: Optional[int] = None):
        self.backend = backend
        self.threads = threads  # torch's CPU threads in the engine's thread, set there when it starts (None: as is)
        self.tokenizer = tokenizer
        self.eos = getattr(tokenizer, "eos_token_id", None)
        self.max_queue = max_queue
        self.prefill_tokens = prefill_tokens
        self.stats = stats or EngineStats()
        self._waiting: deque[Handle] = deque()
        self._rows: list[_Row] = []  # the row in each active slot, in slot order
        self._cv = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self.steps = 0  # decode steps run (for tests and metrics)

    # -- the caller's side (any thread) ------------------------------------------------------------

    def submit(self, prompt: Prompt, params: SamplingParams, on_event: Callable[[Event], None]) -> Handle:
        if not prompt.input_ids:
            raise MuError("empty prompt: at least one input token is needed")
        if params.n > self.backend.max_batch:
            raise MuError(f"n={params.n} choices cannot fit a batch of {self.backend.max_batch} rows")
        if params.max_new_tokens < 1:
            raise MuError(f"max_new_tokens must be >= 1, got {params.max_new_tokens}")
        handle = Handle(prompt, params, on_event, self._wake)
        with self._cv:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
            self._waiting.append(handle)
            self._cv.notify()
        return handle

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._rows)

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="mu-serve-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        for handle in list(self._waiting) + list({id(r.handle): r.handle for r in self._rows}.values()):
            handle.emit(Event("error", error="the server is shutting down", status=503))

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    # -- the engine's thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._stopping and not self._rows and not self._waiting:
                        self._cv.wait()
                    if self._stopping:
                        return
                self.run_once()

    def run_once(self) -> None:
        """One turn: drop cancelled rows, admit waiting requests, one decode step. (Tests call it directly.)"""
        with torch.inference_mode():
            self._drop_cancelled()
            joining = self._take_waiting()
            if joining:
                self._admit(joining)
            if self._rows:
                self._step()

    def _drop_cancelled(self) -> None:
        for slot in range(len(self._rows) - 1, -1, -1):
            if self._rows[slot].handle.cancelled:
                self._release(slot)

    def _take_waiting(self) -> list[Handle]:
        taken: list[Handle] = []
        free, budget = self.backend.free, self.prefill_tokens
        with self._cv:
            while self._waiting:
                handle = self._waiting[0]
                if handle.cancelled:
                    self._waiting.popleft()
                    continue
                cost = len(handle.prompt.input_ids)
                if handle.params.n > free or (taken and cost > budget):
                    break
                taken.append(self._waiting.popleft())
                free -= handle.params.n
                budget -= cost
        return taken

    def _admit(self, handles: list[Handle]) -> None:
        groups = [[h for h in handles if h.prompt.images is None], [h for h in handles if h.prompt.images is not None]]
        for group in groups:
            if not group:
                continue
            t0 = time.perf_counter()
            try:
                logits, cache = self.backend.prefill([h.prompt for h in group])
            except Exception as e:
                self._fail(group, e)
                continue
            self.stats.prefill(len(group), time.perf_counter() - t0)
            first = len(self._rows)
            sources: list[int] = []  # the prefill row of each new slot
            try:
                for i, handle in enumerate(group):
                    for index in range(handle.params.n):
                        row = _Row(handle, index, self.tokenizer, logits.device)
                        slot = self.backend.admit(cache, i)
                        assert slot == len(self._rows), "slots are filled in order"
                        self._rows.append(row)
                        sources.append(i)
            except Exception as e:
                while len(self._rows) > first:
                    self._release(len(self._rows) - 1)
                self._fail(group, e)
                continue
            self._pick(logits[sources], list(range(first, len(self._rows))))

    def _step(self) -> None:
        t0 = time.perf_counter()
        try:
            logits = self.backend.step([row.last for row in self._rows])
        except Exception as e:
            handles = list({id(r.handle): r.handle for r in self._rows}.values())
            self._rows.clear()
            self.backend.reset()
            self._fail(handles, e)
            return
        self.steps += 1
        n = len(self._rows)
        self._pick(logits, list(range(n)))
        self.stats.step(n, time.perf_counter() - t0)

    def _pick(self, logits: Tensor, slots: list[int]) -> None:
        """Pick each row's next token from its logits (one row of `logits` per slot in `slots`), emit it,
        and release the rows that finished."""
        tokens = logits.argmax(dim=-1).tolist()
        for j, slot in enumerate(slots):
            row = self._rows[slot]
            p = row.params
            if row.generator is not None:
                tokens[j] = int(sample_logits(logits[j:j + 1], do_sample=True, temperature=p.temperature,
                                              top_k=p.top_k, top_p=p.top_p, generator=row.generator)[0])
        finished = []
        now = time.perf_counter()
        for j, slot in enumerate(slots):
            row, token = self._rows[slot], tokens[j]
            handle = row.handle
            if handle.first_token_at is None:
                handle.first_token_at = now
                self.stats.first_token(now - handle.submitted)
            row.generated += 1
            row.last = token
            reason = None
            if token == self.eos and not row.params.ignore_eos:
                reason = "stop"
                delta = row.text.finish()
            else:
                delta = row.text.add(token)
                if row.text.stopped:
                    reason = "stop"
                elif row.generated >= row.params.max_new_tokens:
                    reason = "length"
                    delta += row.text.finish()
            if not handle.cancelled:
                handle.emit(Event("token", row.index, delta, token))
            if reason is not None:
                finished.append(slot)
                n_tokens = row.generated - (1 if token == self.eos and not row.params.ignore_eos else 0)
                handle.open -= 1
                if not handle.cancelled:
                    handle.emit(Event("done", row.index, finish_reason=reason, completion_tokens=n_tokens))
        self.stats.tokens(len(slots))
        for slot in sorted(finished, reverse=True):
            self._release(slot)

    def _release(self, slot: int) -> None:
        moved = self.backend.release(slot)
        if moved is not None:
            self._rows[slot] = self._rows[moved]
            self._rows.pop(moved)
        else:
            self._rows.pop(slot)

    def _fail(self, handles: list[Handle], error: Exception) -> None:
        if isinstance(error, MuError):
            message, status = str(error), 400
        else:
            log.exception("generation failed", exc_info=error)
            message, status = f"generation failed: {type(error).__name__}: {error}", 500
        for handle in handles:
            handle.open = 0
            handle.emit(Event("error", error=message, status=status))
