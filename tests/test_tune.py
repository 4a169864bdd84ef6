"""Ray Tune sweeps: the recipe's space becomes Tune's, bad input stops in one line before any
trial, and a real sweep of tiny trials stops some early with ASHA, writes its report and the best
recipe, and resumes without training a finished trial again.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import one_line_error
from test_train import build_data

from pipelines.config import load_recipe
from tune.space import apply_trial, best_recipe, param_space

# Tiny trials: 8 steps of 1 worker x 2 rows x 2 accumulated (the recipe's 2 workers' batch),
# evaluated every 2 steps, so that ASHA (grace 2, halving) has rungs at 2 and 4 to stop at. One
# trial at a time: which of two concurrent trials reaches a rung first (and is not compared) is
# up to timing, while seeded samples trained one after another always meet the same cut-offs.
SWEEP = ["method=lora", "training.micro_batch_size=2", "training.eval_batches=1", "training.log_every=1",
         "schedule.warmup_steps=1", "tune.trial.max_steps=8", "tune.trial.eval_every=2", "tune.grace_period=2",
         "tune.num_samples=4", "tune.max_concurrent_trials=1", "tune.space.lr=[1e-5, 3e-2]"]


def run_cli(capsys, *argv: str) -> str:
    from tune.sweep import run

    return one_line_error(capsys, run, list(argv))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return build_data(tmp_path_factory.mktemp("tune"))


# ------------------------------------------------------------------ the space, without Ray


def test_the_recipe_space_becomes_tune_domains():
    from ray.tune.search.sample import Categorical, Float, LogUniform

    space = param_space(load_recipe(None).tune)
    assert set(space) == {"r", "alpha_multiple", "lr"}
    assert isinstance(space["r"], Categorical) and space["r"].categories == [4, 8, 16, 32]
    assert isinstance(space["lr"], Float) and (space["lr"].lower, space["lr"].upper) == (1e-5, 1e-3)
    assert isinstance(space["lr"].sampler, LogUniform)
    with_method = param_space(load_recipe(None, ["tune.space.method=[lora, qlora]"]).tune)
    assert with_method["method"].categories == ["lora", "qlora"]


def test_a_trial_trains_the_sampled_values_on_the_recipes_global_batch():
    recipe = load_recipe(None, ["tune.trial.max_steps=30", "tune.trial.eval_every=5"])
    trial = apply_trial(recipe, {"r": 16, "alpha_multiple": 2, "lr": 3e-4, "method": "lora"})
    assert (trial.lora.r, trial.lora.alpha, trial.optimizer.lr, trial.method) == (16, 32, 3e-4, "lora")
    assert (trial.training.max_steps, trial.training.eval_every, trial.training.checkpoint_every) == (30, 5, 5)
    # One worker accumulating two micro-batches sees what the recipe's two workers see in a step.
    assert (trial.scaling.num_workers, trial.training.grad_accum, trial.training.eval_batches) == (1, 2, 16)
    final = best_recipe(recipe, {"r": 16, "alpha_multiple": 2, "lr": 3e-4})
    assert (final.lora.r, final.lora.alpha, final.optimizer.lr) == (16, 32, 3e-4)
    assert (final.training, final.scaling) == (recipe.training, recipe.scaling)  # the final run's own budget


@pytest.mark.parametrize("override, message", [
    ("tune.space.r=[]", "tune.space.r: give at least one choice"),
    ("tune.space.lr=[1e-3, 1e-5]", "tune.space.lr: expected [low, high] with 0 < low < high"),
    ("tune.space.alpha_multiple=[2, 2]", "tune.space.alpha_multiple: choices must be unique"),
    ("tune.metric=accuracy", "tune.metric: Input should be 'eval_loss' or 'rouge_l'"),
    ("tune.metric=rouge_l", "ASHA cannot stop on it"),
    ("tune.grace_period=100000", "tune.grace_period=100000 must be below the"),
    ("tune.trial.num_workers=3", "tune.trial.num_workers=3 must divide"),
    ("method=full", "(method: full), so LoRA rank and alpha change nothing"),
    ("tune.space.method=[lora, qlora]", "recipe of a trial with ['lora.r=4', 'lora.alpha=4', 'optimizer.lr=1e-05', "
                                        "'method=qlora']: (top level): qlora runs on the ddp strategy"),
])
def test_a_bad_space_stops_in_one_line_before_ray(capsys, monkeypatch, tmp_path, override, message):
    import tune.sweep

    monkeypatch.setattr(tune.sweep, "init_ray", lambda: pytest.fail("Ray was started"))
    extra = ["--set", "method=lora", "--set", "training.strategy=deepspeed"] if "qlora" in override else []
    err = run_cli(capsys, "--output", str(tmp_path), "--data", str(tmp_path), "--set", override, *extra)
    assert message in err


def test_a_metric_no_trial_would_report(capsys, monkeypatch, data, tmp_path):
    import tune.sweep

    monkeypatch.setattr(tune.sweep, "init_ray", lambda: pytest.fail("Ray was started"))
    no_eval = tmp_path / "data"
    (no_eval / "sft").mkdir(parents=True)
    (no_eval / "sft" / "train").symlink_to(data / "sft" / "train")
    (no_eval / "manifest.json").write_text((data / "manifest.json").read_text())
    err = run_cli(capsys, "--data", str(no_eval), "--output", str(tmp_path / "out"), *sum((["--set", s] for s in SWEEP), []))
    assert "tune.metric=eval_loss: no trial would report it" in err


def test_trials_the_cluster_cannot_hold(capsys, ray_session, data, tmp_path):
    err = run_cli(capsys, "--data", str(data), "--output", str(tmp_path), *sum((["--set", s] for s in SWEEP), []),
                  "--set", "tune.trial.num_workers=2", "--set", "scaling.cpus_per_worker=1")
    assert "one trial needs 2 worker(s) x 1 CPU plus 1 CPU for data loading, but the Ray cluster has 2 CPU(s)" in err
    assert not (tmp_path / "trials").exists()


def test_a_data_fraction_keeps_the_start_of_every_training_shard(data, tmp_path):
    import pyarrow.parquet as pq

    from tune.sweep import data_subset

    subset = data_subset(data, 0.25, tmp_path / "subset")
    rows = {split: pq.read_table(subset / "sft" / split).num_rows for split in ("train", "eval")}
    full = {split: pq.read_table(data / "sft" / split) for split in ("train", "eval")}
    assert rows == {"train": round(full["train"].num_rows * 0.25), "eval": full["eval"].num_rows}
    assert pq.read_table(subset / "sft" / "train").equals(full["train"].slice(0, rows["train"]))
    manifest = json.loads((subset / "manifest.json").read_text())
    assert manifest["base_model"] == json.loads((data / "manifest.json").read_text())["base_model"]
    assert data_subset(data, 1, tmp_path / "whole") == data  # nothing copied


# ------------------------------------------------------------------ a real sweep


@pytest.fixture(scope="module")
def swept(ray_session, data, tmp_path_factory) -> tuple[Path, dict]:
    from tune.sweep import sweep

    out = tmp_path_factory.mktemp("sweep")
    return out, sweep(load_recipe(None, SWEEP), data, out)


def test_a_sweep_stops_trials_early_and_reports(swept):
    out, summary = swept
    assert summary["trials"] == 4 and summary["errors"] == 0
    rows = {row["trial"]: row for row in summary["rows"]}
    stopped = [row for row in rows.values() if row["status"] == "stopped early"]
    assert stopped, "ASHA stopped no trial"
    for row in rows.values():
        assert [step for step, _ in row["curve"]] == list(range(2, row["step"] + 1, 2))
        assert row["step"] == 8 or row["status"] == "stopped early"
    # Each trial trained for real, in its own directory, with the sampled values.
    for trial, row in rows.items():
        ran = load_recipe(out / "trials" / trial / "recipe.yaml")
        assert (ran.lora.r, ran.lora.alpha, ran.scaling.num_workers) == (row["r"], row["alpha"], 1)
        assert ran.optimizer.lr == pytest.approx(row["lr"], rel=1e-5)
        logged = (out / "trials" / trial / "finetune" / "metrics.jsonl").read_text().splitlines()
        assert (json.loads(logged[-1])["step"] == 8) == (row["status"] == "completed")  # stopped means stopped
    best = summary["best"]
    assert best["eval_loss"] == min(r["eval_loss"] for r in rows.values() if r["status"] == "completed")
    exported = load_recipe(out / "best_recipe.yaml")
    assert (exported.lora.r, exported.lora.alpha) == (best["r"], best["alpha"])
    assert exported.optimizer.lr == pytest.approx(best["lr"], rel=1e-5)
    for name in ("sweep.md", "sweep.html", "plots/metric_vs_lr.png", "plots/metric_vs_rank.png",
                 "plots/learning_curves.png"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "sweep.md").read_text()
    assert "stopped early" in report and "continual pre-training is not part of a sweep" in report
    assert "on 64 packed training rows of 128 tokens" in report and "global batch of 4 rows" in report


def test_a_resumed_sweep_trains_no_finished_trial_again(swept, data, capsys):
    from tune.sweep import run

    out, summary = swept
    logs = {p: p.stat().st_mtime_ns for p in out.glob("trials/*/finetune/metrics.jsonl")}
    assert len(logs) == 4
    err = run_cli(capsys, "--data", str(data), "--output", str(out), *sum((["--set", s] for s in SWEEP), []))
    assert "already holds a sweep: pass --resume" in err
    with pytest.raises(SystemExit) as exit_:
        run(["--data", str(data), "--output", str(out), "--resume", *sum((["--set", s] for s in SWEEP), [])])
    assert exit_.value.code == 0
    resumed = json.loads((out / "sweep.json").read_text())
    assert resumed["trials"] == 4 and resumed["best"] == summary["best"]
    assert {p: p.stat().st_mtime_ns for p in out.glob("trials/*/finetune/metrics.jsonl")} == logs
    assert yaml.safe_load((out / "best_recipe.yaml").read_text())["lora"]["r"] == summary["best"]["r"]
