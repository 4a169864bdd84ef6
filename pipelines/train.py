"""Train on Ray Train: continual pre-training and/or fine-tuning (full, LoRA, QLoRA).

    python -m pipelines.train [--recipe R] [--data DIR] [--output DIR] [--resume] [--set ...]

Reads the packed shards written by `pipelines.prepare` (DIR/pretrain, DIR/sft) and writes, per
stage, OUTPUT/<stage>/model (Hugging Face weights in safetensors, or a PEFT adapter that names
its base), OUTPUT/<stage>/metrics.jsonl, Ray Train checkpoints under OUTPUT/ray_results, and the
resolved recipe as OUTPUT/recipe.yaml. With pretraining enabled the fine-tuning stage starts
from the pre-trained model, as in the continual pre-training study.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq

from pipelines.cli import UserError, main_wrapper, parse_recipe, recipe_parser
from pipelines.config import Recipe, StageConfig, dump_recipe
from pipelines.flops import flops_per_token
from pipelines.raycluster import init_ray
from pipelines.train_checks import (check_base_model, check_batch_fits, check_data_dir, check_lora_targets,
                                    check_resources, check_shards, parquet_files)
from pipelines.train_data import COLUMNS, TENSOR_COLUMNS

log = logging.getLogger("medray.train")

RUN_FILE = "run.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def planned_stages(recipe: Recipe, data_dir: Path, stages: str) -> list[tuple[str, StageConfig, Path]]:
    """(name, stage, shards) in training order: continual pre-training first, as the study did."""
    plan = []
    if recipe.pretrain.enabled and stages in ("all", "pretrain"):
        plan.append(("pretrain", recipe.pretrain, data_dir / "pretrain"))
    if recipe.data.task != "pretrain" and stages in ("all", "finetune"):
        plan.append(("finetune", recipe.finetune_stage(), data_dir / "sft"))
    return plan


def check_stage(recipe: Recipe, stage: StageConfig, shards: Path, manifest: dict, base_path: Path) -> int:
    """Every check of one stage that needs no Ray; returns the packed training rows."""
    model_config = check_base_model(base_path)
    rows = check_shards(shards, manifest, base_path, model_config)
    check_lora_targets(stage, base_path)
    check_batch_fits(recipe, stage, shards, rows)
    return rows


def total_steps(recipe: Recipe, stage: StageConfig, rows: int) -> int:
    """Optimizer steps: max_steps, else whole epochs of what each worker's equal split holds."""
    t = stage.training
    if t.max_steps:
        return t.max_steps
    micro_batches_per_epoch = rows // recipe.scaling.num_workers // t.micro_batch_size
    return max(1, int(t.epochs * micro_batches_per_epoch) // t.grad_accum)


def count_params(base_path: Path, stage: StageConfig) -> tuple[int, int]:
    """(all parameters, trainable parameters) without loading weights (meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(base_path)))
    total = sum(p.numel() for p in model.parameters())
    if stage.method == "full":
        return total, total
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=stage.lora.r, lora_alpha=stage.lora.alpha,
                                                  target_modules=stage.lora.target_modules, task_type="CAUSAL_LM"))
    return total, sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def stage_flops_per_token(base_path: Path, stage: StageConfig, seq_len: int) -> float:
    num_params, trainable = count_params(base_path, stage)
    config = json.loads((base_path / "config.json").read_text())
    return flops_per_token(num_params, trainable, stage.method, config["num_hidden_layers"], config["hidden_size"],
                           seq_len)


def run_record(stage_dir: Path, stage_name: str, resume: bool) -> dict:
    """The run of a stage: a fresh name per run (Ray silently resumes a name it has seen), the
    last one again with --resume."""
    path = stage_dir / RUN_FILE
    if resume and path.is_file():
        return json.loads(path.read_text())
    stamp = time.strftime("%Y%m%d-%H%M%S")
    salt = hashlib.blake2b(str(time.time_ns()).encode(), digest_size=3).hexdigest()
    record = {"run_name": f"{stage_name}-{stamp}-{salt}", "done": False}
    stage_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    (stage_dir / "metrics.jsonl").unlink(missing_ok=True)
    return record


def read_datasets(shards: Path) -> dict:
    """Train and eval shards, read in a block layout fixed by the files and their row groups so
    that the split across workers is the same on every run (see pipelines.train_data)."""
    import ray.data

    # Ray Data's default (V2) Parquet reader lists footers on a pool of 32 actor processes every
    # time a dataset runs: 5-10 s of start-up per pipeline on a 2-CPU node, for the few files of a
    # packed shard. The V1 reader lists them in the process that plans the read.
    ray.data.DataContext.get_current().use_datasource_v2 = False
    datasets = {}
    for split, columns in (("train", COLUMNS), ("eval", TENSOR_COLUMNS)):
        files = parquet_files(shards / split)
        if files:
            blocks = sum(pq.ParquetFile(f).metadata.num_row_groups for f in files)
            datasets[split] = ray.data.read_parquet([str(f) for f in files],
                                                    override_num_blocks=blocks).select_columns(list(columns))
    return datasets


def run_stage(recipe: Recipe, stage_name: str, stage: StageConfig, base_path: Path, shards: Path, rows: int,
              out: Path, resume: bool, callbacks: list | None = None) -> Path:
    """One Ray Train run; returns the directory of the trained model (or adapter). `callbacks` go to
    the Train RunConfig (a Tune sweep passes its TuneReportCallback)."""
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.train_loop import train_loop_per_worker

    stage_dir = out / stage_name
    final = stage_dir / "model"
    record = run_record(stage_dir, stage_name, resume)
    if record["done"] and final.is_dir():
        log.info("stage %s: already complete (%s)", stage_name, final)
        return final
    s, t = recipe.scaling, stage.training
    steps = total_steps(recipe, stage, rows)
    datasets = read_datasets(shards)
    config = {
        "stage_name": stage_name, "stage": stage.model_dump(mode="json", exclude={"enabled"}),
        "model": recipe.model.model_dump(mode="json"), "base_path": str(base_path.resolve()),
        "total_steps": steps, "metrics_path": str((stage_dir / "metrics.jsonl").resolve()),
        "has_eval": "eval" in datasets, "threads_per_worker": s.threads_per_worker,
        "flops_per_token": stage_flops_per_token(base_path, stage, recipe.data.pack_length),
    }
    log.info("stage %s: %s on %d worker(s), %d packed rows, %d steps, run %s%s", stage_name, stage.method,
             s.num_workers, rows, steps, record["run_name"], " (resumed)" if resume else "")
    ingest = ray.train.DataConfig.default_ingest_options()
    ingest.preserve_order = True  # with the fixed block layout: the same rows per worker on every run
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                     resources_per_worker={"CPU": s.cpus_per_worker,
                                                           **({"GPU": s.gpus_per_worker or 1} if s.use_gpu else {})}),
        torch_config=TorchConfig(backend=s.backend),
        run_config=RunConfig(name=record["run_name"], storage_path=str((out / "ray_results").resolve()),
                             failure_config=FailureConfig(max_failures=s.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=callbacks),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split="all", execution_options=ingest),
    )
    result = trainer.fit()
    if final.exists():
        shutil.rmtree(final)
    result.checkpoint.to_directory(str(final))
    for name in TOKENIZER_FILES:
        if (base_path / name).is_file():
            shutil.copy(base_path / name, final / name)
    (stage_dir / RUN_FILE).write_text(json.dumps({**record, "done": True}))
    log.info("stage %s done: %s", stage_name, final)
    return final


def train(recipe: Recipe, data_dir: str | Path | None = None, output: str | Path | None = None,
          resume: bool = False, stages: str = "all", callbacks: list | None = None) -> dict[str, Path]:
    """Train the recipe's stages on Ray Train; returns each stage's model (or adapter) directory."""
    data_dir = Path(data_dir or Path(recipe.output_dir) / "data")
    out = Path(output or Path(recipe.output_dir) / "train")
    manifest = check_data_dir(data_dir)
    base = Path(recipe.model.path or manifest["base_model"])
    plan = planned_stages(recipe, data_dir, stages)
    if stages == "finetune" and recipe.pretrain.enabled and (out / "pretrain" / "model").is_dir():
        base = out / "pretrain" / "model"
    # Every stage is checked against the first base: a later stage's base (the earlier stage's
    # output) has its architecture and tokenizer, and a mistake must not wait for hours of training.
    rows = {name: check_stage(recipe, stage, shards, manifest, base) for name, stage, shards in plan}
    if resume and not any((out / name / RUN_FILE).is_file() for name, _, _ in plan):
        raise UserError(f"--resume: no earlier run in {out} to continue")
    init_ray()
    check_resources(recipe)
    out.mkdir(parents=True, exist_ok=True)
    dump_recipe(recipe, out / "recipe.yaml")
    models: dict[str, Path] = {}
    for name, stage, shards in plan:
        models[name] = run_stage(recipe, name, stage, base, shards, rows[name], out, resume, callbacks)
        base = models[name]
    return models


def main(argv: list[str] | None = None) -> int:
    parser = recipe_parser(__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="prepared data directory (default: <output_dir>/data)")
    parser.add_argument("--resume", action="store_true", help="continue the last run of each stage")
    parser.add_argument("--stage", choices=["all", "pretrain", "finetune"], default="all")
    args = parser.parse_args(argv)
    recipe = parse_recipe(args)
    if args.address:  # train() connects after its checks, so that bad input fails at once
        os.environ["RAY_ADDRESS"] = args.address
    models = train(recipe, args.data, args.output, args.resume, args.stage)
    print(json.dumps({k: str(v) for k, v in models.items()}))
    return 0


run = main_wrapper(main)

if __name__ == "__main__":
    run()
