"""The model deployment: one model per replica, its LoRA adapters, and continuous batching.

Requests arrive from the gateway (never from HTTP) as token ids and sampling settings; the
adapter is the request's multiplexed model id, so Serve routes it to a replica that already
holds the adapter. Batching is continuous (serve/scheduler.py): a request joins the running
batch at the next token and streams its text out as it is decoded; requests for the base and
for different adapters share one forward pass.

Not `@serve.batch`: it runs a batch to its end before it starts the next (so requests that
miss a batch wait for its longest answer), and Ray Serve splits its batches by multiplexed
model id.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

import ray
from ray import serve

from pipelines.generation import Delta, Sampling
from serve.adapters import BASE, AdapterPool
from serve.scheduler import Scheduler


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


@serve.deployment
class Engine:
    def __init__(self, model_path: str, recipe: dict, adapters: dict[str, str]):
        import torch

        from pipelines.config import Recipe
        from pipelines.models import load_for_inference, load_tokenizer

        recipe = Recipe.model_validate(recipe)
        s = recipe.serve
        # As many torch threads as CPUs reserved: more would fight the other replicas for them.
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))
        self.tokenizer = load_tokenizer(model_path, recipe.model.chat_format)
        model_cfg = recipe.model.model_copy(update={"dtype": s.dtype or recipe.model.dtype})
        model = load_for_inference(model_path, model_cfg,
                                   quantization=recipe.quantization if s.load_in_4bit else None)
        # One forward pass at a time: adapter loads and deletions change the model's modules.
        self.model_lock = threading.Lock()
        self.pool = AdapterPool(model, adapters, self.model_lock) if adapters else None
        self.model = self.pool.model if self.pool else model
        if self.pool:
            # The bound comes from the recipe, so the multiplexed loader is made here.
            async def load_adapter(name: str):
                return await asyncio.to_thread(self.pool.load, name)

            self.adapter = serve.multiplexed(max_num_models_per_replica=s.max_adapters_per_replica)(load_adapter)
        self.scheduler = Scheduler(self.model, self.tokenizer, self.model_lock, s.max_batch_size,
                                   s.batch_wait_timeout_s)

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
        try:
            name = (adapter or BASE) if self.pool else None
            async for delta in self.scheduler.generate(job.prompt, job.sampling, name):
                if delta.text or delta.finish_reason:
                    yield delta
        finally:
            if adapter:
                self.pool.release(adapter)
                await asyncio.to_thread(self.pool.sweep)
