"""Batched decoding with per-row settings, shared by the evaluation job and the server.

Each row of a batch has its own temperature, top-p, token budget, stop token ids and stop
strings (and, for a PEFT model, its own adapter), so a dynamic batch can mix requests freely.
Rows are left-padded; a KV cache carries the prefix; a finished row leaves the batch.

`generate` decodes a batch to the end; `BatchDecoder` does it one token per step and reports
each row's new text, which is what a streaming server sends.
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


@dataclass
class Delta:
    """What one decoding step added to one row's answer."""

    text: str
    completion_tokens: int
    finish_reason: str | None = None  # set on the row's last step


def _pick(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> int:
    probs = torch.softmax(logits.float() / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < s.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    hits = [text.index(s) for s in stops if s and s in text]
    return (text[:min(hits)], True) if hits else (text, False)


def _stop_prefix_length(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that could still grow into a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class TextStream:
    """One row's answer as text, released only once later tokens can no longer change it.

    The final answer is the decoded tokens, cut at the first stop string and stripped. While
    decoding, the stream holds back a half-decoded character, whitespace at either end, and
    any ending that may be the start of a stop string; what it has released is therefore
    always a prefix of the final answer.
    """

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.token_ids: list[int] = []
        self.sent = ""

    def _decoded(self) -> str:
        return self.tokenizer.decode(self.token_ids, skip_special_tokens=True)

    def push(self, token: int) -> bool:
        """Add a token; True when the answer now contains a stop string."""
        self.token_ids.append(token)
        return bool(self.stops) and _cut_at_stop(self._decoded(), self.stops)[1]

    def release(self) -> str:
        """New text that is certain to be part of the answer."""
        text = self._decoded().rstrip("\ufffd")  # a character split across tokens is not complete yet
        text = text[:len(text) - _stop_prefix_length(text, self.stops)].strip()
        return self._advance(text)

    def finish(self) -> str:
        """The rest of the answer, once the row is done."""
        return self._advance(self.final_text())

    def final_text(self) -> str:
        return _cut_at_stop(self._decoded(), self.stops)[0].strip()

    def _advance(self, text: str) -> str:
        delta = text[len(self.sent):] if len(text) > len(self.sent) else ""
        self.sent += delta
        return delta


class BatchDecoder:
    """Decodes one batch, one token for every unfinished row per `step()`."""

    def __init__(self, model, tokenizer, prompts: list[list[int]], settings: list[Sampling],
                 adapter_names: list[str] | None = None):
        self.model, self.settings = model, settings
        self.device = next(model.parameters()).device
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.prompt_tokens = [len(p) for p in prompts]
        self.streams = [TextStream(tokenizer, s.stop) for s in settings]
        self.reasons: list[str | None] = [None] * len(prompts)
        self.generators = [torch.Generator().manual_seed(s.seed) if s.seed is not None else None for s in settings]
        width = max(self.prompt_tokens)
        self.input_ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        self.mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            self.input_ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            self.mask[i, width - len(p):] = 1
        self.input_ids, self.mask = self.input_ids.to(self.device), self.mask.to(self.device)
        self.adapter_names = adapter_names
        self.rows = list(range(len(prompts)))  # rows still decoding, in cache order
        self.past = None

    @property
    def done(self) -> bool:
        return not self.rows

    def cancel(self, row: int) -> None:
        """Stop decoding a row nobody waits for any more (its client went away)."""
        if self.reasons[row] is None:
            self.reasons[row] = "cancelled"

    @torch.no_grad()
    def step(self) -> list[Delta | None]:
        """One forward pass; per row its new text, or None for a row that finished before."""
        self._drop_finished()  # rows cancelled since the last step
        deltas: list[Delta | None] = [None] * len(self.settings)
        if self.done:
            return deltas
        position_ids = (self.mask.cumsum(-1) - 1).clamp(min=0)[:, -self.input_ids.size(1):]
        extra = {"adapter_names": [self.adapter_names[i] for i in self.rows]} if self.adapter_names else {}
        # Only the last position's logits are needed: skipping the rest saves a large matmul
        # over every prompt token.
        out = self.model(input_ids=self.input_ids, attention_mask=self.mask, position_ids=position_ids,
                         past_key_values=self.past, use_cache=True, logits_to_keep=1, **extra)
        self.past = out.past_key_values
        logits = out.logits[:, -1, :]
        greedy = logits.argmax(-1).tolist()  # one call for the whole batch
        next_ids = []
        for k, i in enumerate(self.rows):
            s, stream = self.settings[i], self.streams[i]
            token = greedy[k] if s.temperature <= 0 else _pick(logits[k], s, self.generators[i])
            if token in s.stop_token_ids:
                self.reasons[i] = "stop"
            elif stream.push(token):
                self.reasons[i] = "stop"
            elif len(stream.token_ids) >= s.max_new_tokens:
                self.reasons[i] = "length"
            text = stream.finish() if self.reasons[i] else stream.release()
            deltas[i] = Delta(text, len(stream.token_ids), self.reasons[i])
            next_ids.append(token)
        self.input_ids = torch.tensor(next_ids, dtype=torch.long, device=self.device).unsqueeze(1)
        self.mask = torch.cat([self.mask, torch.ones((len(self.rows), 1), dtype=torch.long, device=self.device)], 1)
        self._drop_finished()
        return deltas

    def _drop_finished(self) -> None:
        keep = [k for k, i in enumerate(self.rows) if self.reasons[i] is None]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[k] for k in keep]
        if self.rows and self.past is not None:
            index = torch.tensor(keep, dtype=torch.long, device=self.device)
            self.past.batch_select_indices(index)
            self.input_ids, self.mask = self.input_ids[index], self.mask[index]

    def results(self) -> list[Generated]:
        return [Generated(text=stream.final_text(), token_ids=list(stream.token_ids),
                          finish_reason=reason or "length", prompt_tokens=n)
                for stream, reason, n in zip(self.streams, self.reasons, self.prompt_tokens)]


def generate(model, tokenizer, prompts: list[list[int]], settings: list[Sampling],
             adapter_names: list[str] | None = None) -> list[Generated]:
    """Decode every prompt (token ids) with its own settings; returns text without the prompt."""
    decoder = BatchDecoder(model, tokenizer, prompts, settings, adapter_names)
    while not decoder.done:
        decoder.step()
    return decoder.results()
