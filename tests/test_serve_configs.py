"""The app builder and the generated `serve deploy` configs (Ray Serve's own, and Ray Serve LLM's for vLLM)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipelines import prompts
from pipelines.config import TinyModelConfig, load_recipe
from pipelines.models import build_tiny_model, load_tokenizer, train_tokenizer
from serve import deploy_configs

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["config.yaml", "cluster.yaml"])
def test_shipped_serve_configs_are_what_their_recipes_generate(name):
    shipped = yaml.safe_load((ROOT / "serve" / name).read_text())
    args = shipped["applications"][0]["args"]
    overrides = args["set"].split(",") if args.get("set") else []
    regenerated = deploy_configs.medray_config(load_recipe(args["recipe"], overrides), args["recipe"], overrides,
                                               args["model"], args.get("adapters", {}), args.get("models", {}))
    assert regenerated == shipped
    app = shipped["applications"][0]
    assert app["import_path"] == "serve.app:app"
    engine = next(d for d in app["deployments"] if d["name"] == "Engine")
    scaling = engine["autoscaling_config"]
    assert scaling["max_replicas"] > scaling["min_replicas"] >= 1
    assert engine["ray_actor_options"]["num_cpus"] > 0 and engine["graceful_shutdown_timeout_s"] > 0


def test_local_config_listens_on_loopback_and_cluster_config_asks_for_gpus():
    local = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    cluster = yaml.safe_load((ROOT / "serve" / "cluster.yaml").read_text())
    assert local["http_options"]["host"] == "127.0.0.1"
    engine = next(d for d in cluster["applications"][0]["deployments"] if d["name"] == "Engine")
    assert engine["ray_actor_options"]["num_gpus"] >= 1


def test_vllm_config_serves_the_same_models_with_the_same_chat_template(tmp_path):
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig  # Ray's own schema; no vLLM needed

    tok = train_tokenizer(["No acute findings."] * 20, 300, "llama3")
    base = tmp_path / "base"
    tok.save_pretrained(base)
    build_tiny_model(TinyModelConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=1, vocab_size=320, max_position_embeddings=64),
                     tok).save_pretrained(base)
    out = tmp_path / "cluster" / "vllm.yaml"
    deploy_configs.main(["--engine", "vllm", "--recipe", "radiology_qlora_70b", "--model", str(base),
                         "--adapter-store", "s3://bucket/medray/adapters", "--models", f"full={base}",
                         "--output", str(out)])
    config = yaml.safe_load(out.read_text())
    app = config["applications"][0]
    assert app["import_path"] == "ray.serve.llm:build_openai_app"
    first, full = app["args"]["llm_configs"]
    for llm in (first, full):
        LLMConfig.model_validate(llm)
        engine = llm["engine_kwargs"]
        # The template vLLM renders is the one training and this project's server use.
        assert engine["chat_template"] == load_tokenizer(base, "llama3").chat_template
        assert engine["trust_remote_code"] is False and engine["quantization"] == "bitsandbytes"
        generation = json.loads((Path(engine["generation_config"]) / "generation_config.json").read_text())
        assert tok.convert_tokens_to_ids(prompts.EOT) in generation["eos_token_id"]
    assert first["model_loading_config"] == {"model_id": "medray-base", "model_source": str(base)}
    assert first["lora_config"]["dynamic_lora_loading_path"] == "s3://bucket/medray/adapters"
    assert first["engine_kwargs"]["enable_lora"] and first["engine_kwargs"]["max_lora_rank"] >= 8
    assert full["model_loading_config"]["model_id"] == "full" and "lora_config" not in full


def test_the_app_refuses_pickled_adapters_and_unknown_arguments(tmp_path):
    from serve.app import app

    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="safetensors"):
        app({"model": str(tmp_path), "adapters": f"x={tmp_path / 'adapter'}"})
    with pytest.raises(ValueError, match="unknown argument"):
        app({"model": str(tmp_path), "adapter": "x=y"})
