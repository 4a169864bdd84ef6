"""The recipe's search space as a Ray Tune param_space, and a trial's config applied to a recipe.

A trial's config holds only the sampled values (r, alpha_multiple, lr, method); everything
else a trial trains with comes from the recipe and its `tune.trial` budget, so the recipe a
trial ran is rebuilt the same way for the report, the exported recipe and a resumed sweep.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from pipelines.config import Recipe, RecipeError, TuneConfig, format_validation_error, apply_override


def param_space(tune_cfg: TuneConfig) -> dict[str, Any]:
    from ray import tune

    space = tune_cfg.space
    params = {
        "r": tune.choice(space.r),
        "alpha_multiple": tune.choice(space.alpha_multiple),
        "lr": tune.loguniform(*space.lr),
    }
    if space.method:
        params["method"] = tune.choice(space.method)
    return params


def trial_steps(recipe: Recipe) -> int | None:
    """The optimizer steps a trial runs, when the recipe fixes them (else epochs decide)."""
    return recipe.tune.trial.max_steps or recipe.training.max_steps


def trial_overrides(recipe: Recipe, config: dict[str, Any]) -> list[str]:
    """`--set` assignments that turn the recipe into what a trial trains: the sampled values,
    then the trial budget. The same list reproduces the trial with `python -m pipelines.train`."""
    return sampled_overrides(config) + budget_overrides(recipe)


def sampled_overrides(config: dict[str, Any]) -> list[str]:
    r = int(config["r"])
    sets = [f"lora.r={r}", f"lora.alpha={r * config['alpha_multiple']:g}", f"optimizer.lr={config['lr']:.6g}"]
    if "method" in config:
        sets.append(f"method={config['method']}")
    return sets


def budget_overrides(recipe: Recipe) -> list[str]:
    """How a trial's run differs from the recipe's own: steps, evaluation, workers."""
    trial, t, s = recipe.tune.trial, recipe.training, recipe.scaling
    sets = []
    if trial.max_steps:
        sets.append(f"training.max_steps={trial.max_steps}")
    eval_every = trial.eval_every or t.eval_every
    # Every report a trial makes must carry the metric (Tune checks it): checkpoint on evaluations.
    sets += [f"training.eval_every={eval_every}", f"training.checkpoint_every={eval_every}"]
    if trial.num_workers != s.num_workers:
        # Keep the recipe's global batch, so the learning rate found is the one the final run needs,
        # and its eval set's size (eval_batches counts per worker), so the eval losses compare.
        scale = s.num_workers / trial.num_workers
        sets += [f"scaling.num_workers={trial.num_workers}", f"training.grad_accum={round(t.grad_accum * scale)}",
                 f"training.eval_batches={max(1, round(t.eval_batches * scale))}"]
    if s.threads_per_worker is None:
        # Trials share the nodes: the threads Ray grants a worker, not the node's CPUs.
        sets.append(f"scaling.threads_per_worker={max(1, int(s.cpus_per_worker))}")
    return sets


def apply_trial(recipe: Recipe, config: dict[str, Any]) -> Recipe:
    """The recipe a trial trains: validated like any recipe, so a bad combination is a RecipeError."""
    return with_overrides(recipe, trial_overrides(recipe, config), f"of a trial with {sampled_overrides(config)}")


def best_recipe(recipe: Recipe, config: dict[str, Any]) -> Recipe:
    """The recipe with a trial's sampled values and the recipe's own budget: the final run."""
    return with_overrides(recipe, sampled_overrides(config), "of the best trial")


def with_overrides(recipe: Recipe, overrides: list[str], what: str) -> Recipe:
    tree = recipe.model_dump(mode="json")
    for assignment in overrides:
        apply_override(tree, assignment)
    try:
        return Recipe.model_validate(tree)
    except ValidationError as err:
        raise RecipeError(format_validation_error(what, err)) from None


def first_config(recipe: Recipe) -> dict[str, Any]:
    """A config of the space (its first choices): for what every trial's recipe shares."""
    space = recipe.tune.space
    config = {"r": space.r[0], "alpha_multiple": space.alpha_multiple[0], "lr": space.lr[0]}
    return {**config, "method": space.method[0]} if space.method else config


def check_space(recipe: Recipe) -> None:
    """Every method and the trial budget combine into valid recipes; raises RecipeError before Ray starts."""
    trial, s = recipe.tune.trial, recipe.scaling
    if (s.num_workers * recipe.training.grad_accum) % trial.num_workers:
        raise RecipeError(f"tune.trial.num_workers={trial.num_workers} must divide scaling.num_workers x "
                          f"training.grad_accum ({s.num_workers} x {recipe.training.grad_accum}) to keep the global batch")
    space = recipe.tune.space
    if recipe.method == "full" and not space.method:
        raise RecipeError("tune.space: the recipe fine-tunes every weight (method: full), so LoRA rank and alpha "
                          "change nothing; set tune.space.method (lora, qlora) or sweep a LoRA recipe")
    for method in space.method or [recipe.method]:
        apply_trial(recipe, {**first_config(recipe), "method": method} if space.method else first_config(recipe))
    steps = trial_steps(recipe)
    t = recipe.tune
    if steps and t.scheduler == "asha" and t.grace_period >= steps:
        raise RecipeError(f"tune.grace_period={t.grace_period} must be below the {steps} steps a trial runs, "
                          "or ASHA can never stop a trial early")
