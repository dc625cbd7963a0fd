"""Incremental detokenization and stop-string hold-back for streaming.

Two small stages, applied to every sampled token of a request in this order:

1. `IncrementalDetokenizer` turns token ids into text, vLLM/TGI style: it decodes a short window
   of ids (`prefix_offset:`) and emits only what the newest tokens added past the already-emitted
   part (`prefix_offset:read_offset`). Decoding a window rather than single tokens keeps the
   tokenizer's context-dependent rules right (SentencePiece leading spaces, byte-level BPE where one
   character spans several tokens), and text that ends in U+FFFD (an incomplete UTF-8 character)
   is held until the next tokens complete it.
2. `StopStringBuffer` releases that text, holding back any tail that could still grow into a stop
   string, and truncates the output right before the first stop string found.

Invariant: the concatenation of everything both stages released equals the final output text.
When generation ends in the middle of a multi-byte character, those trailing bytes are dropped
(they are not text), as vLLM does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# How many prompt tokens the first decode window reaches back (as in vLLM), so that the first
# generated token is decoded in context (e.g. keeps its leading space).
PREFIX_WINDOW = 5
REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Streams the text of generated tokens; never emits text ending in half a character.

    `tokenizer` is any Hugging Face tokenizer (only `decode` is used). Special tokens are skipped
    unless skip_special_tokens is False; the caller does not feed the EOS token that ends a request.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prompt_ids)  # prompt + generated ids
        # ids[prefix_offset:read_offset] decodes to text already emitted (context for the window);
        # ids[read_offset:] are tokens whose text has not been emitted yet.
        self.read_offset = len(self._ids)
        self.prefix_offset = max(self.read_offset - PREFIX_WINDOW, 0)

    def _decode(self, ids: Sequence[int]) -> str:
        return str(
            self._tokenizer.decode(ids, skip_special_tokens=self._skip, clean_up_tokenization_spaces=False)
        )

    def add_token(self, token_id: int) -> str:
        """Append one token; return the text it completes (possibly "")."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self._ids[self.prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""  # nothing new yet, or a character still waits for its remaining bytes
        self.prefix_offset = self.read_offset
        self.read_offset = len(self._ids)
        return new_text[len(prefix_text) :]


class StopStringBuffer:
    """Releases streamed text, holding back what could be the start of a stop string.

    `push` returns the text that is safe to emit; once a stop string appears, `stopped` is set,
    `text` ends right before it (right after it with include_stop) and nothing more is released.
    `flush` releases the held-back tail when generation ends for another reason (it was not a stop
    string after all).
    """

    def __init__(self, stop: Sequence[str], include_stop: bool = False) -> None:
        self._stop = tuple(s for s in stop if s)
        self._include = include_stop
        self._buffer = ""  # everything pushed so far (until a stop string is found)
        self._released = 0  # len(self._buffer[:released]) went out; the rest is held back
        self.stopped = False

    @property
    def text(self) -> str:
        """The output released so far."""
        return self._buffer[: self._released]

    def push(self, text: str) -> str:
        if self.stopped or not text:
            return ""
        start_search = self._released  # text before this was checked when it was released
        self._buffer += text
        found = self._find_stop(start_search)
        if found is not None:
            self.stopped = True
            at, length = found
            end = at + length if self._include else at
            self._buffer = self._buffer[:end]
            return self._release(end)
        return self._release(len(self._buffer) - self._held_suffix_len())

    def flush(self) -> str:
        return "" if self.stopped else self._release(len(self._buffer))

    def _release(self, end: int) -> str:
        end = max(end, self._released)
        out = self._buffer[self._released : end]
        self._released = end
        return out

    def _find_stop(self, start: int) -> tuple[int, int] | None:
        """(index, length) of the earliest stop string that begins at or after `start`, if any
        (at one index, the first listed).

        Released text was not a prefix of any stop string, so no stop can begin before `start`.
        """
        hits = [(i, len(s)) for s in self._stop if (i := self._buffer.find(s, start)) >= 0]
        return min(hits, key=lambda hit: hit[0]) if hits else None

    def _held_suffix_len(self) -> int:
        """Length of the longest suffix of the buffer that is a proper prefix of a stop string."""
        longest = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self._buffer)), longest, -1):
                if self._buffer.endswith(s[:n]):
                    longest = n
                    break
        return longest
