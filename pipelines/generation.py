"""Batched decoding with per-row settings, shared by the evaluation job and the server.

Each row of a batch has its own temperature, top-p, token budget, stop token ids and stop
strings (and, for a PEFT model, its own adapter), so a dynamic batch can mix requests freely.
Rows are left-padded; a KV cache carries the prefix; a finished row stops counting.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Generated:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int


def _pick(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> int:
    if s.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < s.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    hits = [text.index(s) for s in stops if s and s in text]
    return (text[:min(hits)], True) if hits else (text, False)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], settings: list[Sampling],
             adapter_names: list[str] | None = None) -> list[Generated]:
    """Decode every prompt (token ids) with its own settings; returns text without the prompt."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    generators = [torch.Generator().manual_seed(s.seed) if s.seed is not None else None for s in settings]
    outputs: list[list[int]] = [[] for _ in prompts]
    reasons: list[str | None] = [None] * len(prompts)
    extra = {"adapter_names": adapter_names} if adapter_names is not None else {}
    past = None
    step_ids = input_ids
    budget = max(s.max_new_tokens for s in settings)
    for _ in range(budget):
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.size(1):]
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=position_ids, past_key_values=past,
                    use_cache=True, **extra)
        past = out.past_key_values
        logits = out.logits[:, -1, :]
        next_ids = []
        for i, s in enumerate(settings):
            if reasons[i] is not None:
                next_ids.append(pad)
                continue
            token = _pick(logits[i], s, generators[i])
            if token in s.stop_token_ids:
                reasons[i] = "stop"
                next_ids.append(pad)
                continue
            outputs[i].append(token)
            if s.stop and _cut_at_stop(tokenizer.decode(outputs[i], skip_special_tokens=True), s.stop)[1]:
                reasons[i] = "stop"
            elif len(outputs[i]) >= s.max_new_tokens:
                reasons[i] = "length"
            next_ids.append(token)
        if all(r is not None for r in reasons):
            break
        step_ids = torch.tensor(next_ids, dtype=torch.long, device=device).unsqueeze(1)
        mask = torch.cat([mask, torch.ones((len(prompts), 1), dtype=torch.long, device=device)], dim=1)
    results = []
    for i, s in enumerate(settings):
        text, _ = _cut_at_stop(tokenizer.decode(outputs[i], skip_special_tokens=True), s.stop)
        results.append(Generated(text=text.strip(), token_ids=outputs[i], finish_reason=reasons[i] or "length",
                                 prompt_tokens=len(prompts[i])))
    return results
