"""A Ray Tune sweep of the embedded tiny Llama, end to end: prepare the local recipe's data, sweep
LoRA rank / alpha / learning rate with ASHA and Optuna, then train the exported best recipe and
compare its eval loss with the best trial's: on the trial's own scaling (1 worker accumulating
gradients), and on the recipe's 2 workers (the same global batch, another split of the data).

    .venv/bin/python benchmarks/bench_tune.py [--trials 8] [--steps 16] [--reports 1200]

Prints the trials, how many ASHA stopped early, the wall time, the best configuration and eval
loss, and the reproduction's eval loss. Baselines from the same run: the optimizer steps the
sweep spent against FIFO (every trial to the end), and the wall time against the trials run one
after another without early stopping (trials x the mean time of a trial that ran its budget).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

from pipelines.config import load_recipe
from pipelines.prepare import prepare
from pipelines.train import train
from provenance import git_commit
from tune.space import budget_overrides
from tune.sweep import sweep


def final_eval_loss(stage_dir: Path) -> float:
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["eval_loss"] for row in rows if "eval_loss" in row][-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--reports", type=int, default=1200)
    args = parser.parse_args()
    import ray

    commit = git_commit()
    print(f"# bench_tune  {date.today()}  commit {commit}  Python {platform.python_version()}  ray {ray.__version__}  "
          f"{os.cpu_count()} CPUs", flush=True)
    root = Path(tempfile.mkdtemp(prefix="bench-tune-"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _temp_dir=str(root / "ray"),
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    try:
        recipe = load_recipe("local", [
            f"output_dir={root}", f"data.synthetic.num_reports={args.reports}", "data.pack_length=256",
            "pretrain.enabled=false", "training.eval_batches=4", "training.log_every=4",
            f"tune.num_samples={args.trials}", f"tune.trial.max_steps={args.steps}", "tune.trial.eval_every=4",
            "tune.grace_period=4", "tune.space.lr=[1e-4, 1e-2]"])
        started = time.monotonic()
        prepare(recipe)
        print(f"prepare: {time.monotonic() - started:.0f} s", flush=True)
        s = sweep(recipe, root / "data", root / "sweep")
        best = s["best"]
        full = [row["time_s"] for row in s["rows"] if row["status"] == "completed"]
        sequential = len(s["rows"]) * sum(full) / len(full)
        spent = sum(row["step"] or 0 for row in s["rows"])
        print(f"trials: {s['trials']}  stopped early by ASHA: {s['stopped_early']}  failed: {s['errors']}")
        print(f"budget: {s['budget']['steps']} steps x {s['budget']['global_batch_rows']} rows of "
              f"{s['budget']['pack_length']} tokens, {s['budget']['workers']} worker x "
              f"{s['budget']['cpus_per_worker']:g} CPU per trial")
        print(f"sweep wall time: {s['wall_time_s']:.0f} s  (trials' own times sum to {s['trial_time_sum_s']:.0f} s)")
        print(f"optimizer steps: {spent} spent vs {len(s['rows']) * args.steps} under FIFO "
              f"(ratio {spent / (len(s['rows']) * args.steps):.2f})")
        print(f"wall time vs sequential without early stopping (~{sequential:.0f} s): {s['wall_time_s'] / sequential:.2f}")
        print(f"best: trial {best['trial']} {best['method']} r={best['r']} alpha={best['alpha']:g} lr={best['lr']:.3g}"
              f"  eval loss {best['eval_loss']:.4f}")

        budget = budget_overrides(recipe)
        steps_only = [o for o in budget if o.startswith(("training.max_steps", "training.eval_every",
                                                        "training.checkpoint_every"))]
        for label, overrides in (("the trial's scaling", budget), ("the recipe's 2 workers", steps_only)):
            started = time.monotonic()
            exported = load_recipe(s["best_recipe"], overrides)
            out = root / "reproduce" / str(exported.scaling.num_workers)
            loss = final_eval_loss(train(exported, root / "data", out, stages="finetune")["finetune"].parent)
            print(f"reproduction, exported recipe on {label}: eval loss {loss:.4f}  "
                  f"delta {loss - best['eval_loss']:+.4f}  ({time.monotonic() - started:.0f} s)", flush=True)
        print(f"report: {s['report']}")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
