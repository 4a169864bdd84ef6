"""Continuous batching in a replica: requests join the running batch between decoding steps.

One loop per replica drives a `BatchDecoder`. A request waits in line until there is room
(`max_batch_size` rows decoding), joins at the next step boundary (its prompt is prefilled and
its cache laid beside the others'), receives its text token by token through its own queue, and
leaves as soon as it is done, so nobody waits for the longest answer of a batch. When the
replica is idle, the first request waits `wait_s` for others to start with it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pipelines.generation import BatchDecoder, Delta, Sampling

log = logging.getLogger("ray.serve")


@dataclass
class _Request:
    prompt: list[int]
    sampling: Sampling
    adapter: str | None
    answers: asyncio.Queue = field(default_factory=asyncio.Queue)
    row: int | None = None  # set when it joins the batch
    abandoned: bool = False  # its caller went away


class Scheduler:
    def __init__(self, model, tokenizer, model_lock: threading.Lock, max_batch_size: int, wait_s: float):
        self.model, self.tokenizer, self.model_lock = model, tokenizer, model_lock
        self.max_batch_size, self.wait_s = max_batch_size, wait_s
        self.decoder = BatchDecoder(model, tokenizer)
        self.waiting: deque[_Request] = deque()
        self.decoding: dict[int, _Request] = {}
        self.cancelled: deque[int] = deque()  # rows whose client left; the loop stops them
        self.wake = asyncio.Event()
        self.loop_task: asyncio.Task | None = None

    async def generate(self, prompt: list[int], sampling: Sampling, adapter: str | None) -> AsyncIterator[Delta]:
        """The answer's text as it is decoded; the last piece has a finish_reason."""
        request = _Request(prompt, sampling, adapter)
        self.waiting.append(request)
        self.wake.set()
        if self.loop_task is None:
            self.loop_task = asyncio.create_task(self._loop())
        finished = False
        try:
            while not finished:
                answer = await request.answers.get()
                if isinstance(answer, Exception):
                    raise answer
                finished = answer.finish_reason is not None
                yield answer
        finally:
            if not finished:
                request.abandoned = True
                if request in self.waiting:
                    self.waiting.remove(request)
                elif request.row is not None:
                    self.cancelled.append(request.row)
                # else it is joining right now, and the loop stops it once it has its row

    async def _loop(self) -> None:
        while True:
            if not self.waiting and self.decoder.done:
                self.wake.clear()
                await self.wake.wait()
                await asyncio.sleep(self.wait_s)  # let a batch gather
            for row in self.cancelled:  # stopped by the next forward pass; nobody reads them
                self.decoding.pop(row, None)
            joining = self._joining()
            try:
                deltas = await asyncio.to_thread(self._advance, joining)
            except Exception as exc:  # noqa: BLE001 - fail these requests, keep serving the next ones
                log.exception("decoding failed; failing %d requests", len(self.decoding) + len(joining))
                for request in [*self.decoding.values(), *joining]:
                    request.answers.put_nowait(exc)
                self.decoding.clear()
                self.cancelled.clear()
                self.decoder = BatchDecoder(self.model, self.tokenizer)
                continue
            for request, row in zip(joining, deltas):  # joiners come first, in order
                request.row = row
                self.decoding[row] = request
                if request.abandoned:
                    self.cancelled.append(row)
            for row, delta in deltas.items():
                self.decoding[row].answers.put_nowait(delta)
                if delta.finish_reason:
                    del self.decoding[row]

    def _joining(self) -> list[_Request]:
        """The waiting requests that join now: as many as there is room for, if rows can join."""
        if not self.decoder.done and not self.decoder.can_join:
            return []
        room = self.max_batch_size - len(self.decoder.rows)
        return [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]

    def _advance(self, joining: list[_Request]) -> dict[int, Delta]:
        """One forward pass (in a worker thread): prefill the joining requests, or decode a token."""
        with self.model_lock:
            while self.cancelled:
                self.decoder.cancel(self.cancelled.popleft())
            if not joining:
                return self.decoder.step()
            adapters = [r.adapter for r in joining] if joining[0].adapter is not None else None
            return self.decoder.add([r.prompt for r in joining], [r.sampling for r in joining], adapters)
