"""`NAME=PATH_OR_ENDPOINT`: the models an evaluation compares, and how each one answers.

- a Hugging Face model directory (a base, or a fully fine-tuned model);
- a PEFT adapter directory (its base is read from adapter_config.json);
- an OpenAI-compatible endpoint `http(s)://host:port/v1` (optionally `...#model-id`), such as
  the project's own Ray Serve app.

All local models' work (impressions and benchmark questions) runs in one Ray Data pass whose
actors hold one model at a time; endpoints get concurrent chat requests. A request or a model
that fails comes back as None with a counted reason, never as an (empty) answer.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipelines.cli import UserError
from pipelines.config import Recipe

log = logging.getLogger(__name__)

# Prompt tokens kept for a long benchmark question: the model's context minus the answer budget.
DEFAULT_CONTEXT = 2048


@dataclass
class ModelSpec:
    name: str
    location: str
    kind: str  # "local" | "adapter" | "endpoint"
    base: str | None = None
    endpoint_model: str | None = None

    def public_location(self) -> str:
        """Where the model lives, safe for a report: no credentials or query in a URL."""
        if self.kind != "endpoint":
            return self.location
        from pipelines.judge import public_endpoint

        suffix = f"#{self.endpoint_model}" if self.endpoint_model else ""
        return public_endpoint(self.location) + suffix


def parse_model_spec(text: str) -> ModelSpec:
    if "=" not in text:
        raise UserError(f"--model {text!r}: expected NAME=PATH_OR_ENDPOINT")
    name, _, location = text.partition("=")
    if not name.strip():
        raise UserError(f"--model {text!r}: the NAME before '=' is empty")
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


# ----------------------------------------------------------------------------- endpoints


def endpoint_chat(spec: ModelSpec, messages_list: list[list[dict]], max_new_tokens: int,
                  concurrency: int = 8) -> tuple[list[str | None], Counter[str]]:
    """Greedy chat completions, `concurrency` at a time: (answer or None per request, failure reasons)."""
    import openai
    from openai import OpenAI

    from pipelines.judge import failure_reason

    n = len(messages_list)
    if not n:
        return [], Counter()
    client = OpenAI(base_url=spec.location, api_key=os.environ.get("OPENAI_API_KEY", "unused"),
                    max_retries=3, timeout=120)
    try:
        model_id = spec.endpoint_model or client.models.list().data[0].id
    except openai.OpenAIError as error:
        return [None] * n, Counter({failure_reason(error): n})
    except IndexError:
        return [None] * n, Counter({"no model listed": n})

    def one(messages: list[dict]) -> tuple[str | None, str | None]:
        try:
            reply = client.chat.completions.create(model=model_id, messages=messages, max_tokens=max_new_tokens,
                                                   temperature=0.0)
        except (openai.OpenAIError, ValueError) as error:  # ValueError: a body that is not JSON
            return None, failure_reason(error)
        return ((reply.choices[0].message.content or "") if reply.choices else ""), None

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(one, messages_list))
    return [text for text, _ in results], Counter(reason for _, reason in results if reason)


# ----------------------------------------------------------------------------- local models


def describe_error(err: Exception) -> str:
    """The error's type and first line: enough to act on, short enough for a report."""
    first = str(err).splitlines()[0][:200] if str(err) else ""
    return f"{type(err).__name__}: {first}"


@dataclass
class Work:
    """What one model is asked: impressions for reports (findings, exam_code) and benchmark questions."""

    reports: list[dict] = field(default_factory=list)
    questions: list = field(default_factory=list)  # MCQItem


@dataclass
class Answers:
    impressions: list[str | None]  # None: no answer (failed request or failed model)
    mcq: list[dict]  # loglik_pred (local models only), output (None when the request failed)
    failures: Counter = field(default_factory=Counter)  # reason -> requests or rows


class ModelRunner:
    """A Ray Data actor that answers rows for any of the local models, holding one model at a
    time: rows arrive grouped by model, so each actor loads each model once."""

    def __init__(self, specs: dict[str, ModelSpec], model_cfg: dict, max_new_tokens: int, mcq_modes: list[str],
                 mcq_max_new_tokens: int, batch_size: int):
        self.specs, self.model_cfg, self.batch_size = specs, model_cfg, batch_size
        self.max_new_tokens, self.mcq_modes, self.mcq_max_new_tokens = max_new_tokens, mcq_modes, mcq_max_new_tokens
        self.current: str | None = None
        self.loaded = None  # (tokenizer, model, stop ids) of `current`

    def _use(self, name: str) -> None:
        if name == self.current:
            return
        from pipelines.config import ModelConfig
        from pipelines.models import load_for_inference, load_tokenizer
        from pipelines.prompts import stop_token_ids

        self.current, self.loaded = None, None  # drop the previous model before loading the next
        spec, cfg = self.specs[name], ModelConfig.model_validate(self.model_cfg)
        base = spec.base if spec.kind == "adapter" else spec.location
        tokenizer = load_tokenizer(spec.location if spec.kind == "local" else base, cfg.chat_format)
        model = load_for_inference(base, cfg, adapter_path=spec.location if spec.kind == "adapter" else None)
        self.current, self.loaded = name, (tokenizer, model, stop_token_ids(tokenizer, cfg.chat_format))

    def _generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
        from pipelines.generation import Sampling, generate

        tokenizer, model, stop_ids = self.loaded
        context = getattr(model.config, "max_position_embeddings", None) or DEFAULT_CONTEXT
        # Long prompts lose their start, as lm-evaluation-harness truncates contexts.
        prompts = [p[-max(context - max_new_tokens, 1):] for p in prompts]
        settings = [Sampling(max_new_tokens=max_new_tokens, stop_token_ids=stop_ids)] * len(prompts)
        return [g.text for g in generate(model, tokenizer, prompts, settings)]

    def _impressions(self, payloads: list[dict]) -> list[dict]:
        from pipelines.prompts import impression_messages, prompt_ids

        tokenizer = self.loaded[0]
        prompts = [prompt_ids(tokenizer, impression_messages(p["findings"], p.get("exam_code"))) for p in payloads]
        return [{"prediction": text} for text in self._generate(prompts, self.max_new_tokens)]

    def _questions(self, payloads: list[dict]) -> list[dict]:
        from pipelines.mcq import MCQItem, generative_prompt, score_loglik
        from pipelines.prompts import prompt_ids

        tokenizer, model, _ = self.loaded
        items = [MCQItem(**p) for p in payloads]
        results = [{} for _ in items]
        if "loglik" in self.mcq_modes:
            for result, score in zip(results, score_loglik(model, tokenizer, items, batch_size=self.batch_size)):
                result["loglik_pred"] = score.pred
        if "generative" in self.mcq_modes:
            prompts = [prompt_ids(tokenizer, [{"role": "user", "content": generative_prompt(i)}]) for i in items]
            for result, text in zip(results, self._generate(prompts, self.mcq_max_new_tokens)):
                result["output"] = text
        return results

    def __call__(self, batch):
        results, errors = [None] * len(batch), [None] * len(batch)
        rows = batch.to_dict("records")
        for name in dict.fromkeys(r["model"] for r in rows):
            for kind, answer in (("impression", self._impressions), ("mcq", self._questions)):
                chosen = [i for i, r in enumerate(rows) if r["model"] == name and r["kind"] == kind]
                if not chosen:
                    continue
                try:
                    self._use(name)
                    answers = answer([json.loads(rows[i]["payload"]) for i in chosen])
                except Exception as err:  # noqa: BLE001 - one model failing must not stop the others
                    for i in chosen:
                        errors[i] = describe_error(err)
                    continue
                for i, result in zip(chosen, answers):
                    results[i] = json.dumps(result)
        batch["result"], batch["error"] = results, errors
        return batch.drop(columns=["payload"])


def _check_resources(recipe: Recipe) -> None:
    """An actor pool the cluster cannot place waits forever: say so instead."""
    import ray

    ev = recipe.evaluation
    have = ray.cluster_resources()
    for resource, each in (("CPU", ev.cpus_per_actor), ("GPU", ev.gpus_per_actor)):
        need = each * ev.num_actors
        if need and have.get(resource, 0) < need:
            raise UserError(f"evaluation.num_actors x {resource.lower()}s_per_actor = {need:g} {resource}, "
                            f"but the Ray cluster has {have.get(resource, 0):g}")


def run_local(recipe: Recipe, jobs: dict[str, tuple[ModelSpec, Work]]) -> dict[str, Answers]:
    """Every local model's work in ONE Ray Data pass (rows grouped by model)."""
    import ray.data

    from pipelines.raycluster import init_ray

    init_ray()
    _check_resources(recipe)
    ev = recipe.evaluation
    rows = [{"model": name, "kind": "impression", "index": i, "payload": json.dumps(report)}
            for name, (_, work) in jobs.items() for i, report in enumerate(work.reports)]
    rows += [{"model": name, "kind": "mcq", "index": i, "payload": json.dumps(asdict(item))}
             for name, (_, work) in jobs.items() for i, item in enumerate(work.questions)]
    rows.sort(key=lambda r: list(jobs).index(r["model"]))
    ds = ray.data.from_items(rows).map_batches(
        ModelRunner, batch_size=ev.batch_size, batch_format="pandas",
        fn_constructor_kwargs={"specs": {name: spec for name, (spec, _) in jobs.items()},
                               "model_cfg": recipe.model.model_dump(mode="json"), "max_new_tokens": ev.max_new_tokens,
                               "mcq_modes": list(ev.mcq_modes), "mcq_max_new_tokens": ev.mcq_max_new_tokens,
                               "batch_size": ev.batch_size},
        compute=ray.data.ActorPoolStrategy(size=ev.num_actors), num_cpus=ev.cpus_per_actor,
        num_gpus=ev.gpus_per_actor or None)
    answers = {name: Answers([None] * len(work.reports), [{} for _ in work.questions])
               for name, (_, work) in jobs.items()}
    for row in ds.take_all():
        mine = answers[row["model"]]
        if row["error"]:
            mine.failures[row["error"]] += 1
        elif row["kind"] == "impression":
            mine.impressions[row["index"]] = json.loads(row["result"])["prediction"]
        else:
            mine.mcq[row["index"]] = json.loads(row["result"])
    return answers


# ----------------------------------------------------------------------------- every model


def run_endpoint(recipe: Recipe, spec: ModelSpec, work: Work) -> Answers:
    """Impressions and generative answers from an endpoint (it gives no option log-likelihoods)."""
    from pipelines.mcq import generative_prompt
    from pipelines.prompts import impression_messages

    ev = recipe.evaluation
    messages = [impression_messages(r["findings"], r.get("exam_code")) for r in work.reports]
    impressions, failures = endpoint_chat(spec, messages, ev.max_new_tokens, ev.endpoint_concurrency)
    mcq: list[dict] = [{} for _ in work.questions]
    if "generative" in ev.mcq_modes and work.questions:
        messages = [[{"role": "user", "content": generative_prompt(item)}] for item in work.questions]
        outputs, more = endpoint_chat(spec, messages, ev.mcq_max_new_tokens, ev.endpoint_concurrency)
        mcq, failures = [{"output": o} for o in outputs], failures + more
    return Answers(impressions, mcq, failures)


def run_models(recipe: Recipe, jobs: dict[str, tuple[ModelSpec, Work]]) -> dict[str, Answers]:
    """Each model's answers to its work: endpoints by concurrent requests, local models on Ray Data."""
    answers = {name: run_endpoint(recipe, spec, work) for name, (spec, work) in jobs.items() if spec.kind == "endpoint"}
    local = {name: job for name, job in jobs.items() if job[0].kind != "endpoint"}
    try:
        answers.update(run_local(recipe, local) if local else {})
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - the pass itself failed (e.g. a killed actor): say so, go on
        log.warning("the Ray Data pass over the local models failed", exc_info=True)
        for name, (_, work) in local.items():
            answers[name] = Answers([None] * len(work.reports), [{} for _ in work.questions],
                                    Counter({describe_error(err): len(work.reports) + len(work.questions)}))
    return {name: answers[name] for name in jobs}
