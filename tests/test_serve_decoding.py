"""Decoding for the server: streamed text adds up to the answer, and rows that join a running
batch get exactly the answer they would get alone."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines import prompts
from pipelines.config import TinyModelConfig
from pipelines.generation import BatchDecoder, Sampling, TextStream, generate
from pipelines.models import build_tiny_model, train_tokenizer

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



def test_rows_joining_a_running_batch_decode_as_if_alone(tokenizer):
    from peft import LoraConfig, get_peft_model

    tiny = TinyModelConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, vocab_size=416, max_position_embeddings=256)
    torch.manual_seed(0)
    model = get_peft_model(build_tiny_model(tiny, tokenizer), LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"))
    model.eval()
    model.config.use_cache = True
    texts = ["No acute findings.", "Stable nodule", "é", "IMPRESSION: Stable nodule. No acute findings. END", "x"]
    ids = [prompts.prompt_ids(tokenizer, [{"role": "user", "content": t}]) for t in texts]
    settings_ = [Sampling(12), Sampling(30, stop=["nodule"]), Sampling(20, temperature=0.9, top_p=0.9, seed=3),
                 Sampling(7), Sampling(25, temperature=0.7, seed=1)]
    names = ["default", "__base__", "default", "__base__", "default"]  # the adapter, or none, per row
    alone = [generate(model, tokenizer, [i], [s], [n])[0] for i, s, n in zip(ids, settings_, names)]

    decoder, streamed = BatchDecoder(model, tokenizer), {}

    def keep(deltas):
        for row, delta in deltas.items():
            streamed[row] = streamed.get(row, "") + delta.text

    keep(decoder.add(ids[:2], settings_[:2], names[:2]))
    for _ in range(3):
        keep(decoder.step())
    keep(decoder.add(ids[2:3], settings_[2:3], names[2:3]))
    for _ in range(5):
        keep(decoder.step())
    keep(decoder.add(ids[3:], settings_[3:], names[3:]))
    while not decoder.done:
        keep(decoder.step())
    together = decoder.results()
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [streamed[i] for i in range(len(ids))] == [r.text for r in together]
