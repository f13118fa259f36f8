"""Streaming text out of generated ids: incremental detokenization and stop-string matching.

Owns per-request text state only; it never samples, never touches the model, and never emits half a UTF-8 character.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

# What tokenizers' byte-level decoder writes for bytes that do not (yet) form a UTF-8 character.
_REPLACEMENT_CHAR = "\ufffd"

# Prompt tokens kept as decoding context: enough for any decoder that looks at the previous token (e.g. a
# SentencePiece leading space), few enough that each push decodes a short slice.
_NUM_CONTEXT_TOKENS = 5


class _Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...


class IncrementalDetokenizer:
    """Turns one request's generated ids into text, one id at a time.

    Two offsets into `ids` (prompt + generated so far): text up to `read_offset` has been emitted; decoding starts at
    `prefix_offset` so the slice has left context. Each push decodes ids[prefix_offset:] and emits what it adds to
    ids[prefix_offset:read_offset], unless that ends in U+FFFD: then the last character is still incomplete (its
    remaining bytes come in later tokens) and everything is held until it completes. flush() emits what is left.
    Engine thread only.
    """

    def __init__(self, tokenizer: _Decoder, prompt_ids: Sequence[int], skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids = list(prompt_ids)
        self._read_offset = len(self._ids)
        self._prefix_offset = max(self._read_offset - _NUM_CONTEXT_TOKENS, 0)
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completes (often "", or several characters at once)."""
        self._ids.append(token_id)
        text = self._decode(self._prefix_offset, len(self._ids))
        if text.endswith(_REPLACEMENT_CHAR) or len(text) <= len(self._prefix_text):
            return ""
        return self._advance(text)

    def flush(self) -> str:
        """The held-back tail at the end of generation (an incomplete character comes out as U+FFFD)."""
        text = self._decode(self._prefix_offset, len(self._ids))
        return self._advance(text) if len(text) > len(self._prefix_text) else ""

    def _advance(self, text: str) -> str:
        new_text = text[len(self._prefix_text):]
        # The emitted slice becomes the next context; it ends on a whole character, so later decodes extend it.
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
        return new_text

    def _decode(self, start: int, stop: int) -> str:
        return self._tokenizer.decode(self._ids[start:stop], skip_special_tokens=self._skip_special_tokens)


class StopMatcher:
    """Cuts a text stream at the first stop string, even when it arrives split across pushes.

    Emits nothing of the stop string or after it. Holds back only the longest tail that is still the beginning of some
    stop string; everything before it is emitted at once. After a stop every push returns ("", True).
    """

    def __init__(self, stop: Sequence[str]) -> None:
        if any(not s for s in stop):
            raise ValueError(f"stop strings must be non-empty, got {list(stop)!r}")
        self._stops = tuple(dict.fromkeys(stop))
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit now, whether a stop string was found)."""
        if self.stopped:
            return "", True
        buffer = self._held + text
        # The held tail contains no whole stop string, so the earliest match anywhere in the buffer is the first one.
        matches = [i for i in (buffer.find(s) for s in self._stops) if i >= 0]
        if matches:
            self.stopped = True
            self._held = ""
            return buffer[:min(matches)], True
        num_held = self._num_partial_suffix(buffer)
        self._held = buffer[len(buffer) - num_held:]
        return buffer[:len(buffer) - num_held], False

    def flush(self) -> str:
        """At the end of generation, the held tail was not a stop string after all."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _num_partial_suffix(self, buffer: str) -> int:
        """Length of the longest proper suffix of buffer that some stop string starts with."""
        longest = max((len(s) for s in self._stops), default=1) - 1
        for size in range(min(longest, len(buffer)), 0, -1):
            tail = buffer[len(buffer) - size:]
            if any(s.startswith(tail) for s in self._stops):
                return size
        return 0
