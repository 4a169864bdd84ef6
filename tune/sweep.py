"""Sweep LoRA rank, alpha and learning rate with Ray Tune, each trial a Ray Train fine-tuning run.

    python -m tune.sweep [--recipe R] [--data DIR] [--output DIR] [--resume] [--set ...]

The search space, the trial budget, the metric, the scheduler (ASHA by default) and the search
algorithm (Optuna by default) come from the recipe's `tune:` section. Trials fine-tune the
prepared base model (continual pre-training is not part of a sweep). OUTPUT holds the Tune
experiment (`sweep/`, what `--resume` continues), each trial's training run (`trials/<id>/`),
the report (`sweep.md`, `sweep.html`, `sweep.json`, `plots/`) and the best configuration as a
recipe for `pipelines.train` (`best_recipe.yaml`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import pyarrow.parquet as pq

from pipelines.cli import UserError, main_wrapper, parse_recipe, recipe_parser
from pipelines.config import Recipe
from pipelines.raycluster import init_ray
from pipelines.train import check_stage, planned_stages
from pipelines.train_checks import check_data_dir, parquet_files
from tune.release import PLACEMENT_GROUP_FILE, RecordPlacementGroup, ReleaseFinishedTrials
from tune.space import apply_trial, check_space, first_config, param_space, trial_steps

log = logging.getLogger("medray.tune")

EXPERIMENT = "sweep"
# A trial's workers stream their shards through Ray Data read tasks (one CPU each by default):
# leave that much free, or the reads are never scheduled and the trials hang without an error.
DATA_CPUS = 1.0
DRIVER_MEMORY = 512 * 2**20  # bytes, of a trial's own process (imports, datasets' plans)


def run_trial(config: dict, recipe_tree: dict, data_dir: str, output: str) -> None:
    """One Tune trial: the recipe with the sampled values, fine-tuned on Ray Train; the Train
    workers' reports (eval_loss at every evaluation) reach Tune through TuneReportCallback."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.train import train

    recipe = apply_trial(Recipe.model_validate(recipe_tree), config)
    trial_dir = Path(output) / "trials" / ray.tune.get_context().get_trial_id()
    trial_dir.mkdir(parents=True, exist_ok=True)
    record = RecordPlacementGroup(trial_dir / PLACEMENT_GROUP_FILE)
    if recipe.tune.metric == "eval_loss":
        train(recipe, data_dir, trial_dir, stages="finetune", callbacks=[TuneReportCallback(), record])
        return
    # Tune wants the metric in every report: a ROUGE-L trial reports once, when it is measured.
    from tune.rouge import trial_rouge_l

    model = train(recipe, data_dir, trial_dir, stages="finetune", callbacks=[record])["finetune"]
    logged = [json.loads(line) for line in (trial_dir / "finetune" / "metrics.jsonl").read_text().splitlines()]
    evals = [row["eval_loss"] for row in logged if "eval_loss" in row]
    ray.tune.report({"rouge_l": trial_rouge_l(recipe, Path(data_dir), model), "step": logged[-1]["step"],
                     **({"eval_loss": evals[-1]} if evals else {})})


def concurrency(recipe: Recipe) -> int:
    """Trials at once: what the cluster holds beside the data loading, capped by the recipe."""
    import ray

    trial = apply_trial(recipe, first_config(recipe))
    s, t = trial.scaling, recipe.tune
    available = ray.cluster_resources()
    cpus, gpus = available.get("CPU", 0), available.get("GPU", 0)
    fits = math.floor((cpus - DATA_CPUS) / (s.num_workers * s.cpus_per_worker) + 1e-9)
    if s.use_gpu:
        fits = min(fits, math.floor(gpus / (s.num_workers * max(s.gpus_per_worker, 1))))
    if fits < 1:
        need = f"{s.num_workers} worker(s) x {s.cpus_per_worker:g} CPU" + (
            f" x {max(s.gpus_per_worker, 1):g} GPU" if s.use_gpu else "")
        raise UserError(f"tune.trial: one trial needs {need} plus {DATA_CPUS:g} CPU for data loading, but the Ray "
                        f"cluster has {cpus:g} CPU(s) and {gpus:g} GPU(s); lower tune.trial.num_workers or "
                        "scaling.cpus_per_worker")
    wanted = min(t.max_concurrent_trials or fits, t.num_samples)
    if wanted > fits:
        log.warning("tune.max_concurrent_trials=%d: the cluster holds %d trial(s) at once; running %d", wanted,
                    fits, fits)
    return min(wanted, fits)


def check_data(recipe: Recipe, data_dir: Path) -> int:
    """The prepared data suits a trial, and holds what the metric is measured on. Returns the
    packed training rows."""
    trial = apply_trial(recipe, first_config(recipe))
    manifest = check_data_dir(data_dir)
    base = Path(recipe.model.path or manifest["base_model"])
    plan = planned_stages(trial, data_dir, "finetune")
    if not plan:
        raise UserError(f"data.task={recipe.data.task}: there is no fine-tuning stage to sweep")
    [(_, stage, shards)] = plan
    rows = check_stage(trial, stage, shards, manifest, base)
    if recipe.tune.metric == "eval_loss" and not parquet_files(shards / "eval"):
        raise UserError(f"tune.metric=eval_loss: no trial would report it, {shards}/eval holds no packed rows "
                        "(prepare with data.splits.eval > 0)")
    if recipe.tune.metric == "rouge_l":
        from tune.rouge import held_out_examples

        held_out_examples(data_dir, recipe.tune.rouge_examples)
    return rows


def data_subset(data_dir: Path, fraction: float, out: Path) -> Path:
    """The first `fraction` of every training shard (eval shards whole), in the layout of
    `pipelines.prepare`; the base model stays where the manifest names it."""
    if fraction == 1:
        return data_dir
    manifest = check_data_dir(data_dir)
    sft = out / "sft"
    for split in ("train", "eval"):
        (sft / split).mkdir(parents=True, exist_ok=True)
        for f in parquet_files(data_dir / "sft" / split):
            table = pq.read_table(f)
            keep = table.num_rows if split == "eval" else max(1, round(table.num_rows * fraction))
            row_group = pq.ParquetFile(f).metadata.row_group(0).num_rows
            pq.write_table(table.slice(0, keep), sft / split / f.name, row_group_size=row_group)
    (out / "manifest.json").write_text(json.dumps({**manifest, "data_fraction": fraction}))
    return out


def build_tuner(recipe: Recipe, data_dir: Path, out: Path, resume: bool):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    t = recipe.tune
    trainable = tune.with_parameters(run_trial, recipe_tree=recipe.model_dump(mode="json"),
                                     data_dir=str(data_dir.resolve()), output=str(out.resolve()))
    # The trial itself only waits on Ray Train, whose workers hold the CPUs and GPUs: it reserves
    # memory for its process but no CPU (Tune refuses an empty request).
    trainable = tune.with_resources(trainable, {"cpu": 0, "memory": DRIVER_MEMORY})
    experiment = out / EXPERIMENT
    if resume:
        return tune.Tuner.restore(str(experiment.resolve()), trainable, resume_errored=True)
    steps = trial_steps(recipe)
    scheduler = ASHAScheduler(time_attr="step", max_t=steps or 10**9, grace_period=t.grace_period,
                              reduction_factor=t.reduction_factor) if t.scheduler == "asha" else FIFOScheduler()
    search = OptunaSearch(seed=t.seed) if t.search_alg == "optuna" else BasicVariantGenerator(random_state=t.seed)
    return tune.Tuner(
        trainable,
        param_space=param_space(t),
        tune_config=tune.TuneConfig(metric=t.metric, mode=t.resolved_mode, scheduler=scheduler, search_alg=search,
                                    num_samples=t.num_samples, max_concurrent_trials=concurrency(recipe)),
        run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(out.resolve()), verbose=1,
                                  callbacks=[ReleaseFinishedTrials(out / "trials")]),
    )


def sweep(recipe: Recipe, data_dir: str | Path | None = None, output: str | Path | None = None,
          resume: bool = False) -> dict:
    """Run (or continue) the recipe's sweep; returns the report's summary (see tune.report)."""
    from tune.report import write_report

    check_space(recipe)
    out = Path(output or Path(recipe.output_dir) / "sweep")
    experiment = out / EXPERIMENT
    if resume and not experiment.is_dir():
        raise UserError(f"--resume: no earlier sweep in {out} to continue")
    if not resume and experiment.exists():
        raise UserError(f"{out} already holds a sweep: pass --resume to continue it, or choose another --output")
    if data_dir is None:
        from pipelines.prepare import prepare

        prepare(recipe)  # cached: a second sweep of the same recipe reuses the shards
        data_dir = Path(recipe.output_dir) / "data"
    data_dir = Path(data_dir)
    check_data(recipe, data_dir)
    init_ray()
    from ray import tune

    if resume and not tune.Tuner.can_restore(str(experiment.resolve())):
        raise UserError(f"--resume: {experiment} holds no restorable Tune experiment")
    trial_data = data_subset(data_dir, recipe.tune.trial.data_fraction, out / "data_subset")
    started = time.monotonic()
    tuner = build_tuner(recipe, trial_data, out, resume)
    results = tuner.fit()
    return write_report(recipe, results, out, data_dir=trial_data, wall_time_s=time.monotonic() - started)


def main(argv: list[str] | None = None) -> int:
    parser = recipe_parser(__doc__.splitlines()[0])
    parser.add_argument("--data", default=None,
                        help="prepared data directory (default: prepare the recipe's data, cached)")
    parser.add_argument("--resume", action="store_true", help="continue the sweep in --output; finished trials stay")
    args = parser.parse_args(argv)
    recipe = parse_recipe(args)
    if args.address:  # joined only after the checks, so that bad input fails at once
        os.environ["RAY_ADDRESS"] = args.address
    summary = sweep(recipe, args.data, args.output, args.resume)
    print(json.dumps({k: summary[k] for k in ("trials", "stopped_early", "best", "best_recipe", "report")}))
    return 0


run = main_wrapper(main)

if __name__ == "__main__":
    run()
