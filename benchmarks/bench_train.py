"""Training throughput on the embedded tiny Llama: Ray Train against a plain torch loop and against
TRL's SFTTrainer (packing on), on the same model, data, micro-batch and length; then the step time
and peak memory of full fine-tuning (ZeRO-3), LoRA and QLoRA on 1 and 2 workers.

    .venv/bin/python benchmarks/bench_train.py [--steps 24] [--reports 2000] [--no-methods]

Throughput is real (non-padding) tokens per second and per worker, from the step times after 3
warm-up steps: the best step (what a loaded machine distorts least) and the median. A step is
timed whole, from fetching its batch to the optimizer's update, in every loop.

- Ray Train against the plain loop, at 2 threads and at 1 thread, in --pairs interleaved pairs
  (plain loop, Ray run, plain loop again; the better plain run is the pair's reference): one pair
  swings by +-20 % on a shared 2-core machine, where two threads stall whenever anything else
  runs, so the median over pairs is the figure.
- TRL twice: with its defaults (bf16 autocast and gradient checkpointing, what the issue names),
  and in our precision and checkpointing setting, which isolates the loops from the settings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipelines.config import load_recipe
from pipelines.models import build_tiny_model, load_model, tokenizer_fingerprint, train_tokenizer
from pipelines.packing import pack_examples
from pipelines.prompts import impression_messages, supervised_example
from pipelines.sections import extract_sections
from pipelines.synthetic import iter_reports
from pipelines.train_methods import packed_loss
from provenance import git_commit

LENGTH, BATCH, WARMUP = 512, 4, 3  # the local recipe's pack length and micro-batch
METHODS = {"full, ZeRO-3": ["method=full", "training.strategy=deepspeed", "training.zero_stage=3"],
           "LoRA (DDP)": ["method=lora", "training.strategy=ddp"],
           "QLoRA (DDP)": ["method=qlora", "training.strategy=ddp"]}


def build(root: Path, reports: int) -> tuple[Path, list[dict]]:
    """Synthetic reports -> tokenizer + tiny Llama -> findings/impression examples -> packed shards."""
    records = [extract_sections(r["text"]) for r in iter_reports(reports)]
    records = [r for r in records if r.findings and r.impression]
    tokenizer = train_tokenizer([f"{r.findings}\n{r.impression}" for r in records], 2048, "llama3")
    base = root / "base_model"
    build_tiny_model(load_recipe("local").model.tiny, tokenizer).save_pretrained(base)
    tokenizer.save_pretrained(base)
    examples = [supervised_example(tokenizer, impression_messages(r.findings, r.exam), r.impression, "llama3")
                for r in records]
    examples = [{k: v[:LENGTH] for k, v in e.items()} for e in examples]
    rows = pack_examples([e["input_ids"] for e in examples], [e["labels"] for e in examples], LENGTH,
                         tokenizer.pad_token_id)
    data = root / "data"
    (data / "sft" / "train").mkdir(parents=True)
    pq.write_table(pa.table(rows), data / "sft" / "train" / "part-00000.parquet")
    (data / "manifest.json").write_text(json.dumps({"base_model": str(base), "tokenizer": tokenizer_fingerprint(base),
                                                    "pack_length": LENGTH}))
    return data, examples


def real_tokens_per_step(data: Path, steps: int, workers: int = 1) -> float:
    tokens = pq.read_table(data / "sft" / "train", columns=["num_tokens"]).column("num_tokens").to_pylist()
    used = tokens[:steps * BATCH * workers]
    return sum(used) / steps / workers


def plain_loop(base: Path, data: Path, steps: int, threads: int) -> list[float]:
    """Seconds a step after warm-up: one process, the recipe's model settings, AdamW and clipping."""
    torch.set_num_threads(threads)
    table = pq.read_table(data / "sft" / "train", columns=["input_ids", "labels", "position_ids"])
    rows = {k: torch.tensor(table.column(k).to_pylist(), dtype=torch.long) for k in table.column_names}
    model = load_model(base, load_recipe("local").model)
    model.train()
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    times = []
    for step in range(steps):
        start = time.perf_counter()
        batch = {k: v[step * BATCH:(step + 1) * BATCH] for k, v in rows.items()}
        loss, _ = packed_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times[WARMUP:]


def ray_run(data: Path, out: Path, steps: int, overrides: list[str]) -> tuple[list[float], float]:
    """(seconds a step after warm-up, peak RSS MB of a worker) of a Ray Train run of the fine-tuning stage."""
    from pipelines.train import train

    recipe = load_recipe(None, ["pretrain.enabled=false", f"training.max_steps={steps}", "training.log_every=1",
                                f"training.micro_batch_size={BATCH}", "training.grad_accum=1",
                                f"training.checkpoint_every={10 * steps}", "optimizer.lr=1e-4", *overrides])
    train(recipe, data, out, stages="finetune")
    rows = [json.loads(line) for line in (out / "finetune" / "metrics.jsonl").read_text().splitlines()]
    return [BATCH * LENGTH / r["tokens_per_s_per_worker"] for r in rows[WARMUP:]], rows[-1]["peak_rss_mb"]


def trl_run(base: Path, examples: list[dict], steps: int, threads: int, out: Path, ours: bool) -> list[float]:
    """Real tokens a second, step by step after warm-up, of TRL's SFTTrainer with packing at our
    length and micro-batch: its defaults, or (`ours`) in our precision and checkpointing setting."""
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(threads)
    marks: list[tuple[float, int]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append((time.perf_counter(), state.num_input_tokens_seen))

    dataset = Dataset.from_dict({"input_ids": [e["input_ids"] for e in examples],
                                 "completion_mask": [[int(x != -100) for x in e["labels"]] for e in examples]})
    config = SFTConfig(output_dir=str(out), packing=True, max_length=LENGTH, per_device_train_batch_size=BATCH,
                       max_steps=steps, report_to="none", save_strategy="no", use_cpu=True,
                       include_num_input_tokens_seen=True,
                       **(settings_like_ours() if ours else {}))
    trainer = SFTTrainer(model=str(base), args=config, train_dataset=dataset,
                         processing_class=AutoTokenizer.from_pretrained(base), callbacks=[Clock()])
    trainer.train()
    return [(n1 - n0) / (t1 - t0) for (t0, n0), (t1, n1) in zip(marks[WARMUP - 1:], marks[WARMUP:])]


def settings_like_ours() -> dict:
    """TRL's arguments for our precision and checkpointing, instead of its bf16 autocast (emulated
    on CPUs without bf16) and gradient checkpointing."""
    model = load_recipe("local").model
    return {"model_init_kwargs": {"dtype": model.dtype}, "bf16": model.dtype == "bfloat16",
            "gradient_checkpointing": model.gradient_checkpointing}


def rate(tokens: float, seconds: list[float]) -> tuple[float, float]:
    """(best, median) tokens a second."""
    return tokens / min(seconds), tokens / statistics.median(seconds)


def show(label: str, rates: tuple[float, float], reference: tuple[float, float] | None = None, name: str = "") -> None:
    ratio = f"   {name} {rates[0] / reference[0]:.2f}x (median {rates[1] / reference[1]:.2f}x)" if reference else ""
    print(f"{label:44} {rates[0]:7.0f} {rates[1]:7.0f}{ratio}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--reports", type=int, default=2000, help="synthetic reports to build the data from")
    parser.add_argument("--pairs", type=int, default=3,
                        help="plain/Ray pairs per thread count: one pair swings +-20 %% on a shared 2-core machine")
    parser.add_argument("--no-methods", action="store_true", help="skip the full / LoRA / QLoRA table")
    args = parser.parse_args()
    commit = git_commit()
    print(f"# bench_train  {date.today()}  commit {commit}  Python {platform.python_version()}  torch "
          f"{torch.__version__}  {os.cpu_count()} CPUs  load {os.getloadavg()[0]:.1f}", flush=True)

    import ray

    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _temp_dir=str(root / "ray"),
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    data, examples = build(root, args.reports)
    base, threads, steps = data.parent / "base_model", os.cpu_count(), args.steps
    tokens = real_tokens_per_step(data, steps)
    print(f"tiny Llama ({load_recipe('local').model.tiny.hidden_size} hidden), {len(examples)} examples packed into "
          f"{LENGTH}-token rows, micro-batch {BATCH}, {steps} steps, {load_recipe('local').model.dtype}; "
          f"{tokens:.0f} real tokens a step\n")

    print(f"{'tokens/s (per worker)':44} {'best':>7} {'median':>7}")
    one_worker = ["method=full", "training.strategy=ddp", "scaling.num_workers=1", "scaling.cpus_per_worker=1"]
    ray_default = None
    for n, overrides in ((threads, one_worker), (1, [*one_worker, "scaling.threads_per_worker=1"])):
        ratios = []
        for pair in range(args.pairs):
            before = rate(tokens, plain_loop(base, data, steps, n))
            ray = rate(tokens, ray_run(data, root / f"ray-{n}-{pair}", steps, overrides)[0])
            after = rate(tokens, plain_loop(base, data, steps, n))
            plain = max(before, after)
            show(f"plain torch loop, {n} thread(s), pair {pair + 1}", plain)
            show(f"Ray Train, 1 worker x {n} thread(s), pair {pair + 1}", ray, plain, "vs plain")
            ratios.append(ray[0] / plain[0])
            ray_default = ray_default or ray
        print(f"{'':44} Ray/plain at {n} thread(s), median of {len(ratios)} pairs: "
              f"{statistics.median(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f})", flush=True)
    for ours, label in ((False, "its defaults"), (True, "our precision, no checkpointing")):
        trl_rates = trl_run(base, examples, steps, threads, root / f"trl-{ours}", ours)
        trl = (max(trl_rates), statistics.median(trl_rates))
        show(f"TRL SFTTrainer, packing, {label}", trl)
        show("Ray Train, 1 worker, against it", ray_default, trl, "Ray/TRL")
    if args.no_methods:
        return
    print("\nmethod           workers  s/step best  median   real tokens/s/worker (best)   peak RSS/worker")
    for name, overrides in METHODS.items():
        for workers in (1, 2):
            out = root / f"{name.split()[0].strip(',').lower()}-{workers}"
            seconds, rss = ray_run(data, out, steps, [*overrides, f"scaling.num_workers={workers}"])
            best = real_tokens_per_step(data, steps, workers) / min(seconds)
            print(f"{name:16} {workers:7}  {min(seconds):11.3f} {statistics.median(seconds):7.3f}   {best:26.0f}"
                  f"   {rss:11.0f} MB", flush=True)


if __name__ == "__main__":
    main()
