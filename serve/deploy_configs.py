"""`serve deploy` configs generated from a recipe, for this project's engine or for vLLM.

    python -m serve.deploy_configs [--recipe R] [--set K=V ...] [--model DIR] [--adapters ID=DIR,...] \\
        [--models ID=DIR,...] --output serve/config.yaml
    python -m serve.deploy_configs --engine vllm --recipe radiology_qlora_70b [--model DIR] \\
        --adapter-store s3://BUCKET/PREFIX [--models ID=DIR,...] --output DIR/vllm.yaml

The first is Ray Serve's own config for `serve.app:app`: the recipe stays the source of
truth, and its replica counts, autoscaling and resources are written out for operators.

The second serves the same base and adapters with Ray Serve LLM's vLLM engine
(`ray.serve.llm:build_openai_app`) on a GPU cluster. It installs the chat template of
`pipelines.prompts`, so vLLM renders the prompt training used, and writes a
`generation_config.json` beside the YAML whose end-of-sequence ids include the format's
end-of-turn token: vLLM stops on those, and a base model whose own file lacks the end-of-turn
token would otherwise answer until max_tokens. Run it where the model directory is readable
(the cluster's shared storage). Ray Serve LLM loads adapters from object storage only: upload
each adapter directory to `<adapter-store>/<id>/`; a request then names `<base id>:<id>`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from pipelines.cli import UserError, main_wrapper, recipe_parser
from pipelines.config import Recipe, load_recipe
from pipelines.prompts import CHAT_TEMPLATES

VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def medray_config(recipe: Recipe, recipe_ref: str, overrides: list[str], model: str,
                  adapters: dict[str, str], models: dict[str, str]) -> dict[str, Any]:
    """Ray Serve's config for `serve.app:app` on this recipe."""
    from serve.app import engine_name, engine_options, gateway_options, with_env

    s = recipe.serve

    def deployment(name: str, options: dict) -> dict:
        return {"name": name, **with_env(options)}

    args: dict[str, Any] = {"recipe": recipe_ref}
    if overrides:
        args["set"] = ",".join(overrides)
    args["model"] = model
    if adapters:
        args["adapters"] = adapters
    if models:
        args["models"] = models
    deployments = [deployment("Gateway", gateway_options(s)), deployment("Engine", engine_options(s))]
    deployments += [deployment(engine_name(m, base=False), engine_options(s)) for m in models]
    return _checked({"proxy_location": "EveryNode", "http_options": {"host": s.host, "port": s.port},
                     "applications": [{"name": "medray", "route_prefix": "/", "import_path": "serve.app:app",
                                       "args": args, "deployments": deployments}]})


def vllm_config(recipe: Recipe, model: str, adapter_store: str | None, models: dict[str, str],
                generation_config_dir: str) -> dict[str, Any]:
    """Ray Serve LLM's config serving the base (+ adapters) and fully fine-tuned models on vLLM."""
    from serve.app import replica_options

    s = recipe.serve
    # vLLM sizes its replicas' GPUs from tensor_parallel_size; only the scaling comes from here.
    target = s.target_ongoing_requests or s.max_batch_size
    scaling = {k: v for k, v in replica_options(s, 0, 0, target).items() if k != "ray_actor_options"}
    engine = {
        "chat_template": CHAT_TEMPLATES[recipe.model.chat_format],
        "generation_config": generation_config_dir,
        "dtype": s.dtype or recipe.model.dtype,
        "trust_remote_code": False,
        "tensor_parallel_size": max(1, int(s.gpus_per_replica)),
        "max_num_seqs": s.max_batch_size,
        "enable_log_requests": False,  # request text may hold PHI
        # vLLM quantizes to 4 bits while loading with its bitsandbytes loader; otherwise
        # weights come from safetensors only.
        **({"quantization": "bitsandbytes"} if s.load_in_4bit else {"load_format": "safetensors"}),
    }

    def llm(model_id: str, source: str, lora: bool) -> dict:
        config = {"model_loading_config": {"model_id": model_id, "model_source": source},
                  "engine_kwargs": dict(engine), "deployment_config": dict(scaling)}
        if lora:
            rank = next((r for r in VLLM_LORA_RANKS if r >= recipe.lora.r), VLLM_LORA_RANKS[-1])
            config["engine_kwargs"] |= {"enable_lora": True, "max_lora_rank": rank,
                                        "max_loras": s.max_adapters_per_replica}
            config["lora_config"] = {"dynamic_lora_loading_path": adapter_store,
                                     "max_num_adapters_per_replica": s.max_adapters_per_replica}
        return config

    configs = [llm(s.model_id, model, adapter_store is not None)]
    configs += [llm(model_id, path, False) for model_id, path in models.items()]
    return _checked({"proxy_location": "EveryNode", "http_options": {"host": s.host, "port": s.port},
                     "applications": [{"name": "medray-vllm", "route_prefix": "/",
                                       "import_path": "ray.serve.llm:build_openai_app",
                                       "args": {"llm_configs": configs}}]})


def write_generation_config(model_dir: str, chat_format: str, out_dir: Path) -> None:
    """generation_config.json whose eos ids are the ones this project's server stops on."""
    from pipelines.models import load_tokenizer
    from pipelines.prompts import stop_token_ids

    tokenizer = load_tokenizer(model_dir, chat_format)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": stop_token_ids(tokenizer, chat_format),
         "pad_token_id": tokenizer.pad_token_id}, indent=2) + "\n")


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the chat template) as literal blocks, so the YAML shows them as is."""

    def represent_str(self, text: str) -> yaml.Node:
        return self.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_Dumper.add_representer(str, _Dumper.represent_str)


def to_yaml(config: dict) -> str:
    return yaml.dump(config, Dumper=_Dumper, sort_keys=False, width=120)


def _checked(config: dict) -> dict:
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)
    return config


def _pairs(text: str | None) -> dict[str, str]:
    from serve.app import parse_pairs

    try:
        return parse_pairs(text)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    parser = recipe_parser(__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["medray", "vllm"], default="medray")
    parser.add_argument("--model", default=None,
                        help="base model directory as the replicas see it (default: the recipe's model.path)")
    parser.add_argument("--adapters", default=None, help="medray: ID=DIR,... LoRA adapters of the base")
    parser.add_argument("--adapter-store", default=None,
                        help="vllm: s3://, gs:// or abfss:// prefix holding one folder per adapter id")
    parser.add_argument("--models", default=None, help="ID=DIR,... fully fine-tuned models")
    args = parser.parse_args(argv)
    if args.output is None:
        raise UserError("give --output FILE.yaml")
    recipe = load_recipe(args.recipe, args.overrides)
    model = args.model or recipe.model.path
    if not model:
        raise UserError("give --model DIR (the recipe has no model.path)")
    out = Path(args.output)
    if args.engine == "medray":
        config = medray_config(recipe, args.recipe or recipe.name, args.overrides, model,
                               _pairs(args.adapters), _pairs(args.models))
        header = "# Ray Serve config for serve.app:app, generated by `python -m serve.deploy_configs`.\n"
    else:
        if not (Path(model) / "config.json").is_file():
            raise UserError(f"model {model}: not readable here; run where the model directory is mounted")
        generation_dir = (out.parent / "generation_config").resolve()
        write_generation_config(model, recipe.model.chat_format, generation_dir)
        config = vllm_config(recipe, model, args.adapter_store, _pairs(args.models), str(generation_dir))
        header = ("# Ray Serve LLM (vLLM) config, generated by `python -m serve.deploy_configs --engine vllm`.\n"
                  "# Adapters: upload each to <dynamic_lora_loading_path>/<id>/ and ask for model <base id>:<id>.\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + to_yaml(config))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    main_wrapper(main)()
