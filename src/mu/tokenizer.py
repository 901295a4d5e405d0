"""Tokenizers: any Hugging Face tokenizer directory, the paper's Phi-3.5 conventions, and built-ins.

Every tokenizer mu hands out is a `transformers` fast tokenizer with these ids
agreed with `MuConfig` defaults: pad 0, decoder start / BOS 1, and an EOS token.
The built-ins need no download: `byte_tokenizer()` (256 bytes + 4 specials) and
`train_tokenizer(texts, vocab_size)` (byte-level BPE trained with `tokenizers`),
saved next to the model by `save_pretrained`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from mu.errors import MuError

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3: pad, BOS/decoder start, EOS, unknown
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


def _wrap(tok_object):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok_object, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", padding_side="right",
                                   clean_up_tokenization_spaces=False)


def _byte_level_parts(tokenizer) -> None:
    from tokenizers import decoders, pre_tokenizers

    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()


def byte_tokenizer():
    """A byte-level tokenizer: 4 special tokens then one token per byte (260 ids); needs no training."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(alphabet)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    _byte_level_parts(tok)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return _wrap(tok)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096):
    """Train a byte-level BPE tokenizer on `texts` (deterministic for the same texts and size)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    _byte_level_parts(tok)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return _wrap(tok)


def is_phi3_style(tok) -> bool:
    """The paper's tokenizer (Phi-3.5): <unk> at 0, <s> at 1, and an <|endoftext|> token."""
    vocab = tok.get_vocab()
    return vocab.get("<unk>") == 0 and vocab.get("<s>") == 1 and "<|endoftext|>" in vocab


def apply_paper_conventions(tok):
    """Decoder start = BOS id 1, pad = unk id 0, right padding, EOS <|endoftext|> (as the paper's code)."""
    tok.padding_side = "right"
    tok.bos_token = tok.convert_ids_to_tokens(1)
    tok.pad_token = tok.unk_token
    tok.eos_token = "<|endoftext|>"
    return tok


def load_tokenizer(path: str | os.PathLike):
    """Load a Hugging Face tokenizer from a local directory (no network); apply the paper's conventions
    to a Phi-3.5-style vocabulary; make sure a pad token exists."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = Path(path)
    if not path.is_dir():
        what = "is a file, not a directory" if path.exists() else "does not exist"
        raise MuError(f"tokenizer directory {str(path)!r} {what}")
    if not has_tokenizer_files(path) and not any(path.glob("*.model")):
        raise MuError(f"{path}: no tokenizer files (expected tokenizer.json or tokenizer_config.json, as "
                      f"`save_pretrained` writes them)")
    # A mu model directory's config.json (model_type "mu") is unknown to transformers, which would warn about it.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises many types for unreadable folders
        text = " ".join(str(e).split())
        if "custom code" in text or "trust_remote_code" in text:
            raise MuError(f"{path}: the tokenizer asks to run code from the directory (auto_map), which mu never "
                          f"does; save it as a plain tokenizer.json") from None
        raise MuError(f"could not load a tokenizer from {str(path)!r}: {text[:300]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if is_phi3_style(tok):
        return apply_paper_conventions(tok)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def has_tokenizer_files(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()
