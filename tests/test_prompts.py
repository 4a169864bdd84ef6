"""One prompt format for training and serving: the served prompt is the trained prompt, token for token."""

from __future__ import annotations

import pytest

from pipelines import prompts
from pipelines.models import train_tokenizer

RECORD = {"id": "rep-42", "exam_code": "CTCHWO", "findings": "A 3.2 cm nodule in the right upper lobe. No effusion.",
          "impression": "3.2 cm right upper lobe nodule."}


@pytest.fixture(scope="module", params=["llama3", "med42", "alpaca"])
def tokenizer(request):
    texts = [RECORD["findings"], RECORD["impression"], *prompts.INSTRUCTIONS, prompts.SYSTEM_PROMPT] * 20
    return train_tokenizer(texts, 600, request.param), request.param


def test_training_prompt_equals_serving_prompt(tokenizer):
    tok, fmt = tokenizer
    messages, response = prompts.impression_example(RECORD, lead_in_probability=0.0)
    example = prompts.supervised_example(tok, messages, response, fmt)
    n_prompt = example["labels"].index(next(x for x in example["labels"] if x != -100))
    instruction = messages[1]["content"].split("\n\n")[0]
    served = prompts.prompt_ids(tok, prompts.impression_messages(RECORD["findings"], RECORD["exam_code"], instruction))
    assert example["input_ids"][:n_prompt] == served
    # The answer is trained to end with the format's end-of-turn token, on which serving stops.
    assert example["input_ids"][-1] in prompts.stop_token_ids(tok, fmt)
    assert example["labels"][n_prompt:] == example["input_ids"][n_prompt:]


def test_choices_are_fixed_by_the_record_id():
    first = prompts.impression_example(RECORD, 0.5)
    assert prompts.impression_example(dict(RECORD), 0.5) == first
    chosen = {prompts.impression_example({**RECORD, "id": f"r{i}"}, 0.0)[0][1]["content"].split("\n\n")[0]
              for i in range(400)}
    assert chosen == set(prompts.INSTRUCTIONS)
    leads = sum(prompts.impression_example({**RECORD, "id": f"r{i}"}, 0.3)[1] != RECORD["impression"]
                for i in range(2000))
    assert 0.25 < leads / 2000 < 0.35


def test_twenty_phrasings_and_ten_lead_ins():
    assert len(set(prompts.INSTRUCTIONS)) == 20 and len(set(prompts.LEAD_INS)) == 10
