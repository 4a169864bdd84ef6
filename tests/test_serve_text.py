"""Streamed answers: what the server releases token by token adds up to the final answer."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.generation import TextStream
from pipelines.models import train_tokenizer

WORDS = ["No", " acute", " findings", ".", " Stable", " nodule", "\n", "  ", "é", "🙂", "IMPRESSION:", " END"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["".join(WORDS) * 3, "No acute findings. Stable nodule."] * 20, 400, "llama3")


def test_released_text_adds_up_to_the_answer(tokenizer):
    @settings(max_examples=80, deadline=None)
    @given(st.lists(st.sampled_from(WORDS), max_size=12),
           st.lists(st.sampled_from(["END", " nod", ".", "\n\n", "🙂", "zzz"]), max_size=2))
    def check(words, stops):
        ids = tokenizer("".join(words), add_special_tokens=False)["input_ids"]
        stream, released, stopped = TextStream(tokenizer, stops), "", False
        for token in ids:
            stopped = stream.push(token)
            if stopped:
                break
            piece = stream.release()
            assert (released + piece) == stream.sent  # released text is never taken back
            released += piece
        released += stream.finish()
        assert released == stream.final_text()
        for stop in stops:
            assert stop not in released
        if stopped:
            assert any(s in tokenizer.decode(stream.token_ids) for s in stops)

    check()


def test_a_stop_string_split_across_tokens_is_never_released(tokenizer):
    stream = TextStream(tokenizer, ["IMPRESSION:"])
    released = ""
    for token in tokenizer("Stable nodule IMPRESSION: more", add_special_tokens=False)["input_ids"]:
        if stream.push(token):
            break
        released += stream.release()
    assert "IMPR" not in released and (released + stream.finish()) == "Stable nodule"

