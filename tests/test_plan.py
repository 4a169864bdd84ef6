"""Capacity planner: its figures against published sizes and the studies' own numbers."""

from __future__ import annotations

import json

import pytest

from pipelines import plan as planner
from pipelines.cli import UserError
from pipelines.config import load_recipe, shipped_recipes
from pipelines.plan import GB, KNOWN_MODELS, make_plan

STUDY = {"examples": 4_354_321, "tokens_per_example": 300}  # radiology study: kept reports, ~300 tokens


def radiology(method: str, gpus: int, **overrides):
    recipe = load_recipe(f"radiology_{method}_70b", [f"{k}={v}" for k, v in overrides.items()])
    return make_plan(recipe, gpus=gpus, price_per_gpu_hour=4.0, **STUDY)


@pytest.mark.parametrize("key, published", [
    ("llama-3-70b", 70.6e9), ("llama-2-70b", 69.0e9), ("llama-2-13b", 13.0e9), ("llama-2-7b", 6.74e9)])
def test_known_architectures_have_their_published_sizes(key, published):
    assert KNOWN_MODELS[key].num_params == pytest.approx(published, rel=0.005)


def test_parameter_count_matches_transformers():
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    a = planner.architecture(load_recipe("local").model)  # grouped-query attention, like Llama-3
    config = LlamaConfig(hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
                         num_hidden_layers=a.num_layers, num_attention_heads=a.num_heads,
                         num_key_value_heads=a.num_kv_heads, vocab_size=a.vocab_size, tie_word_embeddings=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert a.num_params == sum(p.numel() for p in model.parameters())


def test_lora_sizes_match_med42():
    # Med42: LoRA r=8 on q, k, v, o, gate, up, down trains 20M parameters at 7B and 104M at 70B.
    assert KNOWN_MODELS["llama-2-7b"].lora_params(8, "all-linear") == pytest.approx(20e6, rel=0.01)
    assert KNOWN_MODELS["llama-2-70b"].lora_params(8, "all-linear") == pytest.approx(104e6, rel=0.01)


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_every_shipped_recipe_plans(name, tmp_path):
    # A private output_dir: a manifest left by an earlier run must not change the figures.
    result = make_plan(load_recipe(name, [f"output_dir={tmp_path}"]))
    assert result.flops_per_token > 0 and result.memory.total > 0
    assert "per GPU" in planner.render(result)


def test_full_fine_tuning_of_70b_needs_about_a_terabyte_of_state():
    p = radiology("full", 8, **{"training.offload_optimizer": "false"})
    state = (p.memory.weights + p.memory.gradients + p.memory.optimizer) * p.gpus  # ZeRO-3 shards all three
    assert state == pytest.approx(16 * p.num_params, rel=0.001)  # 2 + 2 + 12 bytes per parameter
    assert 1.05e12 < state < 1.2e12
    assert not p.fits  # 141 GB of state per GPU on 8 x 80 GB
    assert not make_plan(load_recipe("radiology_full_70b"), gpus=1).fits
    assert 15 <= p.min_gpus_without_offload <= 24 and p.min_gpus_with_offload <= 8


def test_full_fine_tuning_fits_8_h100_only_with_optimizer_offload():
    p = radiology("full", 8)  # the recipe offloads optimizer state to CPU memory
    assert p.offload and p.fits and p.memory.optimizer == 0
    assert p.memory.host_per_node == pytest.approx(12 * p.num_params, rel=0.001)  # fp32 master + Adam moments
    assert p.memory.host_per_node < p.gpu.host_memory_bytes
    assert radiology("full", 64, **{"training.offload_optimizer": "false"}).fits


def test_qlora_70b_weights_take_35_to_40_gb_and_fit_one_gpu():
    p = radiology("qlora", 8)
    assert 35 * GB <= p.memory.quantized <= 40 * GB
    assert p.fits and p.min_gpus == 1
    single = make_plan(load_recipe("radiology_qlora_70b"), gpus=1)
    assert single.memory.total == pytest.approx(p.memory.total)  # data parallel: nothing sharded


def test_double_quantization_saves_about_3_gb_at_70b():
    with_dq = radiology("qlora", 8).memory.quantized
    without = radiology("qlora", 8, **{"quantization.double_quant": "false"}).memory.quantized
    assert 2.5 * GB < without - with_dq < 4 * GB  # QLoRA paper: ~0.37 bits per parameter


def test_checkpointing_cuts_activations_by_an_order_of_magnitude():
    m = radiology("qlora", 8).memory
    assert m.checkpointing and m.activations * 5 < m.activations_without_checkpointing
    assert not radiology("qlora", 8, **{"model.gradient_checkpointing": "false"}).fits


def test_compute_follows_6n_and_4n_per_token():
    full, qlora = radiology("full", 8), radiology("qlora", 8)
    tokens = STUDY["examples"] * STUDY["tokens_per_example"]
    assert full.tokens == qlora.tokens == tokens
    attention = 12 * 80 * 8192 * 2048
    assert full.flops_per_token == 6 * full.num_params + attention
    assert qlora.flops_per_token == pytest.approx(4 * qlora.num_params + attention, rel=0.01)


def test_full_costs_about_twice_the_gpu_time_of_qlora():
    # The radiology study: full fine-tuning took about twice QLoRA's GPU time on 8 x H100. Here
    # 1.5x comes from 6N vs 4N FLOPs and the rest from the CPU optimizer steps of offloading.
    ratio = radiology("full", 8).gpu_hours / radiology("qlora", 8).gpu_hours
    assert 1.6 < ratio < 2.4
    no_offload = radiology("full", 64, **{"training.offload_optimizer": "false"})
    assert no_offload.gpu_hours / radiology("qlora", 64).gpu_hours == pytest.approx(1.47, abs=0.05)


def test_hours_and_cost_follow_mfu_and_price():
    p = radiology("qlora", 8)
    assert p.hours == pytest.approx(p.total_flops / (8 * 989e12 * 0.4) / 3600)
    assert 25 < p.hours < 45  # about a day and a half on one node at 40 % MFU
    assert p.cost == pytest.approx(p.gpu_hours * 4.0)
    assert radiology("qlora", 64).hours == pytest.approx(p.hours / 8)


def test_model_shape_is_read_from_a_model_directory(tmp_path):
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128, "vocab_size": 512}))
    p = make_plan(load_recipe("radiology_qlora_70b", [f"model.path={model}"]))
    assert p.arch.name == "my-model" and p.arch.num_layers == 2


def test_unknown_model_and_bad_arguments_are_one_line_errors(capsys):
    with pytest.raises(UserError, match="not a known architecture"):
        make_plan(load_recipe("radiology_qlora_70b", ["model.path=/models/Mistral-7B"]))
    for argv, needle in [(["--gpus", "0"], "--gpus"), (["--mfu", "1.5"], "--mfu"),
                         (["--gpu-type", "tpu"], "--gpu-type"), (["--stage", "pretrain", "--recipe", "radiology_full_70b"],
                                                                 "pre-training")]:
        with pytest.raises(SystemExit) as exit_:
            planner.run(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and needle in err and err.strip().count("\n") == 0


def test_cli_prints_the_plan(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        planner.run(["--recipe", "radiology_full_70b", "--gpus", "64", "--examples", "4354321",
                     "--tokens-per-example", "300", "--price-per-gpu-hour", "4"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "64 x H100" in out and "GPU-hours" in out and "$" in out and "fits" in out
