"""The radiology study's capacity table from the planner: QLoRA and full fine-tuning of
Llama-3-70B-Instruct on 8 and 64 H100s (4,354,321 reports of about 300 tokens, one epoch).

Estimates, not measurements; the study itself reported full fine-tuning at about twice QLoRA's
GPU time on 8 H100s. Full fine-tuning on 64 GPUs is planned as the recipe runs (optimizer
offload on) and without offload, which 64 GPUs no longer need.

    .venv/bin/python benchmarks/bench_plan.py [--mfu 0.4] [--price-per-gpu-hour 4]
"""

from __future__ import annotations

import argparse

from pipelines.config import load_recipe
from pipelines.plan import GB, make_plan

EXAMPLES, TOKENS_PER_EXAMPLE = 4_354_321, 300
ROWS = [("radiology_qlora_70b", 8, []), ("radiology_qlora_70b", 64, []),
        ("radiology_full_70b", 8, []), ("radiology_full_70b", 64, []),
        ("radiology_full_70b", 64, ["training.offload_optimizer=false"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mfu", type=float, default=0.4)
    parser.add_argument("--price-per-gpu-hour", type=float, default=4.0)
    args = parser.parse_args()
    print(f"| method | GPUs | offload | memory/GPU | fits | min GPUs | hours | GPU-hours | cost at ${args.price_per_gpu_hour:g}/GPU-h |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, gpus, overrides in ROWS:
        p = make_plan(load_recipe(name, overrides), gpus=gpus, mfu=args.mfu, examples=EXAMPLES,
                      tokens_per_example=TOKENS_PER_EXAMPLE, price_per_gpu_hour=args.price_per_gpu_hour)
        print(f"| {p.method} | {gpus} | {'yes' if p.offload else 'no'} | {p.memory.total / GB:.1f} GB | "
              f"{'yes' if p.fits else 'no'} | {p.min_gpus} | {p.hours:.1f} | {p.gpu_hours:,.0f} | ${p.cost:,.0f} |")


if __name__ == "__main__":
    main()
