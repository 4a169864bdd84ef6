"""The machines: cluster configs pass Ray's own validation and hold the recipes; the image, the
runtime env and the job specs point at things that exist."""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from pipelines.config import load_recipe, shipped_recipes

ROOT = Path(__file__).resolve().parents[1]
PLATFORM = ROOT / "platform"
CLUSTERS = [ROOT / "cluster.yaml", PLATFORM / "cluster-onprem.yaml"]
JOBS = sorted((PLATFORM / "jobs").glob("*.sh"))
GPU_RECIPES = [name for name in sorted(shipped_recipes()) if load_recipe(name).scaling.use_gpu]


def ray_validated(path: Path) -> dict:
    """What `ray up` does before it touches a cloud: fill in defaults, then check the schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load(path.read_text()))
    validate_config(config)
    return config


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.name)
def test_cluster_configs_pass_ray_validation(path):
    config = ray_validated(path)
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert config["docker"]["image"].endswith(f"/medray:{version}")
    for local in config["file_mounts"].values():
        assert (ROOT / local).exists(), local
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start  # the Jobs API is reached through a tunnel only


def test_validation_catches_a_typo():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["available_node_types"]["gpu_worker"]["max_worker"] = 4
    with pytest.raises(Exception, match="max_worker"):
        validate_config(prepare_config(config))


def test_onprem_config_lists_its_hosts():
    config = ray_validated(PLATFORM / "cluster-onprem.yaml")
    provider = config["provider"]
    assert provider["type"] == "local" and provider["head_ip"] not in provider["worker_ips"]
    assert config["max_workers"] == len(provider["worker_ips"])


@pytest.mark.parametrize("name", GPU_RECIPES)
def test_gpu_nodes_hold_every_gpu_recipe(name):
    config = ray_validated(ROOT / "cluster.yaml")
    gpu_node = config["available_node_types"]["gpu_worker"]["resources"]
    s, serve = load_recipe(name).scaling, load_recipe(name).serve
    per_node = min(gpu_node["GPU"] // s.gpus_per_worker, gpu_node["CPU"] // s.cpus_per_worker)
    assert per_node >= 1
    assert math.ceil(s.num_workers / per_node) <= config["available_node_types"]["gpu_worker"]["max_workers"]
    assert serve.gpus_per_replica <= gpu_node["GPU"] and serve.cpus_per_replica <= gpu_node["CPU"]


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.name)
def test_every_node_mounts_the_recipes_shared_storage(path):
    volumes = [opt.split()[1].split(":")[1] for opt in ray_validated(path)["docker"]["run_options"]
               if opt.startswith("--volume")]
    for name in GPU_RECIPES:
        recipe = load_recipe(name)
        paths = [recipe.output_dir, recipe.model.path, *recipe.data.inputs]
        assert all(any(p.startswith(v + "/") for v in volumes) for p in paths), (name, paths, volumes)


def test_image_installs_the_project_with_pinned_dependencies():
    dockerfile = (PLATFORM / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+-devel-", dockerfile, re.M)  # nvcc for DeepSpeed's ops
    assert "download.pytorch.org/whl/cu" in dockerfile
    for copied in re.findall(r"^COPY (\S+)", dockerfile, re.M):
        assert (ROOT / copied).exists(), copied
    pins = {}
    for line in (PLATFORM / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            req = Requirement(line)
            assert str(req.specifier).startswith("=="), line
            pins[req.name.lower()] = str(req.specifier)[2:]
    assert "torch" not in pins  # the CUDA build comes from PyTorch's index
    project = (ROOT / "pyproject.toml").read_text()
    for name, version in re.findall(r'"(ray|transformers|peft|bitsandbytes|deepspeed)(?:\[[^]]*\])?==([^"]+)"', project):
        assert pins[name] == version


def test_runtime_env_is_valid_and_keeps_artifacts_out():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((PLATFORM / "runtime_env.yaml").read_text())
    assert set(env) <= set(RuntimeEnv.known_fields)
    RuntimeEnv(**env)  # types checked by Ray
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert {".git/", ".venv/", "runs/"} <= set(env["excludes"])
    assert not (PLATFORM / "__init__.py").exists()  # `platform` would shadow the standard library


@pytest.mark.parametrize("script", JOBS, ids=lambda p: p.name)
def test_job_specs_name_real_entry_points_and_recipes(script):
    text = script.read_text()
    subprocess.run(["sh", "-n", str(script)], check=True)
    for module in re.findall(r"python -m ([\w.]+)", text):
        spec = importlib.util.find_spec(module)
        assert spec and "def main(" in Path(spec.origin).read_text(), module
    if "ray job submit" in text:
        assert "--runtime-env platform/runtime_env.yaml" in text and "--working-dir ." in text
    for recipe in re.findall(r"jobs/\w+\.sh ([a-z]\w+)", text):  # the usage examples
        assert recipe in shipped_recipes()


def test_there_is_a_job_spec_per_step():
    assert {p.stem for p in JOBS} == {"prepare", "train", "evaluate", "serve"}
