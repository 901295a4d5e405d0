"""Incremental detokenization with stop strings: token ids in, text deltas that are safe to send out.

Decoding one token at a time breaks multi-byte characters (a byte-level token can hold half a UTF-8
character) and loses SentencePiece's leading spaces, so each step decodes a short window that starts
a token or more back and emits only what it adds (the scheme of vLLM's incremental detokenizer).
Text that could be the start of a stop string is held back until it is known not to be one, so a
stream never shows a stop string that the final text leaves out.
"""

from __future__ import annotations

from typing import Sequence


class TextStream:
    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far (cut at a stop string once one is found)
        self.stopped = False  # a stop string was found
        self._prefix = 0  # decoding window: ids[_prefix:_read] was already turned into text
        self._read = 0
        self._sent = 0  # characters of `text` already handed out

    def add(self, token_id: int) -> str:
        """Append one generated token; return the new text that may be sent now ("" once stopped)."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
        after = decode(self.ids[self._prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):  # no half character at the end
            start = len(self.text)
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
            if self.stop:
                self._find_stop(start)
        return self._take(final=self.stopped)

    def finish(self) -> str:
        """The text still held back (the generation ended without completing a stop string), including a
        trailing incomplete character, which decodes as the tokenizer decodes it (U+FFFD)."""
        if not self.stopped and self._read < len(self.ids):
            decode = self.tokenizer.decode
            before = decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
            after = decode(self.ids[self._prefix:], skip_special_tokens=True)
            start = len(self.text)
            self.text += after[len(before):]
            self._read = len(self.ids)
            if self.stop:
                self._find_stop(start)
        return self._take(final=True)

    def _find_stop(self, start: int) -> None:
        longest = max(len(s) for s in self.stop)
        window = max(0, start - longest + 1)
        hits = [i for i in (self.text.find(s, window) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True

    def _take(self, final: bool) -> str:
        end = len(self.text)
        if not final and self.stop:  # hold back a tail that may grow into a stop string
            end -= max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        end = max(end, self._sent)
        delta = self.text[self._sent:end]
        self._sent = end
        return delta
