"""Incremental detokenization and stop-string hold-back, on real (tiny) tokenizers."""

from __future__ import annotations

import random
import string
from pathlib import Path
from typing import Any

import pytest
from transformers import PreTrainedTokenizerFast

from moe_build.checkpoint import train_tokenizer
from moe_core.detokenize import IncrementalDetokenizer, StopStringBuffer

UNICODE_TEXT = "naïve café — 世界 🙂 ok"


def _sentencepiece_style_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama/Mixtral-style tokenizer: "▁" for spaces, byte fallback (<0xE4>) for rare characters."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for token in [f"<0x{b:02X}>" for b in range(256)] + ["▁", *string.ascii_letters, "▁ok", "ve"]:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("v", "e")], unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module", params=["byte_level_bpe", "sentencepiece_style"])
def tokenizer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    if request.param == "byte_level_bpe":
        out = Path(tmp_path_factory.mktemp("tokenizer"))
        return train_tokenizer(out, vocab_size=1024, max_bytes=300_000, progress=False)
    return _sentencepiece_style_tokenizer()


def _stream(tokenizer: Any, prompt_ids: list[int], ids: list[int]) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
    return [detokenizer.add_token(i) for i in ids]


def test_multibyte_characters_stream_without_replacement_chars(tokenizer: Any) -> None:
    ids = tokenizer(UNICODE_TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(UNICODE_TEXT.split()), "the test needs characters that span several tokens"
    pieces = _stream(tokenizer, [], ids)
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(pieces) == tokenizer.decode(ids) == UNICODE_TEXT
    assert "" in pieces  # some token completed no character on its own (held, then released)


def test_stream_after_a_prompt_keeps_context(tokenizer: Any) -> None:
    """The first generated token is decoded in the prompt's context (leading space kept)."""
    prompt_ids = tokenizer("Hello", add_special_tokens=False)["input_ids"]
    ids = tokenizer("Hello " + UNICODE_TEXT, add_special_tokens=False)["input_ids"][len(prompt_ids) :]
    pieces = _stream(tokenizer, prompt_ids, ids)
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(pieces) == " " + UNICODE_TEXT


def test_incomplete_trailing_character_is_not_emitted(tokenizer: Any) -> None:
    ids = tokenizer("ok 🙂", add_special_tokens=False)["input_ids"]
    pieces = _stream(tokenizer, [], ids[:-1])  # the last byte of the emoji never comes
    assert "".join(pieces) == "ok "


# -------------------------------------------------------------------------- stop-string hold-back


def _push_all(buffer: StopStringBuffer, pieces: list[str]) -> list[str]:
    return [buffer.push(piece) for piece in pieces]


def test_stop_string_split_across_pieces_is_held_and_cut() -> None:
    buffer = StopStringBuffer(["STOP"])
    out = _push_all(buffer, ["abc S", "T", "O", "P and more"])
    assert out == ["abc ", "", "", ""]
    assert buffer.stopped and buffer.text == "abc "
    assert buffer.push("later") == "" and buffer.flush() == ""


def test_prefix_that_is_not_a_stop_string_is_released() -> None:
    buffer = StopStringBuffer(["STOP"])
    out = _push_all(buffer, ["x ST", "AR", "S", "!"])
    assert out == ["x ", "STAR", "", "S!"]  # "S" could start "STOP" again: held until "!" comes
    assert not buffer.stopped


def test_held_prefix_is_flushed_when_generation_ends_otherwise() -> None:
    buffer = StopStringBuffer(["\n\n"])
    out = _push_all(buffer, ["line\n"])
    assert out == ["line"]
    assert buffer.flush() == "\n"
    assert buffer.text == "line\n"


def test_earliest_stop_string_wins_and_text_before_it_is_exact() -> None:
    buffer = StopStringBuffer(["world", "lo w"])
    out = _push_all(buffer, ["hel", "lo world!"])
    assert "".join(out) == buffer.text == "hel"
    assert buffer.stopped


def test_overlapping_stop_prefixes() -> None:
    """ "aab" must still be found after a held "aa" whose second "a" restarts the match."""
    buffer = StopStringBuffer(["aab"])
    out = _push_all(buffer, ["a", "a", "a", "b", "c"])
    assert "".join(out) == buffer.text == "a"
    assert buffer.stopped


def test_no_stop_strings_releases_everything() -> None:
    buffer = StopStringBuffer([])
    assert _push_all(buffer, ["a", "", "bc"]) == ["a", "", "bc"]
    assert buffer.flush() == ""


def test_random_streams_release_what_a_search_of_the_text_so_far_finds() -> None:
    """Against the definition, on random pieces: generation stops at the first piece after which
    the text so far holds a stop string, cut before the earliest one found (after it with
    include_stop; at one index, the first listed); released text with the flush is that, or all
    of it. At every push what is released is a prefix of that, and what is held back could still
    begin a stop string."""
    rng = random.Random(7)
    alphabet = "ab<|>e]^-\\"  # regex-special characters too: the fast path's character class
    for _ in range(2000):
        stops = ["".join(rng.choices(alphabet, k=rng.randint(1, 5))) for _ in range(rng.randint(1, 3))]
        include = rng.random() < 0.5
        pieces = ["".join(rng.choices(alphabet, k=rng.randint(0, 4))) for _ in range(rng.randint(1, 12))]
        expected, stopped = "", False
        for piece in pieces:
            expected += piece
            hits = [(i, k, len(s)) for k, s in enumerate(stops) if (i := expected.find(s)) >= 0]
            if hits:
                at, _, length = min(hits)
                expected, stopped = expected[: at + length if include else at], True
                break
        buffer = StopStringBuffer(stops, include_stop=include)
        out, seen = "", ""
        for piece in pieces:
            out += buffer.push(piece)
            seen += piece
            assert expected.startswith(out), (stops, pieces)
            if buffer.stopped:
                break
            held = seen[len(out) :]
            assert held == "" or any(s.startswith(held) and s != held for s in stops), (stops, pieces)
        out += buffer.flush()
        assert out == expected and buffer.text == expected, (stops, include, pieces)
        assert buffer.stopped == stopped
