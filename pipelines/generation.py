"""Batched decoding with per-row settings, shared by the evaluation job and the server.

Each row of a batch has its own temperature, top-p, token budget, stop token ids and stop
strings (and, for a PEFT model, its own adapter), so a dynamic batch can mix requests freely.
Rows are left-padded; a KV cache carries the prefix; a finished row leaves the batch.

`generate` decodes a batch to the end; `BatchDecoder` does it one token per step, reports each
row's new text (what a streaming server sends) and takes new rows between steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicLayer


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
    """Decodes a batch, one token for every unfinished row per `step()`.

    `add()` lets new rows join between steps (continuous batching): they are prefilled on
    their own, and their KV cache is then laid beside the running rows' cache, both left-padded
    to one width. A row that finishes leaves the batch at once.
    """

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # Per row, by row id (the order rows were added in):
        self.settings: list[Sampling] = []
        self.streams: list[TextStream] = []
        self.reasons: list[str | None] = []
        self.generators: list[torch.Generator | None] = []
        self.adapters: list[str | None] = []
        self.prompt_tokens: list[int] = []
        # The running rows, in cache order, and what the next forward pass feeds them.
        self.rows: list[int] = []
        self.past = None
        self.input_ids = self.mask = None  # mask: the cache's positions, then the next input's

    @property
    def done(self) -> bool:
        return not self.rows

    @property
    def can_join(self) -> bool:
        """Whether rows can join a running batch: only a plain (not sliding-window) cache is laid
        beside another."""
        return self.past is None or all(isinstance(layer, DynamicLayer) and not layer.is_sliding
                                        for layer in self.past.layers)

    def cancel(self, row: int) -> None:
        """Stop decoding a row nobody waits for any more (its client went away)."""
        if self.reasons[row] is None:
            self.reasons[row] = "cancelled"

    @torch.no_grad()
    def add(self, prompts: list[list[int]], settings: list[Sampling],
            adapter_names: list[str] | None = None) -> dict[int, Delta]:
        """Prefill new rows (token ids), let them join the batch; returns their first tokens' text
        by row id, in the order given."""
        ids = list(range(len(self.settings), len(self.settings) + len(prompts)))
        for prompt, s, name in zip(prompts, settings, adapter_names or [None] * len(prompts)):
            self.settings.append(s)
            self.streams.append(TextStream(self.tokenizer, s.stop))
            self.reasons.append(None)
            self.generators.append(torch.Generator().manual_seed(s.seed) if s.seed is not None else None)
            self.adapters.append(name)
            self.prompt_tokens.append(len(prompt))
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for k, prompt in enumerate(prompts):
            input_ids[k, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[k, width - len(prompt):] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        out = self._forward(ids, input_ids, mask, None)
        deltas, tokens = self._advance(ids, out.logits[:, -1, :])
        self._join(ids, out.past_key_values, self._next_inputs(tokens), self._grown(mask))
        self._drop_finished()
        return deltas

    @torch.no_grad()
    def step(self) -> dict[int, Delta]:
        """One forward pass for the running rows; their new text by row id."""
        self._drop_finished()  # rows cancelled since the last step
        if self.done:
            return {}
        out = self._forward(self.rows, self.input_ids, self.mask, self.past)
        self.past = out.past_key_values
        deltas, tokens = self._advance(self.rows, out.logits[:, -1, :])
        self.input_ids, self.mask = self._next_inputs(tokens), self._grown(self.mask)
        self._drop_finished()
        return deltas

    def results(self) -> list[Generated]:
        return [Generated(text=stream.final_text(), token_ids=list(stream.token_ids),
                          finish_reason=reason or "length", prompt_tokens=n)
                for stream, reason, n in zip(self.streams, self.reasons, self.prompt_tokens)]

    def _forward(self, rows: list[int], input_ids: torch.Tensor, mask: torch.Tensor, past):
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.size(1):]
        names = [self.adapters[i] for i in rows]
        extra = {"adapter_names": names} if names[0] is not None else {}
        # Only the last position's logits are needed: skipping the rest saves a large matmul
        # over every prompt token.
        return self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                          past_key_values=past, use_cache=True, logits_to_keep=1, **extra)

    def _advance(self, rows: list[int], logits: torch.Tensor) -> tuple[dict[int, Delta], list[int]]:
        """Pick each row's next token, check its stops, and say what text it adds."""
        greedy = logits.argmax(-1).tolist()  # one call for the whole batch
        deltas, tokens = {}, []
        for k, i in enumerate(rows):
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
            tokens.append(token)
        return deltas, tokens

    def _next_inputs(self, tokens: list[int]) -> torch.Tensor:
        return torch.tensor(tokens, dtype=torch.long, device=self.device).unsqueeze(1)

    def _grown(self, mask: torch.Tensor) -> torch.Tensor:
        return torch.cat([mask, torch.ones((mask.size(0), 1), dtype=torch.long, device=self.device)], 1)

    def _join(self, rows: list[int], past, input_ids: torch.Tensor, mask: torch.Tensor) -> None:
        if self.done:
            self.rows, self.past, self.input_ids, self.mask = rows, past, input_ids, mask
            return
        if not self.can_join:
            raise ValueError("this model's cache cannot take rows into a running batch; add them when it is done")
        width = max(self.mask.size(1), mask.size(1))
        for mine, theirs in zip(self.past.layers, past.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, width - 1, -2), _left_pad(theirs.keys, width - 1, -2)])
            mine.values = torch.cat([_left_pad(mine.values, width - 1, -2), _left_pad(theirs.values, width - 1, -2)])
        self.mask = torch.cat([_left_pad(self.mask, width, -1), _left_pad(mask, width, -1)])
        self.input_ids = torch.cat([self.input_ids, input_ids])
        self.rows = self.rows + rows

    def _drop_finished(self) -> None:
        keep = [k for k, i in enumerate(self.rows) if self.reasons[i] is None]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[k] for k in keep]
        if not self.rows:
            self.past = self.input_ids = self.mask = None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.past.batch_select_indices(index)
        self.input_ids, self.mask = self.input_ids[index], self.mask[index]
        # Columns that were padding for every row left are dropped, so joins do not widen the
        # cache for good.
        first = int(self.mask.any(0).nonzero()[0])
        if first and self.can_join:
            for layer in self.past.layers:
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
            self.mask = self.mask[:, first:]


def _left_pad(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """`x` with zeros before its entries along `dim` (-1 or -2) up to `width`."""
    missing = width - x.size(dim)
    if not missing:
        return x
    return torch.nn.functional.pad(x, (missing, 0) if dim == -1 else (0, 0, missing, 0))


def generate(model, tokenizer, prompts: list[list[int]], settings: list[Sampling],
             adapter_names: list[str] | None = None) -> list[Generated]:
    """Decode every prompt (token ids) with its own settings; returns text without the prompt."""
    decoder = BatchDecoder(model, tokenizer)
    decoder.add(prompts, settings, adapter_names)
    while not decoder.done:
        decoder.step()
    return decoder.results()
