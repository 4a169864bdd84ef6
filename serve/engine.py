"""The model deployment: one model per replica, its LoRA adapters, and dynamic batching.

Requests arrive from the gateway (never from HTTP) as token ids and sampling settings; the
adapter is the request's multiplexed model id, so Serve routes it to a replica that already
holds the adapter. `@serve.batch` gathers requests into a batch that is decoded one token per
step; each step hands every request its new text, which streams out while the batch goes on.
Serve splits a batch by multiplexed model id; the sub-batches' steps take turns on the model.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ray import serve

from pipelines.generation import BatchDecoder, Delta, Sampling
from serve.adapters import BASE, AdapterPool


@dataclass
class Job:
    """One request as the gateway sends it."""

    prompt: list[int]
    sampling: Sampling


@dataclass
class Completion:
    text: str
    finish_reason: str
    completion_tokens: int


@dataclass
class _Row:
    job: Job
    adapter: str | None
    cancelled: bool = field(default=False)


@serve.deployment
class Engine:
    def __init__(self, model_path: str, recipe: dict, adapters: dict[str, str]):
        import torch

        from pipelines.config import Recipe
        from pipelines.models import load_model, load_tokenizer

        recipe = Recipe.model_validate(recipe)
        s = recipe.serve
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.tokenizer = load_tokenizer(model_path, recipe.model.chat_format)
        model_cfg = recipe.model.model_copy(update={"dtype": s.dtype or recipe.model.dtype})
        # On a replica with GPUs the weights go onto them (split across several if need be).
        model = load_model(model_path, model_cfg, quantization=recipe.quantization if s.load_in_4bit else None,
                           device_map="auto" if torch.cuda.is_available() else None)
        model.eval()
        model.config.use_cache = True
        # One forward pass at a time: adapter loads and deletions change the model's modules.
        self.model_lock = threading.Lock()
        self.pool = AdapterPool(model, adapters, self.model_lock) if adapters else None
        self.model = self.pool.model if self.pool else model
        if self.pool:
            # The bound comes from the recipe, so the multiplexed loader is made here.
            async def load_adapter(name: str):
                return await asyncio.to_thread(self.pool.load, name)

            self.adapter = serve.multiplexed(max_num_models_per_replica=s.max_adapters_per_replica)(load_adapter)
        self._decode.set_max_batch_size(s.max_batch_size)
        self._decode.set_batch_wait_timeout_s(s.batch_wait_timeout_s)

    async def complete(self, job: Job) -> Completion:
        pieces, last = [], Delta("", 0, "length")
        async for delta in self._run(job):
            pieces.append(delta.text)
            last = delta
        return Completion("".join(pieces), last.finish_reason or "length", last.completion_tokens)

    async def stream(self, job: Job) -> AsyncIterator[Delta]:
        async for delta in self._run(job):
            yield delta

    async def _run(self, job: Job) -> AsyncIterator[Delta]:
        adapter = serve.get_multiplexed_model_id() or None
        if adapter:
            await self.adapter(adapter)
            self.pool.acquire(adapter)
        row = _Row(job, adapter)
        try:
            async for delta in self._decode(row):
                if delta.text or delta.finish_reason:
                    yield delta
        finally:
            row.cancelled = True  # no-op once finished; stops decoding for a client that left
            if adapter:
                self.pool.release(adapter)
                await asyncio.to_thread(self.pool.sweep)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)  # replaced from the recipe in __init__
    async def _decode(self, rows: list[_Row]) -> AsyncIterator[list]:
        names = [row.adapter or BASE for row in rows] if self.pool else None
        decoder = BatchDecoder(self.model, self.tokenizer, [r.job.prompt for r in rows],
                               [r.job.sampling for r in rows], names)
        finished = [False] * len(rows)
        while not decoder.done:
            for i, row in enumerate(rows):
                if row.cancelled:
                    decoder.cancel(i)
            deltas = await asyncio.to_thread(self._step, decoder)
            out = []
            for i, delta in enumerate(deltas):
                # A finished request's stream ends; a quiet step gives an empty delta.
                out.append(StopIteration if finished[i] else delta or Delta("", 0))
                finished[i] = finished[i] or delta is None or delta.finish_reason is not None
            yield out

    def _step(self, decoder: BatchDecoder) -> list[Delta | None]:
        with self.model_lock:
            return decoder.step()
