"""The sweep report: sweep.json, sweep.md and sweep.html (one set of sections rendered twice,
as the evaluation report does), PNG plots, and the best configuration as `best_recipe.yaml`."""

from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path

import pyarrow.parquet as pq

from pipelines.config import Recipe, dump_recipe
from pipelines.eval_report import Image, Section, Table, num, render_html, render_markdown
from pipelines.train_checks import parquet_files
from tune.space import apply_trial, best_recipe, budget_overrides, first_config

log = logging.getLogger("medray.tune")

BEST_RECIPE = "best_recipe.yaml"


def eval_curve(trial_dir: Path) -> list[tuple[int, float]]:
    """(step, eval loss) from the trial's own training log."""
    log_file = trial_dir / "finetune" / "metrics.jsonl"
    rows = [json.loads(line) for line in log_file.read_text().splitlines()] if log_file.is_file() else []
    return [(row["step"], row["eval_loss"]) for row in rows if row.get("eval_loss") is not None]


def trial_rows(recipe: Recipe, results, out: Path) -> list[dict]:
    """One row per trial of a Tune ResultGrid: its values, last metrics, curve and fate."""
    rows = []
    for result in results:
        metrics, config = result.metrics or {}, result.config or {}
        trial = metrics.get("trial_id") or Path(result.path).name  # no report: the trial folder
        curve = eval_curve(out / "trials" / trial)
        r = config.get("r")
        rows.append({
            "trial": trial,
            "method": config.get("method", recipe.method), "r": r,
            "alpha": r * config["alpha_multiple"] if r else None, "lr": config.get("lr"),
            # A stopped trial may log a step or two past the report Tune stopped it on: what it trained.
            "step": max(metrics.get("step") or 0, *(step for step, _ in curve[-1:])) or None,
            "eval_loss": curve[-1][1] if curve else metrics.get("eval_loss"),
            "rouge_l": metrics.get("rouge_l"), "time_s": metrics.get("time_total_s"),
            "status": "error" if result.error else "completed", "curve": curve, "config": config,
        })
    # A trial that ended before the longest one did was stopped by the scheduler.
    longest = max((row["step"] or 0 for row in rows), default=0)
    for row in rows:
        if row["status"] == "completed" and (row["step"] or 0) < longest:
            row["status"] = "stopped early"
    return sorted(rows, key=lambda row: row["trial"])


def pick_best(rows: list[dict], metric: str, mode: str) -> dict | None:
    """The best last metric among the trials that ran their whole budget (else among all)."""
    scored = [row for row in rows if row[metric] is not None and row["status"] != "error"]
    full = [row for row in scored if row["status"] == "completed"] or scored
    if not full:
        return None
    return (min if mode == "min" else max)(full, key=lambda row: row[metric])


def training_rows(data_dir: Path) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in parquet_files(data_dir / "sft" / "train"))


def trial_budget(recipe: Recipe, data_dir: Path) -> dict:
    trial = apply_trial(recipe, first_config(recipe))
    t, s = trial.training, trial.scaling
    return {
        "steps": t.max_steps, "epochs": None if t.max_steps else t.epochs, "eval_every": t.eval_every,
        "training_rows": training_rows(data_dir), "data_fraction": recipe.tune.trial.data_fraction,
        "workers": s.num_workers, "cpus_per_worker": s.cpus_per_worker,
        "global_batch_rows": s.num_workers * t.micro_batch_size * t.grad_accum,
        "pack_length": json.loads((data_dir / "manifest.json").read_text()).get("pack_length", recipe.data.pack_length),
    }


def write_report(recipe: Recipe, results, out: Path, data_dir: Path, wall_time_s: float) -> dict:
    """Plots, best_recipe.yaml, then sweep.json, sweep.md and sweep.html; returns the summary."""
    from tune.plots import draw_plots

    t = recipe.tune
    rows = trial_rows(recipe, results, out)
    best = pick_best(rows, t.metric, t.resolved_mode)
    summary = {
        "recipe": recipe.name, "metric": t.metric, "mode": t.resolved_mode, "scheduler": t.scheduler,
        "search_alg": t.search_alg, "num_samples": t.num_samples, "wall_time_s": round(wall_time_s, 1),
        "trials": len(rows), "stopped_early": sum(row["status"] == "stopped early" for row in rows),
        "errors": sum(row["status"] == "error" for row in rows),
        "trial_time_sum_s": round(sum(row["time_s"] or 0 for row in rows), 1),
        "budget": trial_budget(recipe, data_dir), "data_dir": str(data_dir),
        "rows": [{k: v for k, v in row.items() if k != "config"} for row in rows],
        "best": None, "best_recipe": None, "reproduce": None,
        "plots": {name: str(Path(p).relative_to(out)) for name, p in draw_plots(rows, best, t.metric,
                                                                                   out / "plots").items()},
        "report": str(out / "sweep.md"),
    }
    if best:
        dump_recipe(best_recipe(recipe, best["config"]), out / BEST_RECIPE)
        sets = " ".join(f"--set {shlex.quote(s)}" for s in budget_overrides(recipe))
        summary.update(
            best={k: best[k] for k in ("trial", "method", "r", "alpha", "lr", "step", "eval_loss", "rouge_l")},
            best_recipe=str(out / BEST_RECIPE),
            reproduce=f"python -m pipelines.train --recipe {out / BEST_RECIPE} --data {data_dir} --stage finetune "
                      f"{sets}")
    (out / "sweep.json").write_text(json.dumps(summary, indent=2))
    sections = build_sections(summary)
    (out / "sweep.md").write_text(render_markdown(sections))
    (out / "sweep.html").write_text(render_html(sections))
    log.info("sweep report: %s", out / "sweep.md")
    return summary


def build_sections(s: dict) -> list[Section]:
    b = s["budget"]
    length = f"{b['steps']} optimizer steps" if b["steps"] else f"{b['epochs']:g} epoch(s)"
    ran_on = (f"Each trial fine-tuned the prepared base model (continual pre-training is not part of a sweep) for "
              f"{length}, evaluating every {b['eval_every']} steps, on {b['training_rows']} packed training rows of "
              f"{b['pack_length']} tokens (data fraction {b['data_fraction']:g}), with {b['workers']} worker(s) x "
              f"{b['cpus_per_worker']:g} CPU and a global batch of {b['global_batch_rows']} rows (the recipe's).")
    how = (f"{s['trials']} trials of {s['num_samples']}, search {s['search_alg']}, scheduler {s['scheduler']} on "
           f"{s['metric']} ({s['mode']}): {s['stopped_early']} stopped early, {s['errors']} failed. Wall time "
           f"{s['wall_time_s']:.0f} s; the trials' own times sum to {s['trial_time_sum_s']:.0f} s.")
    sections = [Section(f"Sweep: {s['recipe']}", [how, ran_on])]
    if s["best"]:
        best = s["best"]
        sections.append(Section("Best trial", [
            Table(["trial", "method", "r", "alpha", "lr", "steps", "eval loss", "ROUGE-L"],
                  [[best["trial"], best["method"], best["r"], f"{best['alpha']:g}", f"{best['lr']:.3g}", best["step"],
                    num(best["eval_loss"]), num(best["rouge_l"])]]),
            f"Its configuration, with the recipe's own training budget, is `{Path(s['best_recipe']).name}`. "
            f"To reproduce the trial itself: `{s['reproduce']}`",
        ]))
    else:
        sections.append(Section("Best trial", ["No trial reported the metric: see the failed trials' logs."]))
    sections.append(Section("Trials", [Table(
        ["trial", "method", "r", "alpha", "lr", "steps", "eval loss", "ROUGE-L", "status", "time (s)"],
        [[row["trial"], row["method"], row["r"], "n/a" if row["alpha"] is None else f"{row['alpha']:g}",
          "n/a" if row["lr"] is None else f"{row['lr']:.3g}", row["step"] or 0, num(row["eval_loss"]),
          num(row["rouge_l"]), row["status"], "n/a" if row["time_s"] is None else f"{row['time_s']:.0f}"]
         for row in s["rows"]])]))
    titles = {"metric_vs_lr": f"{s['metric']} vs learning rate", "metric_vs_rank": f"{s['metric']} vs LoRA rank",
              "learning_curves": "eval loss during training"}
    sections.append(Section("Plots", [Image(path, titles[name]) for name, path in s["plots"].items()]))
    return sections
