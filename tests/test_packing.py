"""Packing: rows are filled tightly, nothing is lost, and packed examples never see each other."""

from __future__ import annotations

import random

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.config import TinyModelConfig
from pipelines.models import build_tiny_model, train_tokenizer
from pipelines.packing import IGNORE, best_fit_decreasing, pack_examples
from pipelines.train_loop import packed_loss


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=80), st.integers(64, 200))
def test_bins_hold_every_example_once_within_capacity(lengths, capacity):
    bins = best_fit_decreasing(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    # An any-fit packer opens a bin only for an item no open bin can take, so no two bins could be
    # merged (a bound from total / capacity would be wrong: it is only a lower bound of OPT).
    loads = [sum(lengths[i] for i in b) for b in bins]
    assert all(a + b > capacity for i, a in enumerate(loads) for b in loads[i + 1:])


def test_rows_have_fixed_length_restarting_positions_and_masked_first_labels():
    ids = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    labels = [[-100, 2, 3], [4, 5], [6, 7, 8, 9]]
    rows = pack_examples(ids, labels, length=6, pad_id=0)
    assert all(len(r) == 6 for r in rows["input_ids"])
    assert sum(rows["num_tokens"]) == 9 and sorted(sum(rows["seq_lens"], [])) == [2, 3, 4]
    for row_ids, row_labels, row_pos, lens in zip(rows["input_ids"], rows["labels"], rows["position_ids"],
                                                  rows["seq_lens"]):
        start = 0
        for n in lens:
            assert row_pos[start:start + n] == list(range(n))
            assert row_labels[start] == IGNORE  # never predict a neighbour's first token
            start += n
        assert all(lab == IGNORE for lab in row_labels[start:])


def _tiny():
    texts = ["the lungs are clear and there is no effusion", "a 3.2 cm nodule in the right upper lobe"] * 50
    tok = train_tokenizer(texts, 512, "llama3")
    cfg = TinyModelConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=1, vocab_size=512)
    model = build_tiny_model(cfg, tok)
    model.eval()
    return tok, model


def test_packed_logits_equal_logits_alone():
    tok, model = _tiny()
    rng = random.Random(0)
    examples = [[rng.randrange(10, 500) for _ in range(n)] for n in (7, 12, 5, 9)]
    rows = pack_examples(examples, examples, length=40, pad_id=tok.pad_token_id)
    assert len(rows["input_ids"]) == 1
    packed = model(input_ids=torch.tensor(rows["input_ids"]), position_ids=torch.tensor(rows["position_ids"]),
                   use_cache=False).logits[0]
    order = best_fit_decreasing([len(e) for e in examples], 40)[0]
    start = 0
    for i in order:
        alone = model(input_ids=torch.tensor([examples[i]]), use_cache=False).logits[0]
        diff = (packed[start:start + len(examples[i])] - alone).abs().max().item()
        assert diff < 1e-4, f"example {i} leaks across the packed row (max |diff| {diff})"
        start += len(examples[i])


def test_a_kv_cache_would_leak_which_is_why_training_turns_it_off():
    tok, model = _tiny()
    examples = [[11, 12, 13, 14, 15], [21, 22, 23, 24]]
    rows = pack_examples(examples, examples, length=9, pad_id=tok.pad_token_id)
    ids, pos = torch.tensor(rows["input_ids"]), torch.tensor(rows["position_ids"])
    isolated = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    leaky = model(input_ids=ids, position_ids=pos, use_cache=True).logits
    assert (isolated - leaky).abs().max().item() > 1e-3


def test_packed_loss_equals_mean_loss_over_the_same_tokens():
    tok, model = _tiny()
    examples = [[11, 12, 13, 14, 15, 16], [21, 22, 23, 24]]
    labels = [[-100, -100, 13, 14, 15, 16], [-100, 22, 23, 24]]
    rows = pack_examples(examples, labels, length=12, pad_id=tok.pad_token_id)
    batch = {k: torch.tensor(rows[k]) for k in ("input_ids", "labels", "position_ids")}
    loss, n = packed_loss(model, batch)
    total, count = 0.0, 0
    for ex, lab in zip(examples, labels):
        logits = model(input_ids=torch.tensor([ex]), use_cache=False).logits[0, :-1]
        target = torch.tensor(lab[1:])
        total += torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum").item()
        count += int((target != -100).sum())
    assert n == count
    assert abs(loss.item() - total / count) < 1e-4
