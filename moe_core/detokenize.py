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

import re
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

    Invariant: `_held` (shorter than the longest stop string) is all that is not released yet; text
    released before it began no stop string, so a push searches only `_held` + the new text. This
    runs on every token of every request with stop strings (a chat template's end-of-turn marker
    makes that most chat requests): a push costs the same whatever the output's length so far.
    Most pushes take the fast path: with nothing held, text holding no stop string's first
    character can neither contain a stop string nor end in the start of one, so it is released
    after one scan in C (one regex character class) and no Python loop.
    """

    def __init__(self, stop: Sequence[str], include_stop: bool = False) -> None:
        self._stop = tuple(s for s in stop if s)
        self._include = include_stop
        self._firsts = frozenset(s[0] for s in self._stop)
        # finds any stop string's first character; None when there is no stop string at all
        self._first_at = (
            re.compile("[" + "".join(map(re.escape, sorted(self._firsts))) + "]").search
            if self._firsts
            else None
        )
        self._reach = max((len(s) for s in self._stop), default=1) - 1  # the longest tail held back
        self._released: list[str] = []  # every piece released, in order
        self._held = ""
        self.stopped = False

    @property
    def text(self) -> str:
        """The output released so far."""
        return "".join(self._released)

    def push(self, text: str) -> str:
        if self.stopped or not text:
            return ""
        if not self._held and (self._first_at is None or self._first_at(text) is None):
            self._released.append(text)  # the fast path (see the class docstring)
            return text
        pending = self._held + text
        found = self._find_stop(pending)
        if found is not None:
            self.stopped = True
            at, length = found
            self._held = ""
            return self._release(pending[: at + length if self._include else at])
        keep = self._held_suffix_len(pending)
        self._held = pending[len(pending) - keep :] if keep else ""
        return self._release(pending[: len(pending) - keep])

    def flush(self) -> str:
        if self.stopped:
            return ""
        out, self._held = self._held, ""
        return self._release(out)

    def _release(self, out: str) -> str:
        if out:
            self._released.append(out)
        return out

    def _find_stop(self, pending: str) -> tuple[int, int] | None:
        """(index, length) of the earliest stop string in `pending`, if any (at one index, the
        first listed)."""
        hits = [(i, len(s)) for s in self._stop if (i := pending.find(s)) >= 0]
        return min(hits, key=lambda hit: hit[0]) if hits else None

    def _held_suffix_len(self, pending: str) -> int:
        """Length of the longest suffix of `pending` that is a proper prefix of a stop string."""
        tail = pending[-self._reach :] if self._reach else ""
        if not any(c in tail for c in self._firsts):
            return 0
        longest = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(pending)), longest, -1):
                if pending.endswith(s[:n]):
                    longest = n
                    break
        return longest
