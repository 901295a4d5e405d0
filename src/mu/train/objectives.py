"""Training objectives: what a training example looks like, and the default loss.

Fine-tuning (`seq2seq`): a task example's source and target, tokenised by
`mu.data.batching.encode_examples`; the loss is cross-entropy on the target tokens (+ EOS) only,
for both architectures (the collator masks the decoder-only model's source positions).

Pretraining on plain text: the corpus is tokenised, documents are joined with EOS and cut into
chunks of `seq_len` tokens. Each chunk becomes a feature, freshly for every epoch but
deterministically from (seed, epoch, chunk index), so a resumed run sees the same data:

    span    (encoder-decoder) T5 span corruption: ~15% of the tokens, in spans of mean length 3, are
            replaced in the source by sentinel ids; the target lists each sentinel then its span, then EOS.
    prefix  (either) the chunk is split at a uniformly random point: source = the prefix,
            target = the rest (no EOS: the text goes on). Loss on the target only.
    causal  (decoder-only) source = nothing, target = the whole chunk: next-token prediction on every
            position (the collator starts the sequence with BOS).

Sentinels are the top ids of the model's vocabulary: sentinel k is `vocab_size - 1 - k`, for
k < `NUM_SENTINELS`. The trainer sizes the vocabulary as len(tokenizer) + NUM_SENTINELS rounded up to
a multiple of 64, so these ids never collide with a tokenizer token (for the Phi-3.5 tokenizer this
gives the paper's 32128).
"""

from __future__ import annotations

import random
from typing import Any, Sequence

from torch import Tensor

from mu.data.batching import model_inputs
from mu.errors import MuError

NUM_SENTINELS = 100
OBJECTIVES = ("seq2seq", "span", "prefix", "causal")
PRETRAIN_OBJECTIVES = ("span", "prefix", "causal")
OBJECTIVE_ARCHS = {"seq2seq": ("encdec", "deconly"), "span": ("encdec",), "prefix": ("encdec", "deconly"),
                   "causal": ("deconly",)}


def check_objective(objective: str, arch: str) -> None:
    if objective not in OBJECTIVES:
        raise MuError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
    if arch not in OBJECTIVE_ARCHS[objective]:
        hint = {"span": "use --objective prefix or causal for a decoder-only model",
                "causal": "use --objective span or prefix for an encoder-decoder"}.get(objective, "")
        raise MuError(f"objective {objective!r} is not defined for arch {arch!r}; {hint}")


def sentinel_id(vocab_size: int, k: int) -> int:
    """The id of sentinel k (T5's <extra_id_k>): counted down from the top of the vocabulary."""
    return vocab_size - 1 - k


# ---------------------------------------------------------------------------------------------
# Span corruption (T5, Raffel et al. 2020, section 3.1.4; the noise mask follows the paper's description)


def random_spans_noise_mask(length: int, noise_density: float, mean_span: float, rng: random.Random) -> list[bool]:
    """A mask of `length` positions with round(length * noise_density) noisy ones in spans of mean length
    `mean_span`; the sequence starts with a clean segment and clean/noise segments alternate."""
    num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    num_spans = max(int(round(num_noise / mean_span)), 1)
    num_spans = min(num_spans, num_noise, length - num_noise)

    def segment(total: int, parts: int) -> list[int]:  # `parts` positive lengths summing to `total`
        cuts = sorted(rng.sample(range(1, total), parts - 1)) if parts > 1 else []
        bounds = [0, *cuts, total]
        return [b - a for a, b in zip(bounds, bounds[1:])]

    noise, clean = segment(num_noise, num_spans), segment(length - num_noise, num_spans)
    mask: list[bool] = []
    for c, n in zip(clean, noise):
        mask += [False] * c + [True] * n
    return mask


def span_corruption(ids: Sequence[int], rng: random.Random, vocab_size: int, eos_token_id: int,
                    noise_density: float = 0.15, mean_span: float = 3.0) -> tuple[list[int], list[int]]:
    """ids -> (source with one sentinel per dropped span, target = sentinel_k + span_k ... + EOS)."""
    if len(ids) < 2:
        raise ValueError("span corruption needs at least 2 tokens")
    mask = random_spans_noise_mask(len(ids), noise_density, mean_span, rng)
    source: list[int] = []
    target: list[int] = []
    k = -1
    for i, (tok, noisy) in enumerate(zip(ids, mask)):
        if noisy:
            if i == 0 or not mask[i - 1]:
                k += 1
                if k >= NUM_SENTINELS:
                    raise MuError(f"span corruption needs more than {NUM_SENTINELS} sentinels; use a shorter --seq-len")
                sid = sentinel_id(vocab_size, k)
                source.append(sid)
                target.append(sid)
            target.append(tok)
        else:
            source.append(tok)
    return source, target + [eos_token_id]


def prefix_split(ids: Sequence[int], rng: random.Random) -> tuple[list[int], list[int]]:
    """Split at a uniformly random point: both parts non-empty."""
    cut = rng.randint(1, len(ids) - 1)
    return list(ids[:cut]), list(ids[cut:])


# ---------------------------------------------------------------------------------------------
# Datasets: indexable, a feature per index, possibly different every epoch


class FeatureDataset:
    """Pre-tokenised features (fine-tuning): the same feature every epoch."""

    def __init__(self, features: list[dict]):
        self.features = features
        self.lengths_by_arch: dict[str, list[int]] = {}

    def __len__(self) -> int:
        return len(self.features)

    def get(self, i: int, epoch: int) -> dict:
        return self.features[i]

    def lengths(self, arch: str) -> list[int]:
        from mu.data.batching import feature_length

        if arch not in self.lengths_by_arch:
            self.lengths_by_arch[arch] = [feature_length(f, arch) for f in self.features]
        return self.lengths_by_arch[arch]


class PretrainDataset:
    """Chunks of a token stream, turned into features by a pretraining objective on access."""

    def __init__(self, chunks: list[list[int]], objective: str, vocab_size: int, eos_token_id: int, seed: int = 0,
                 noise_density: float = 0.15, mean_span: float = 3.0):
        if objective not in PRETRAIN_OBJECTIVES:
            raise MuError(f"unknown pretraining objective {objective!r}; expected one of {PRETRAIN_OBJECTIVES}")
        self.chunks, self.objective, self.vocab_size, self.eos = chunks, objective, vocab_size, eos_token_id
        self.seed, self.noise_density, self.mean_span = seed, noise_density, mean_span

    def __len__(self) -> int:
        return len(self.chunks)

    def get(self, i: int, epoch: int) -> dict:
        ids = self.chunks[i]
        if self.objective == "causal":
            return {"source_ids": [], "target_ids": list(ids), "index": i}
        rng = random.Random(f"mu-{self.objective}:{self.seed}:{epoch}:{i}")
        if self.objective == "span":
            src, tgt = span_corruption(ids, rng, self.vocab_size, self.eos, self.noise_density, self.mean_span)
        else:
            src, tgt = prefix_split(ids, rng)
        return {"source_ids": src, "target_ids": tgt, "index": i}

    def lengths(self, arch: str) -> list[int]:
        return [len(c) for c in self.chunks]


def chunk_documents(docs_ids: Sequence[Sequence[int]], seq_len: int, eos_token_id: int) -> list[list[int]]:
    """Join documents with EOS after each and cut the stream into chunks of `seq_len` (the tail is dropped)."""
    stream: list[int] = []
    for d in docs_ids:
        stream.extend(d)
        stream.append(eos_token_id)
    return [stream[i:i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]


# ---------------------------------------------------------------------------------------------
# The default loss


def seq2seq_loss(model, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
    """Mean cross-entropy over the batch's target tokens (the default `loss_fn` for every objective).

    A `loss_fn(model, batch) -> (loss, stats)` returns a scalar averaged over the batch's scored tokens
    (the trainer re-weights micro-batches by `batch["n_loss_tokens"]`), plus floats to log.
    """
    arch = "encdec" if "encoder_input_ids" in batch else "deconly"
    out = model(**model_inputs(batch, arch), targets=batch["targets"])
    return out.loss, {}

