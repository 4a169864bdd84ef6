"""The Ray Serve application: an OpenAI-compatible API over one base model, its adapters and
any fully fine-tuned models.

    serve run serve.app:app recipe=local model=runs/local/train/pretrain/model \\
        adapters=impressions=runs/local/train/finetune/model
    serve deploy serve/config.yaml

`app` builds a `Gateway` (HTTP ingress, serve/gateway.py) in front of one `Engine` deployment
(serve/engine.py) per model: the base with its LoRA adapters, and one per fully fine-tuned
model. Replica counts, resources, batching and adapter bounds come from the recipe's `serve`
section.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ray import serve

from pipelines.config import Recipe, ServeConfig, load_recipe
from serve.adapters import require_safetensors
from serve.engine import Engine
from serve.gateway import Gateway

ARGS = {"recipe", "set", "model", "adapters", "models"}
INGRESS_MAX_ONGOING_REQUESTS = 256


def parse_pairs(value: str | dict | None) -> dict[str, str]:
    """`id=dir,id=dir` (the command line) or a mapping (a config file, Python)."""
    if not value:
        return {}
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    pairs = [item.split("=", 1) for item in value.split(",") if item]
    if any(len(p) != 2 for p in pairs):
        raise ValueError(f"expected id=dir[,id=dir...], got {value!r}")
    return dict(pairs)


def _model_dir(path: str, what: str) -> str:
    resolved = Path(path).expanduser().resolve()
    if not (resolved / "config.json").is_file():
        raise ValueError(f"{what} {path}: not a Hugging Face model directory (no config.json)")
    return str(resolved)


def _adapter_dir(path: str) -> str:
    resolved = Path(path).expanduser().resolve()
    require_safetensors(resolved)
    return str(resolved)


def replica_options(s: ServeConfig, cpus: float, gpus: float, target_ongoing: float) -> dict[str, Any]:
    """Replica count or autoscaling range, resources and shutdown, as Serve deployment options."""
    if s.max_replicas and s.max_replicas > s.num_replicas:
        scale = {"autoscaling_config": {"min_replicas": s.num_replicas, "max_replicas": s.max_replicas,
                                        "target_ongoing_requests": target_ongoing}}
    else:
        scale = {"num_replicas": s.num_replicas}
    return {**scale, "ray_actor_options": {"num_cpus": cpus, "num_gpus": gpus},
            "graceful_shutdown_timeout_s": s.graceful_shutdown_timeout_s}


def engine_options(s: ServeConfig) -> dict[str, Any]:
    # Room for one batch decoding and the next one gathering; more wait at the router, which can
    # send them to another replica.
    target = s.target_ongoing_requests or s.max_batch_size
    return {**replica_options(s, s.cpus_per_replica, s.gpus_per_replica, target),
            "max_ongoing_requests": 2 * s.max_batch_size}


def gateway_options(s: ServeConfig) -> dict[str, Any]:
    # The ingress only parses and forwards: far more requests may wait on it than on a model.
    return {**replica_options(s, s.ingress_cpus, 0, INGRESS_MAX_ONGOING_REQUESTS // 4),
            "max_ongoing_requests": INGRESS_MAX_ONGOING_REQUESTS}


def engine_name(model_id: str, base: bool) -> str:
    return "Engine" if base else "Engine-" + re.sub(r"[^A-Za-z0-9_.-]", "-", model_id)


def with_env(options: dict[str, Any]) -> dict[str, Any]:
    """Deployment options whose replicas never reach a model hub."""
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return {**options, "ray_actor_options": {**options["ray_actor_options"], "runtime_env": {"env_vars": env}}}


def app(args: dict[str, Any]) -> serve.Application:
    """Application builder for `serve run serve.app:app key=value ...`, serve/config.yaml and Python.

    Arguments: recipe (a shipped name, a path, or a resolved recipe dict), set (comma-separated
    KEY=VALUE recipe overrides), model (base model directory; default model.path), adapters
    (id=dir,... PEFT adapters of the base), models (id=dir,... fully fine-tuned models).
    """
    unknown = set(args) - ARGS
    if unknown:
        raise ValueError(f"serve.app: unknown argument(s) {sorted(unknown)}; expected some of {sorted(ARGS)}")
    if isinstance(args.get("recipe"), dict):
        recipe = Recipe.model_validate(args["recipe"])
    else:
        recipe = load_recipe(args.get("recipe"), [a for a in str(args.get("set") or "").split(",") if a])
    s = recipe.serve
    base = args.get("model") or recipe.model.path
    if not base:
        raise ValueError("serve.app: give model=<base model directory> (or model.path in the recipe)")
    adapters = {k: _adapter_dir(v) for k, v in {**s.adapters, **parse_pairs(args.get("adapters"))}.items()}
    full = {k: _model_dir(v, f"model {k}") for k, v in {**s.models, **parse_pairs(args.get("models"))}.items()}
    paths = {s.model_id: _model_dir(base, "base model"), **full}
    clashes = (set(adapters) & set(paths)) | ({s.model_id} & set(full))
    if clashes:
        raise ValueError(f"serve.app: model id(s) {sorted(clashes)} used twice")
    recipe_json = recipe.model_dump(mode="json")
    engines = {
        model_id: Engine.options(name=engine_name(model_id, model_id == s.model_id), **with_env(engine_options(s)))
        .bind(path, recipe_json, adapters if model_id == s.model_id else {})
        for model_id, path in paths.items()
    }
    return Gateway.options(**with_env(gateway_options(s))).bind(engines, paths, sorted(adapters), recipe_json)
