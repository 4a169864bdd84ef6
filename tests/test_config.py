"""Recipes: every shipped one validates; a bad one fails in one line naming the field."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipelines.config import RecipeError, load_recipe, shipped_recipes


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_every_shipped_recipe_validates(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    if name != "local":
        assert recipe.model.path, "full-scale recipes name a real base model"
        assert recipe.scaling.use_gpu and recipe.scaling.backend == "nccl"


def test_study_hyperparameters_carried_over():
    med42 = load_recipe("med42_lora_70b")
    assert (med42.lora.r, med42.lora.alpha, med42.optimizer.lr, med42.training.epochs) == (8, 16, 1e-4, 8)
    assert med42.optimizer.betas == (0.9, 0.95) and med42.optimizer.weight_decay == 0.1
    assert med42.schedule.warmup_steps == 100 and med42.schedule.min_lr_ratio == 0.1
    assert med42.data.pack_length == 4096 and med42.model.chat_format == "med42"
    assert sum(s.count for s in med42.data.mixture) == 411064 + 295649
    full = load_recipe("radiology_full_70b")
    assert full.method == "full" and full.training.strategy == "deepspeed" and full.training.zero_stage == 3
    assert load_recipe("radiology_qlora_70b").quantization.double_quant
    cpt = load_recipe("continual_pretrain_sft_13b")
    assert cpt.pretrain.enabled and cpt.optimizer.name == "adafactor" and cpt.schedule.warmup_ratio == 0.03


def test_overrides_are_typed():
    recipe = load_recipe(None, ["method=full", "scaling.num_workers=1", "optimizer.lr=5e-5",
                                "lora.target_modules=[q_proj, v_proj]"])
    assert recipe.method == "full" and recipe.scaling.num_workers == 1
    assert recipe.optimizer.lr == 5e-5 and recipe.lora.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("override, field", [
    ("method=half", "method"),
    ("scaling.num_workers=0", "scaling.num_workers"),
    ("training.typo=1", "training.typo"),
    ("model.tiny.intermediate_size=688", "model.tiny"),
    ("scaling.backend=nccl", "scaling"),
    ("schedule.warmup_ratio=0.1", "schedule"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(RecipeError) as err:
        load_recipe(None, [override])
    message = str(err.value)
    assert field in message and "\n" not in message


def test_missing_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="no such file"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


def test_cli_prints_one_line_and_exits_2():
    proc = subprocess.run([sys.executable, "-m", "pipelines.prepare", "--set", "data.pack_length=3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "data.pack_length" in proc.stderr
    assert "Traceback" not in proc.stderr
