"""engine.detokenizer: streamed text equals the one-shot decode and never splits a character; stop strings."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.detokenizer import IncrementalDetokenizer, StopMatcher
from engine.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"


@pytest.fixture(scope="module")
def tokenizer(fixtures_dir: Path) -> Tokenizer:
    return Tokenizer.from_hf_dir(fixtures_dir / "smollm2" / "tokenizer")


@pytest.fixture(scope="module")
def tokenizer_cases(fixtures_dir: Path) -> list[dict[str, Any]]:
    return json.loads((fixtures_dir / "smollm2" / "tokenizer_cases.json").read_text(encoding="utf-8"))


def _stream(tokenizer: Tokenizer, prompt_ids: Sequence[int], ids: Sequence[int],
            skip_special_tokens: bool = True) -> list[str]:
    """Every push's text, then flush()'s."""
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip_special_tokens)
    return [detokenizer.push(i) for i in ids] + [detokenizer.flush()]


# ---- IncrementalDetokenizer -------------------------------------------------------------------------------------


def test_fixture_cases_stream_exactly(tokenizer: Tokenizer, tokenizer_cases: list[dict[str, Any]]) -> None:
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": "Say it"}], tokenize=True)
    for case in tokenizer_cases:
        chunks = _stream(tokenizer, prompt_ids, case["ids"])
        assert "".join(chunks) == case["decoded"] == tokenizer.decode(case["ids"])
        assert not any(REPLACEMENT_CHAR in chunk for chunk in chunks), (case["text"], chunks)


def test_multibyte_characters_are_held_until_complete(tokenizer: Tokenizer) -> None:
    # "👍🏽" is 8 bytes spread over byte-level tokens; nothing comes out until a whole character is there.
    ids = tokenizer.encode("ok 👍🏽 🇫🇷")
    chunks = _stream(tokenizer, [], ids)
    assert "".join(chunks) == "ok 👍🏽 🇫🇷"
    emitted = [chunk for chunk in chunks if chunk]
    assert len(emitted) < len(ids)
    assert all(REPLACEMENT_CHAR not in chunk for chunk in emitted)


def test_incomplete_tail_comes_out_at_flush(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("a😀")[:-1]  # drop the token that completes the emoji
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    assert "".join(detokenizer.push(i) for i in ids) == "a"
    assert detokenizer.flush() == tokenizer.decode(ids)[1:]
    assert detokenizer.flush() == ""


def test_special_tokens_skipped_or_kept(tokenizer: Tokenizer) -> None:
    ids = [*tokenizer.encode("Paris."), 2, 198]  # "<|im_end|>" then a newline
    assert "".join(_stream(tokenizer, [1], ids)) == "Paris.\n"
    assert "".join(_stream(tokenizer, [1], ids, skip_special_tokens=False)) == "Paris.<|im_end|>\n"


# Pieces include multi-codepoint characters (skin tone, flag, combining accent) and 4-byte ones.
_PIECES = [*"ab 1.\n", "é", "—", "日本", "😀", "👍🏽", "🇫🇷", "\u0301", "𝟙"]
_TEXT = st.lists(st.sampled_from(_PIECES), max_size=20).map("".join)


@given(text=_TEXT, prompt=_TEXT)
@settings(max_examples=200, deadline=None)
def test_stream_of_encoded_text_equals_text(tokenizer: Tokenizer, text: str, prompt: str) -> None:
    chunks = _stream(tokenizer, tokenizer.encode(prompt), tokenizer.encode(text))
    assert "".join(chunks) == text
    assert not any(REPLACEMENT_CHAR in chunk for chunk in chunks)


@given(ids=st.lists(st.integers(min_value=0, max_value=300), max_size=30), skip=st.booleans())
@settings(max_examples=300, deadline=None)
def test_stream_of_arbitrary_ids_equals_decode(tokenizer: Tokenizer, ids: list[int], skip: bool) -> None:
    # Ids 0-16 are special, most of 17-300 single bytes: invalid UTF-8 and split characters are common here.
    assert "".join(_stream(tokenizer, [1, 9690], ids, skip)) == tokenizer.decode(ids, skip_special_tokens=skip)


# ---- StopMatcher ------------------------------------------------------------------------------------------------


def _splits(text: str) -> list[list[str]]:
    """Every way to cut text into consecutive non-empty chunks (2 ** (len - 1) of them)."""
    result = []
    for cuts in itertools.product((False, True), repeat=max(len(text) - 1, 0)):
        chunks, start = [], 0
        for position, cut in enumerate(cuts, start=1):
            if cut:
                chunks.append(text[start:position])
                start = position
        result.append([*chunks, text[start:]])
    return result


def _run(stops: Sequence[str], chunks: Sequence[str]) -> tuple[str, bool, list[str]]:
    matcher = StopMatcher(stops)
    emitted, stopped = [], False
    for chunk in chunks:
        text, stopped = matcher.push(chunk)
        emitted.append(text)
        if stopped:
            break
    emitted.append(matcher.flush())
    return "".join(emitted), stopped, emitted


@pytest.mark.parametrize(("text", "stops", "expected"), [
    ("Hello ###world", ["###"], "Hello "),
    ("ababcab", ["abc"], "ab"),
    ("xab STOP", ["b", "ab"], "x"),  # the earliest-starting match wins
    ("xyz</s>tail", ["</s>", "</"], "xyz"),
    ("no stop here", ["STOP"], "no stop here"),
    ("é😀 end", ["😀"], "é"),
])
def test_stop_strings_split_every_way(text: str, stops: list[str], expected: str) -> None:
    for chunks in _splits(text):
        output, stopped, _ = _run(stops, chunks)
        assert output == expected, chunks
        assert stopped == (expected != text), chunks


def test_holds_back_only_a_possible_stop_prefix() -> None:
    matcher = StopMatcher(["abab"])
    assert matcher.push("xaba") == ("x", False)  # "aba" may still become "abab"
    assert matcher.push("c") == ("abac", False)  # it did not
    assert matcher.push("ab") == ("", False)
    assert matcher.flush() == "ab"


def test_text_after_a_stop_is_dropped() -> None:
    matcher = StopMatcher(["\n\n"])
    assert matcher.push("one\n") == ("one", False)
    assert matcher.push("\ntwo") == ("", True)
    assert matcher.push("three") == ("", True)
    assert matcher.flush() == ""


def test_no_stops_pass_everything_through() -> None:
    matcher = StopMatcher([])
    assert matcher.push("anything") == ("anything", False)
    assert matcher.flush() == ""


def test_empty_stop_string_is_rejected() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        StopMatcher(["ok", ""])


@given(text=st.text(alphabet="ab\n", max_size=14), stops=st.lists(st.text(alphabet="ab\n", min_size=1, max_size=3),
                                                                   max_size=3), data=st.data())
@settings(max_examples=300, deadline=None)
def test_stop_matcher_equals_reference(text: str, stops: list[str], data: st.DataObject) -> None:
    cuts = sorted(data.draw(st.sets(st.integers(min_value=1, max_value=max(len(text) - 1, 1)))))
    chunks = [text[a:b] for a, b in itertools.pairwise([0, *cuts, len(text)]) if a < b]
    # Reference: generation stops after the first chunk whose arrival completes any stop string; the output is the
    # text seen so far, cut where the earliest-starting stop string in it begins.
    expected, expected_stopped = text, False
    for end in itertools.accumulate(len(c) for c in chunks):
        found = [i for i in (text[:end].find(s) for s in stops) if i >= 0]
        if found:
            expected, expected_stopped = text[:min(found)], True
            break
    output, stopped, _ = _run(stops, chunks)
    assert (output, stopped) == (expected, expected_stopped)
