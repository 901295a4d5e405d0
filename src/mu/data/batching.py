"""Tokenise examples and collate them into training batches for both architectures.

A *feature* is a dict of token-id lists, the unit every objective produces:

    {"source_ids": [...], "target_ids": [... , EOS], "index": i}

`Collator` turns a list of features into the tensors each architecture trains on, so the
encoder-decoder and its decoder-only twin see exactly the same tokens and are scored on the
same target positions:

    encoder-decoder  encoder_input_ids = source                     (right padding, pad 0)
                     decoder_input_ids = [BOS] + target[:-1]
                     targets           = target                      (padding -> -100)
    decoder-only     x                 = source + target             ([BOS] + target if no source)
                     input_ids         = x[:-1]
                     targets           = x[1:], source positions -> -100

Padding is dynamic (to the longest row of the batch, optionally rounded up to a multiple), and
`length_grouped_batches` puts examples of similar length together, in shuffled groups that are
deterministic for a (seed, epoch).
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import Tensor

from mu.data.tasks import encode_source, get_task
from mu.errors import MuError
from mu.utils import round_up

IGNORE_INDEX = -100  # target positions the loss skips
ARCHS = ("encdec", "deconly")


class TruncationWarning(UserWarning):
    """Some examples were longer than the token budget and were cut (one warning per call, with counts)."""


# ---------------------------------------------------------------------------------------------
# Tokenisation


def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def encode_examples(examples: Sequence[Any], tokenizer, max_source_len: int, max_target_len: int,
                    eos_token_id: Optional[int] = None, task: str = "seq2seq", what: str = "examples") -> list[dict]:
    """Tokenise `Example`s (anything with `.source` and `.target`, or dicts with those keys) into features.

    An over-long source is cut by `mu.data.tasks.encode_source` (the evaluation uses the same function):
    the end of its last field goes, the closing marker such as "\n###Answer\n" stays. The target keeps
    its first `max_target_len` tokens, then EOS is appended. Both architectures get the same budget.
    One `TruncationWarning` reports how many examples were cut. No BOS is added: the collator adds the
    decoder start token where the architecture needs it.
    """
    if max_source_len < 1 or max_target_len < 1:
        raise MuError(f"max_source_len and max_target_len must be >= 1, got {max_source_len} and {max_target_len}")
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    if eos is None:
        raise MuError("the tokenizer has no EOS token; pass eos_token_id")
    spec = get_task(task)
    sources = [example_text(e, "source") for e in examples]
    targets = [example_text(e, "target") for e in examples]
    src_ids, tgt_ids = _tokenize(tokenizer, sources), _tokenize(tokenizer, targets)
    features, cut_src, cut_tgt, cut_any = [], 0, 0, 0
    for i, (s, t) in enumerate(zip(src_ids, tgt_ids)):
        cut_any += len(s) > max_source_len or len(t) > max_target_len
        if len(s) > max_source_len:
            cut_src += 1
            s, _ = encode_source(tokenizer, sources[i], max_source_len, spec)
        if len(t) > max_target_len:
            cut_tgt += 1
            t = t[:max_target_len]
        features.append({"source_ids": list(s), "target_ids": list(t) + [eos], "index": i})
    if cut_any:
        parts = [f"{cut_src} sources longer than max_source_len={max_source_len} tokens" if cut_src else "",
                 f"{cut_tgt} targets longer than max_target_len={max_target_len}" if cut_tgt else ""]
        warnings.warn(f"{cut_any} of {len(features)} {what} were truncated ({', '.join(p for p in parts if p)})",
                      TruncationWarning, stacklevel=2)
    return features


def pack_documents(features: Sequence[dict], groups: Sequence[Any]) -> list[dict]:
    """Decoder-only language-model documents: the features that share a group key (e.g. the questions about
    one paragraph) joined into one sequence, scored on every token but the first.

    A document is each feature's source and target in turn, so a later feature's source should hold only
    what is new to the reader (e.g. a follow-up question about a paragraph the document has read already).
    Targets end in EOS, so a model trained on documents answers a single prompt the way a model trained on
    the features does. Documents come in order of their group's first feature.
    """
    if len(features) != len(groups):
        raise ValueError(f"{len(features)} features and {len(groups)} group keys")
    members: dict[Any, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    docs = []
    for k, idx in enumerate(members.values()):
        ids = [t for i in idx for t in (*features[i]["source_ids"], *features[i]["target_ids"])]
        docs.append({"source_ids": ids[:1], "target_ids": ids[1:], "index": k})
    return docs


def example_text(example: Any, name: str) -> str:
    value = example.get(name) if isinstance(example, dict) else getattr(example, name, None)
    if not isinstance(value, str):
        raise MuError(f"example {_field_id(example)} has no text field {name!r} (found {type(value).__name__})")
    return value


def _field_id(example: Any) -> str:
    value = example.get("id") if isinstance(example, dict) else getattr(example, "id", None)
    return repr(value) if value is not None else "(no id)"


def feature_length(feature: dict, arch: str) -> int:
    """Tokens the model processes for a feature (the key for length grouping)."""
    s, t = len(feature["source_ids"]), len(feature["target_ids"])
    return s + t if arch == "deconly" else max(s, t)


# ---------------------------------------------------------------------------------------------
# Collation


def _pad(rows: list[list[int]], value: int, multiple: int) -> Tensor:
    width = round_up(max(1, max((len(r) for r in rows), default=1)), multiple)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def _mask(rows: list[list[int]], width: int) -> Tensor:
    lengths = torch.tensor([len(r) for r in rows])
    return torch.arange(width)[None, :] < lengths[:, None]  # (B, width) True = real token


@dataclass
class Collator:
    """features -> a batch dict of tensors for `arch`, padded to the longest row (right padding).

    Besides the model inputs the batch carries counts the trainer needs: `n_loss_tokens` (target
    positions scored), `n_enc_tokens` and `n_dec_tokens` (real tokens through each stack, for FLOPs)
    and `index` (the features' dataset indices, e.g. to look up teacher outputs).
    """

    arch: str
    pad_token_id: int = 0
    bos_token_id: int = 1  # decoder start token (encoder-decoder) / start of a sourceless sequence
    pad_to_multiple_of: int = 1  # e.g. 8 for tensor cores or fewer torch.compile shapes

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise MuError(f"unknown arch {self.arch!r}; expected one of {ARCHS}")

    def __call__(self, features: Sequence[dict]) -> dict[str, Any]:
        if not features:
            raise ValueError("cannot collate an empty list of features")
        m = self.pad_to_multiple_of
        if self.arch == "encdec":
            src = [f["source_ids"] for f in features]
            tgt = [f["target_ids"] for f in features]
            dec = [[self.bos_token_id] + t[:-1] for t in tgt]
            enc_ids, dec_ids = _pad(src, self.pad_token_id, m), _pad(dec, self.pad_token_id, m)
            batch = dict(encoder_input_ids=enc_ids, decoder_input_ids=dec_ids,
                         encoder_attention_mask=_mask(src, enc_ids.shape[1]),
                         decoder_attention_mask=_mask(dec, dec_ids.shape[1]),
                         targets=_pad(tgt, IGNORE_INDEX, m),
                         n_enc_tokens=sum(map(len, src)), n_dec_tokens=sum(map(len, dec)))
        else:
            inputs, labels = [], []
            for f in features:
                s, t = f["source_ids"], f["target_ids"]
                if not s:
                    s = [self.bos_token_id]
                x = s + t
                inputs.append(x[:-1])
                labels.append([IGNORE_INDEX] * (len(s) - 1) + t)
            ids = _pad(inputs, self.pad_token_id, m)
            batch = dict(input_ids=ids, attention_mask=_mask(inputs, ids.shape[1]),
                         targets=_pad(labels, IGNORE_INDEX, m),
                         n_enc_tokens=0, n_dec_tokens=sum(map(len, inputs)))
        batch["n_loss_tokens"] = int((batch["targets"] != IGNORE_INDEX).sum())
        batch["index"] = torch.tensor([f.get("index", -1) for f in features], dtype=torch.long)
        return batch


def model_inputs(batch: dict[str, Any], arch: str) -> dict[str, Tensor]:
    """The keyword arguments of the model's forward, taken from a collated batch."""
    keys = (("encoder_input_ids", "decoder_input_ids", "encoder_attention_mask", "decoder_attention_mask")
            if arch == "encdec" else ("input_ids", "attention_mask"))
    return {k: batch[k] for k in keys}


def move_batch(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# Batching


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int = 0, epoch: int = 0,
                           shuffle: bool = True, group_batches: int = 50) -> list[list[int]]:
    """Split indices 0..n-1 into batches of `batch_size` (the last may be shorter) grouped by length.

    shuffle=True: shuffle the indices with a RNG seeded by (seed, epoch); cut them into groups of
    `group_batches * batch_size`; sort each group by length (longest first) and cut it into batches;
    shuffle the batches; then move the batch with the longest example first, so an out-of-memory error
    shows at step 1. shuffle=False (validation): all indices sorted by length, longest first.
    """
    if batch_size < 1:
        raise MuError(f"batch_size must be >= 1, got {batch_size}")
    n = len(lengths)
    if not shuffle:
        order = sorted(range(n), key=lambda i: -lengths[i])
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    rng = random.Random(f"mu-batches:{seed}:{epoch}")
    order = list(range(n))
    rng.shuffle(order)
    group = max(1, group_batches) * batch_size
    batches: list[list[int]] = []
    for g in range(0, n, group):
        chunk = sorted(order[g:g + group], key=lambda i: -lengths[i])
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    if batches:
        longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
        batches.insert(0, batches.pop(longest))
    return batches


def padding_fraction(batches: Iterable[list[int]], lengths: Sequence[int]) -> float:
    """Fraction of padded positions when every batch is padded to its longest row (1 - real / padded)."""
    real = padded = 0
    for b in batches:
        real += sum(lengths[i] for i in b)
        padded += len(b) * max(lengths[i] for i in b)
    return 1.0 - real / padded if padded else 0.0
