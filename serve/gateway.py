"""The HTTP ingress: the OpenAI-compatible API in front of the model deployments.

It checks the API key, validates the body, builds the prompt with `pipelines.prompts` (the
module training used), checks it against the model's context, and routes on the body's `model`:
a LoRA adapter goes to the base model's deployment as its multiplexed model id (Serve then
prefers a replica that holds it), a fully fine-tuned model to its own deployment. Request text
is never logged.

No `from __future__ import annotations` here: FastAPI must see real types in a Serve ingress.
"""

import hmac
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from pipelines.generation import Sampling
from pipelines.prompts import impression_messages, prompt_ids, stop_token_ids
from serve.engine import Completion, Job
from serve.responses import DONE, Reply, error_body, error_response, event, usage
from serve.schemas import ChatRequest, CompletionRequest, ImpressionRequest, OpenAIError, Sampled

MAX_BODY_BYTES = 4 * 2**20  # far above any context the recipes use; refuses junk early
Body = TypeVar("Body", bound=BaseModel)

api = FastAPI(title="MedRay", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(ValidationError)
async def _invalid_body(_: Request, exc: ValidationError):
    # Name the field and the reason, never echo the input (it may hold PHI).
    first = exc.errors(include_input=False, include_url=False)[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "body"
    return error_response(400, f"{where}: {first['msg']}")


@api.exception_handler(OpenAIError)
async def _openai_error(_: Request, exc: OpenAIError):
    return error_response(exc.status, exc.message, exc.kind)


@dataclass
class Served:
    """What a model id in a request resolves to."""

    handle: DeploymentHandle
    adapter: str | None
    tokenizer: object
    context_length: int
    stop_ids: list[int]

    def call(self, method: str, stream: bool = False):
        return getattr(self.handle.options(multiplexed_model_id=self.adapter or "", stream=stream), method)


def api_key_from_env(name: str | None) -> str | None:
    """The Bearer key, read from this replica's environment so it is never in a config or log."""
    if not name:
        return None
    key = os.environ.get(name)
    if not key:
        raise RuntimeError(f"serve.api_key_env is {name}, but {name} is not set in the replica's environment "
                           f"(export it where `ray start` runs)")
    return key


def authorized(header: str | None, key: str) -> bool:
    scheme, _, token = (header or "").partition(" ")
    # compare_digest takes the same time wherever the first difference is.
    return hmac.compare_digest(token.strip().encode(), key.encode()) and scheme.lower() == "bearer"


@serve.deployment
@serve.ingress(api)
class Gateway:
    def __init__(self, engines: dict[str, DeploymentHandle], paths: dict[str, str], adapters: list[str],
                 recipe: dict):
        from transformers import AutoConfig

        from pipelines.config import Recipe
        from pipelines.models import load_tokenizer

        recipe = Recipe.model_validate(recipe)
        self.serve_cfg, fmt = recipe.serve, recipe.model.chat_format
        self.api_key = api_key_from_env(self.serve_cfg.api_key_env)
        self.models: dict[str, Served] = {}
        for model_id, path in paths.items():
            tokenizer = load_tokenizer(path, fmt)
            context = AutoConfig.from_pretrained(path, trust_remote_code=False).max_position_embeddings
            self.models[model_id] = Served(engines[model_id], None, tokenizer, context, stop_token_ids(tokenizer, fmt))
        base = self.models[self.serve_cfg.model_id]
        for adapter in adapters:
            self.models[adapter] = Served(base.handle, adapter, base.tokenizer, base.context_length, base.stop_ids)

    # ------------------------------------------------------------------ routes

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> dict:
        self.authorize(request)
        return {"object": "list", "data": [{"id": i, "object": "model", "created": 0, "owned_by": "medray"}
                                           for i in self.models]}

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        body = await self.read(request, ChatRequest)
        served = self.served(body.model)
        prompt = prompt_ids(served.tokenizer, [m.as_chat() for m in body.messages])
        return await self.answer(Reply(chat=True, model=body.model), served, prompt, body)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        body = await self.read(request, CompletionRequest)
        served = self.served(body.model)
        prompt = served.tokenizer(body.prompt, add_special_tokens=True)["input_ids"]
        return await self.answer(Reply(chat=False, model=body.model), served, prompt, body)

    @api.post("/v1/impressions")
    async def impressions(self, request: Request) -> dict:
        """Findings (and exam code) in, impression out: the task the adapters were trained on."""
        body = await self.read(request, ImpressionRequest)
        served = self.served(body.model)
        prompt = prompt_ids(served.tokenizer, impression_messages(body.findings, body.exam_code))
        result = await self.complete(served, Job(prompt, self.sampling(body, served, prompt)))
        return {"model": body.model, "impression": result.text, "finish_reason": result.finish_reason,
                "usage": usage(len(prompt), result.completion_tokens)}

    # ------------------------------------------------------------------ checks

    def authorize(self, request: Request) -> None:
        if self.api_key and not authorized(request.headers.get("authorization"), self.api_key):
            raise OpenAIError(401, "missing or invalid API key (Authorization: Bearer ...)", "authentication_error")

    async def read(self, request: Request, schema: type[Body]) -> Body:
        """The authorized, validated body (the key is checked before anything is parsed)."""
        self.authorize(request)
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise OpenAIError(413, f"request body over {MAX_BODY_BYTES} bytes")
        return schema.model_validate_json(raw or b"null")

    def served(self, model: str) -> Served:
        if model not in self.models:
            raise OpenAIError(404, f"model {model!r} does not exist; see GET /v1/models", "not_found_error")
        return self.models[model]

    def sampling(self, body: Sampled, served: Served, prompt: list[int]) -> Sampling:
        limit, context = self.serve_cfg.max_new_tokens_limit, served.context_length
        if not prompt:
            raise OpenAIError(400, "prompt: must not be empty")
        if len(prompt) >= context:
            raise OpenAIError(400, f"prompt ({len(prompt)} tokens) exceeds the context length ({context})")
        max_tokens = body.token_budget or min(limit, context - len(prompt))
        if max_tokens > limit:
            raise OpenAIError(400, f"max_tokens: {max_tokens} is over this server's limit of {limit}")
        if len(prompt) + max_tokens > context:
            raise OpenAIError(400, f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceed the "
                                   f"context length ({context})")
        return Sampling(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                        stop_token_ids=served.stop_ids, stop=body.stop_strings, seed=body.seed)

    # ------------------------------------------------------------------ calling the engines

    async def answer(self, reply: Reply, served: Served, prompt: list[int], body: Sampled):
        job = Job(prompt, self.sampling(body, served, prompt))
        if not body.stream:
            result = await self.complete(served, job)
            return reply.whole(result.text, result.finish_reason, usage(len(prompt), result.completion_tokens))
        stream, first = await self.open_stream(served, job)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(self.events(reply, stream, first, len(prompt), include_usage),
                                 media_type="text/event-stream")

    async def complete(self, served: Served, job: Job) -> Completion:
        # Decoding is repeatable, so a request whose replica died is sent once more (to its
        # replacement if need be).
        for attempt in (1, 2):
            try:
                return await served.call("complete").remote(job)
            except RayActorError:
                if attempt == 2:
                    raise OpenAIError(503, "the model replica failed; retry", "server_error") from None
            except BackPressureError:
                raise OpenAIError(503, "the server is at capacity; retry later", "server_error") from None

    async def open_stream(self, served: Served, job: Job):
        """The engine's stream and its first piece; retried like `complete` until then."""
        for attempt in (1, 2):
            stream = served.call("stream", stream=True).remote(job)
            try:
                return stream, await stream.__anext__()
            except RayActorError:
                if attempt == 2:
                    raise OpenAIError(503, "the model replica failed; retry", "server_error") from None
            except BackPressureError:
                raise OpenAIError(503, "the server is at capacity; retry later", "server_error") from None

    async def events(self, reply: Reply, stream, first, prompt_tokens: int,
                     include_usage: bool) -> AsyncIterator[str]:
        if reply.chat:
            yield reply.chunk("", first=True)
        delta = first
        try:
            while True:
                yield reply.chunk(delta.text, delta.finish_reason)
                if delta.finish_reason:
                    break
                delta = await stream.__anext__()
        except RayActorError:
            yield event(error_body(503, "the model replica failed during the answer; retry", "server_error"))
            return
        finally:
            if not delta.finish_reason:
                stream.cancel()  # the client went away: its row stops decoding
        if include_usage:
            yield reply.usage_chunk(usage(prompt_tokens, delta.completion_tokens))
        yield DONE
