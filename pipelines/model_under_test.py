"""`NAME=PATH_OR_ENDPOINT`: the models an evaluation compares, and how each one generates.

- a Hugging Face model directory (a base, or a fully fine-tuned model);
- a PEFT adapter directory (its base is read from adapter_config.json);
- an OpenAI-compatible endpoint `http(s)://host:port/v1` (optionally `...#model-id`), such as
  the project's own Ray Serve app.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pipelines.cli import UserError


@dataclass
class ModelSpec:
    name: str
    location: str
    kind: str  # "local" | "adapter" | "endpoint"
    base: str | None = None
    endpoint_model: str | None = None


def parse_model_spec(text: str) -> ModelSpec:
    if "=" not in text:
        raise UserError(f"--model {text!r}: expected NAME=PATH_OR_ENDPOINT")
    name, _, location = text.partition("=")
    if location.startswith(("http://", "https://")):
        url, _, model_id = location.partition("#")
        return ModelSpec(name, url, "endpoint", endpoint_model=model_id or None)
    path = Path(location)
    if (path / "adapter_config.json").is_file():
        from pipelines.models import adapter_base_path

        base = adapter_base_path(path)
        if not base or not Path(base).is_dir():
            raise UserError(f"--model {name}: adapter {path} names base {base!r}, which is not a directory here")
        return ModelSpec(name, str(path), "adapter", base=base)
    if (path / "config.json").is_file():
        return ModelSpec(name, str(path), "local")
    raise UserError(f"--model {name}: {location} is neither a model/adapter directory nor an http(s) endpoint")


def endpoint_generate(spec: ModelSpec, messages_list: list[list[dict]], max_new_tokens: int,
                      concurrency: int = 8) -> list[str]:
    """Greedy chat completions from an OpenAI-compatible server, `concurrency` at a time."""
    import os

    from openai import OpenAI

    client = OpenAI(base_url=spec.location, api_key=os.environ.get("OPENAI_API_KEY", "unused"), max_retries=3)
    model_id = spec.endpoint_model or client.models.list().data[0].id

    def one(messages: list[dict]) -> str:
        reply = client.chat.completions.create(model=model_id, messages=messages, max_tokens=max_new_tokens,
                                               temperature=0.0)
        return reply.choices[0].message.content or ""

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(one, messages_list))


class LocalGenerator:
    """A Ray Data actor: loads one local model once, then generates impressions batch by batch."""

    def __init__(self, spec: ModelSpec, model_cfg: dict, max_new_tokens: int):
        from pipelines.config import ModelConfig
        from pipelines.models import load_for_inference, load_tokenizer
        from pipelines.prompts import stop_token_ids

        cfg = ModelConfig.model_validate(model_cfg)
        base = spec.base if spec.kind == "adapter" else spec.location
        self.tokenizer = load_tokenizer(spec.location if spec.kind == "local" else base, cfg.chat_format)
        self.model = load_for_inference(base, cfg, adapter_path=spec.location if spec.kind == "adapter" else None)
        self.stop_ids = stop_token_ids(self.tokenizer, cfg.chat_format)
        self.max_new_tokens = max_new_tokens

    def __call__(self, batch):
        from pipelines.generation import Sampling, generate
        from pipelines.prompts import impression_messages, prompt_ids

        prompts = [prompt_ids(self.tokenizer, impression_messages(f, e))
                   for f, e in zip(batch["findings"], batch["exam_code"])]
        settings = [Sampling(max_new_tokens=self.max_new_tokens, stop_token_ids=self.stop_ids)] * len(prompts)
        batch["prediction"] = [g.text for g in generate(self.model, self.tokenizer, prompts, settings)]
        return batch
