"""The one prompt format: records -> chat messages -> token ids, for training AND serving.

Training encodes `prompt_ids(...) + response_ids(...)`; the server and the evaluation job call
`prompt_ids(...)` with the same messages, so a model is served with exactly the prompt it was
trained on. The chat formats are Jinja templates installed on the tokenizer, so any tool that
calls `apply_chat_template` (transformers, vLLM) renders the same text.
"""

from __future__ import annotations

import hashlib
from typing import Any

# Twenty ways to ask for an impression. One is picked per record from its id, so the choice is
# varied across the corpus but identical on every rerun.
INSTRUCTIONS = [
    "Write the impression section for this radiology report.",
    "Summarize the findings below into a radiology impression.",
    "You are a radiologist. Give the impression for these findings.",
    "Based on the findings, state the impression.",
    "Produce a concise impression from the following radiology findings.",
    "Read the findings and write what the radiologist would conclude.",
    "Condense these imaging findings into the report's impression.",
    "What is the impression for this study, given its findings?",
    "Draft the final impression of this report from its findings.",
    "Turn the findings of this examination into a short impression.",
    "Give the key conclusions of this imaging report.",
    "Provide the radiology impression that follows from these findings.",
    "State the clinically important conclusions of these findings.",
    "Write a brief impression summarizing the significant findings.",
    "As the reading radiologist, summarize this exam in an impression.",
    "From the findings below, write the impression a radiologist would sign.",
    "Derive the impression section from the findings section.",
    "Summarize this report's findings for the referring clinician.",
    "List the main conclusions of this examination.",
    "Create the impression for the imaging findings provided.",
]

# Ten openers that real impressions sometimes start with; prefixed with the recipe's probability.
LEAD_INS = [
    "Impression:",
    "IMPRESSION:",
    "Conclusion:",
    "In summary,",
    "Overall,",
    "Summary:",
    "Assessment:",
    "Final impression:",
    "Key findings:",
    "Radiologic impression:",
]

SYSTEM_PROMPT = "You are a careful radiology assistant. Answer with the impression only."

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
START_HEADER, END_HEADER, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
MED42_ROLES = {"system": "<|system|>", "user": "<|prompter|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = [BOS, EOS, PAD, START_HEADER, END_HEADER, EOT, *MED42_ROLES.values()]

# Jinja chat templates; `messages` holds dicts with role and content.
CHAT_TEMPLATES = {
    "llama3": (
        "{{ bos_token }}{% for m in messages %}"
        "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>"
        "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    "med42": (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] == 'system' %}<|system|>{% elif m['role'] == 'user' %}<|prompter|>"
        "{% else %}<|assistant|>{% endif %}: {{ m['content'] | trim }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>: {% endif %}"
    ),
    "alpaca": (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ m['content'] | trim }}{{ '\\n\\n' }}"
        "{% elif m['role'] == 'user' %}### Instruction:\n{{ m['content'] | trim }}{{ '\\n\\n' }}"
        "{% else %}### Response:\n{{ m['content'] | trim }}{{ eos_token }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}### Response:\n{% endif %}"
    ),
}

# The token that closes an assistant turn in each format: training appends it to every
# response, and generation stops on it.
END_OF_TURN = {"llama3": EOT, "med42": EOS, "alpaca": EOS}


def stable_fraction(key: str, salt: str = "") -> float:
    """A number in [0, 1) fixed by `key`: the same on every machine and run (unlike `hash()`)."""
    digest = hashlib.blake2b(f"{salt}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def impression_messages(findings: str, exam_code: str | None = None, instruction: str | None = None,
                        ) -> list[dict[str, str]]:
    """Chat messages asking for the impression of one report."""
    instruction = instruction or INSTRUCTIONS[0]
    exam = f"Exam: {exam_code}\n" if exam_code else ""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": f"{instruction}\n\n{exam}Findings: {findings}"},
    ]


def impression_example(record: dict[str, Any], lead_in_probability: float) -> tuple[list[dict], str]:
    """The training pair for a record: messages (phrasing picked by its id) and the response."""
    rid = str(record["id"])
    instruction = INSTRUCTIONS[int(stable_fraction(rid, "instruction") * len(INSTRUCTIONS))]
    response = record["impression"].strip()
    if stable_fraction(rid, "lead-in?") < lead_in_probability:
        response = f"{LEAD_INS[int(stable_fraction(rid, 'lead-in') * len(LEAD_INS))]} {response}"
    return impression_messages(record["findings"], record.get("exam_code"), instruction), response


def instruct_messages(instruction: str, input_text: str | None = None) -> list[dict[str, str]]:
    content = f"{instruction.strip()}\n\n{input_text.strip()}" if input_text and input_text.strip() else instruction
    return [{"role": "user", "content": content}]


def pretrain_text(record: dict[str, Any]) -> str:
    """A report as plain text for continual pre-training (every token is trained on)."""
    if record.get("text"):
        return record["text"]
    exam = f"EXAM: {record['exam_code']}\n" if record.get("exam_code") else ""
    return f"{exam}FINDINGS: {record.get('findings') or ''}\nIMPRESSION: {record.get('impression') or ''}"


def install_chat_format(tokenizer, chat_format: str) -> None:
    """Make the tokenizer render the recipe's chat format (training, serving and vLLM alike)."""
    tokenizer.chat_template = CHAT_TEMPLATES[chat_format]


def prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a prompt that ends where the assistant's answer starts."""
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return list(ids)


def response_ids(tokenizer, response: str, chat_format: str) -> list[int]:
    """Token ids of an assistant answer, closed by the format's end-of-turn token."""
    ids = tokenizer(response.strip(), add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.convert_tokens_to_ids(END_OF_TURN[chat_format])]


def stop_token_ids(tokenizer, chat_format: str) -> list[int]:
    ids = {tokenizer.convert_tokens_to_ids(END_OF_TURN[chat_format])}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def supervised_example(tokenizer, messages: list[dict], response: str, chat_format: str) -> dict[str, list[int]]:
    """input_ids and labels (-100 on the prompt: the loss is only on the response)."""
    prompt = prompt_ids(tokenizer, messages)
    answer = response_ids(tokenizer, response, chat_format)
    return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}
