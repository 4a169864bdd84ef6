"""The Ray Serve application: an OpenAI-compatible API over one base model and its adapters.

    serve run serve.app:app recipe=local model=runs/local/train/pretrain/model \
        adapters=impressions=runs/local/train/finetune/model
    serve deploy serve/config.yaml

Routes: POST /v1/chat/completions (stream too), POST /v1/completions, POST /v1/impressions
(findings in, impression out), GET /v1/models, GET /healthz. The prompt is built by
`pipelines.prompts`, the module training used, so the model is served its training format.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from serve.schemas import ChatRequest, CompletionRequest, ImpressionRequest, OpenAIError

log = logging.getLogger("ray.serve")
api = FastAPI(title="MedRay", docs_url=None, redoc_url=None)
BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch


def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "code": status}})


@api.exception_handler(RequestValidationError)
async def _invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
    # Name the field and the reason, never echo the input (it may hold PHI).
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", []) if p != "body") or "body"
    return error(400, f"{where}: {first.get('msg', 'invalid')}")


@api.exception_handler(OpenAIError)
async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
    return error(exc.status, exc.message, exc.kind)


@serve.deployment(ray_actor_options={"num_cpus": 1}, graceful_shutdown_timeout_s=20)
@serve.ingress(api)
class MedRayServer:
    def __init__(self, recipe: dict, base_path: str, model_id: str, adapters: dict[str, str],
                 full_models: dict[str, str]):
        import torch

        from pipelines.config import Recipe
        from pipelines.models import load_for_inference, load_tokenizer
        from pipelines.prompts import stop_token_ids

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.recipe = Recipe.model_validate(recipe)
        cfg, self.serve_cfg = self.recipe.model, self.recipe.serve
        quant = self.recipe.quantization if self.serve_cfg.load_in_4bit else None
        self.tokenizer = load_tokenizer(base_path, cfg.chat_format)
        self.stop_ids = stop_token_ids(self.tokenizer, cfg.chat_format)
        self.model_id, self.adapters = model_id, dict(adapters)
        self.models = {model_id: load_for_inference(base_path, cfg, quantization=quant)}
        for name, path in full_models.items():  # fully fine-tuned models are models of their own
            self.models[name] = load_for_inference(path, cfg, quantization=quant)
        self.peft = None
        self.api_key = os.environ.get(self.serve_cfg.api_key_env) if self.serve_cfg.api_key_env else None
        self.generate_batch.set_max_batch_size(self.serve_cfg.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(self.serve_cfg.batch_wait_timeout_s)
        self.lock = asyncio.Lock()

    # ------------------------------------------------------------------ adapters

    @serve.multiplexed(max_num_models_per_replica=4)
    async def get_adapter(self, adapter_id: str) -> AdapterHandle:
        """Load an adapter onto the shared base on first use; LRU-evicted past the bound."""
        from peft import PeftModel

        path = self.adapters[adapter_id]
        async with self.lock:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.models[self.model_id], path, adapter_name=adapter_id)
                self.peft.eval()
            else:
                self.peft.load_adapter(path, adapter_name=adapter_id)
        log.info("loaded adapter %s", adapter_id)
        return AdapterHandle(self, adapter_id)

    def unload_adapter(self, adapter_id: str) -> None:
        if self.peft is not None and adapter_id in self.peft.peft_config:
            self.peft.delete_adapter(adapter_id)

    # ------------------------------------------------------------------ batching

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def generate_batch(self, jobs: list[dict]) -> list[Any]:
        """One forward pass per token for every request that arrived together."""
        from pipelines.generation import generate

        results: list[Any] = [None] * len(jobs)
        groups: dict[str, list[int]] = {}
        for i, job in enumerate(jobs):
            key = "peft" if job["adapter"] else job["model"]
            groups.setdefault(key, []).append(i)
        for key, idx in groups.items():
            if key == "peft":
                model = self.peft
                names = [jobs[i]["adapter"] or BASE_ADAPTER for i in idx]
            else:
                model, names = self.models[key], None
            out = await asyncio.to_thread(generate, model, self.tokenizer, [jobs[i]["prompt"] for i in idx],
                                          [jobs[i]["sampling"] for i in idx], names)
            for i, g in zip(idx, out):
                results[i] = g
        return results

    # ------------------------------------------------------------------ helpers

    def check_key(self, request: Request) -> None:
        if not self.api_key:
            return
        given = request.headers.get("authorization", "")
        expected = f"Bearer {self.api_key}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise OpenAIError(401, "missing or invalid API key", "authentication_error")

    async def resolve(self, model: str) -> tuple[str, str | None]:
        """(model to run, adapter name or None) for the request's `model` field."""
        if model in self.models:
            return model, None
        if model in self.adapters:
            await self.get_adapter(model)
            return self.model_id, model
        raise OpenAIError(404, f"model {model!r} does not exist; see GET /v1/models", "not_found_error")

    def sampling(self, body, prompt: list[int]):
        from pipelines.generation import Sampling

        limit = self.serve_cfg.max_new_tokens_limit
        max_tokens = body.max_tokens or min(256, limit)
        if max_tokens > limit:
            raise OpenAIError(400, f"max_tokens: at most {limit}")
        context = self.models[self.model_id].config.max_position_embeddings
        if len(prompt) + max_tokens > context:
            raise OpenAIError(400, f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceed the "
                              f"context length ({context})")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return Sampling(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                        stop_token_ids=self.stop_ids, stop=stops, seed=body.seed)

    async def run(self, model: str, prompt: list[int], body):
        target, adapter = await self.resolve(model)
        job = {"model": target, "adapter": adapter, "prompt": prompt, "sampling": self.sampling(body, prompt)}
        return await self.generate_batch(job)

    # ------------------------------------------------------------------ routes

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> dict:
        self.check_key(request)
        ids = list(self.models) + list(self.adapters)
        return {"object": "list", "data": [{"id": i, "object": "model", "created": 0, "owned_by": "medray"}
                                           for i in ids]}

    @api.post("/v1/chat/completions")
    async def chat(self, body: ChatRequest, request: Request):
        from pipelines.prompts import prompt_ids

        self.check_key(request)
        prompt = prompt_ids(self.tokenizer, [m.model_dump() for m in body.messages])
        result = await self.run(body.model, prompt, body)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": len(result.token_ids),
                 "total_tokens": result.prompt_tokens + len(result.token_ids)}
        if body.stream:
            return StreamingResponse(stream_chat(rid, created, body.model, result.text, result.finish_reason),
                                     media_type="text/event-stream")
        return {"id": rid, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": result.finish_reason}], "usage": usage}

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        self.check_key(request)
        prompt = self.tokenizer(body.prompt, add_special_tokens=True)["input_ids"]
        if not prompt:
            raise OpenAIError(400, "prompt: must not be empty")
        result = await self.run(body.model, prompt, body)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.model, "choices": [{"index": 0, "text": result.text, "logprobs": None,
                                                  "finish_reason": result.finish_reason}],
                "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": len(result.token_ids),
                          "total_tokens": result.prompt_tokens + len(result.token_ids)}}

    @api.post("/v1/impressions")
    async def impressions(self, body: ImpressionRequest, request: Request) -> dict:
        from pipelines.prompts import impression_messages, prompt_ids

        self.check_key(request)
        prompt = prompt_ids(self.tokenizer, impression_messages(body.findings, body.exam_code))
        result = await self.run(body.model, prompt, body)
        return {"model": body.model, "impression": result.text}


class AdapterHandle:
    """What `get_adapter` hands out; Serve drops it on eviction, and then the adapter goes too."""

    def __init__(self, server: MedRayServer, adapter_id: str):
        self.server, self.adapter_id = server, adapter_id

    def __del__(self):
        # Eviction and garbage collection may both get here: unloading twice must be harmless.
        try:
            self.server.unload_adapter(self.adapter_id)
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass


def stream_chat(rid: str, created: int, model: str, text: str, finish_reason: str):
    """Server-sent events in the OpenAI chunk format, ending with [DONE]."""
    def chunk(delta: dict, finish: str | None) -> str:
        return "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk", "created": created,
                                      "model": model, "choices": [{"index": 0, "delta": delta,
                                                                   "finish_reason": finish}]}) + "\n\n"

    yield chunk({"role": "assistant", "content": ""}, None)
    for piece in re.findall(r"\S+\s*", text):
        yield chunk({"content": piece}, None)
    yield chunk({}, finish_reason)
    yield "data: [DONE]\n\n"


def _parse_pairs(text: str | dict | None) -> dict[str, str]:
    if not text:
        return {}
    if isinstance(text, dict):
        return dict(text)
    return dict(pair.split("=", 1) for pair in text.split(",") if pair)


def app(args: dict[str, Any]) -> serve.Application:
    """Application builder for `serve run serve.app:app key=value ...` and serve/config.yaml.

    Arguments: recipe (name or path), set (comma-separated KEY=VALUE overrides), model (base
    model directory), adapters (id=dir,...), models (id=dir,... fully fine-tuned models).
    """
    from pipelines.config import Recipe, load_recipe

    if isinstance(args.get("recipe"), dict):  # an already resolved recipe, from Python
        recipe = Recipe.model_validate(args["recipe"])
    else:
        recipe = load_recipe(args.get("recipe"), [s for s in str(args.get("set", "")).split(",") if s])
    base = args.get("model") or recipe.model.path
    if not base:
        raise ValueError("serve.app: give model=<base model directory> (or model.path in the recipe)")
    adapters = {**recipe.serve.adapters, **_parse_pairs(args.get("adapters"))}
    s = recipe.serve
    deployment = MedRayServer.options(
        num_replicas=s.num_replicas,
        ray_actor_options={"num_cpus": s.cpus_per_replica, "num_gpus": s.gpus_per_replica,
                           "runtime_env": {"env_vars": {"HF_HUB_OFFLINE": "1",
                                                        "OMP_NUM_THREADS": str(max(1, int(s.cpus_per_replica)))}}},
    )
    return deployment.bind(recipe.model_dump(mode="json"), str(base), s.model_id, adapters,
                           _parse_pairs(args.get("models")))
