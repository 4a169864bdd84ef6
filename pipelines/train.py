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
import math
import shutil
import time
from pathlib import Path

import pyarrow.dataset as pads

from pipelines.cli import UserError, main_wrapper, parse_recipe, recipe_parser
from pipelines.config import Recipe, StageConfig, dump_recipe
from pipelines.models import tokenizer_fingerprint
from pipelines.raycluster import init_ray

log = logging.getLogger("medray.train")

SHARD_COLUMNS = ["input_ids", "labels", "position_ids"]
RUN_FILE = "run.json"


def count_rows(folder: Path) -> int:
    if not folder.is_dir() or not any(folder.glob("*.parquet")):
        return 0
    return pads.dataset(str(folder), format="parquet").count_rows()


def check_stage_inputs(recipe: Recipe, stage: StageConfig, base_path: Path, shards: Path, data_dir: Path) -> int:
    """Everything a user can get wrong, caught before any worker starts. Returns train rows."""
    if not base_path.is_dir() or not (base_path / "config.json").is_file():
        raise UserError(f"base model {base_path}: not a Hugging Face model directory (no config.json)")
    rows = count_rows(shards / "train")
    if rows == 0:
        raise UserError(f"data {shards}/train: no packed shards; run `python -m pipelines.prepare` first")
    manifest = data_dir / "manifest.json"
    expected = json.loads(manifest.read_text()).get("tokenizer") if manifest.is_file() else None
    actual = tokenizer_fingerprint(base_path)
    if expected and actual and expected != actual:
        raise UserError(f"data {data_dir} was tokenized with another tokenizer ({expected}) than the "
                        f"model at {base_path} ({actual}); prepare the data again for this model")
    if stage.method != "full" and stage.lora.target_modules != "all-linear":
        check_lora_targets(base_path, stage.lora.target_modules)
    need = recipe.scaling.num_workers * stage.training.micro_batch_size * stage.training.grad_accum
    if rows < need:
        raise UserError(f"data {shards}/train has {rows} packed rows, fewer than one step needs ({need}: "
                        "workers x micro_batch_size x grad_accum)")
    return rows


def check_lora_targets(base_path: Path, targets: list[str]) -> None:
    """Instantiate the architecture on the meta device (no memory) and match the names."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(base_path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise UserError(f"lora.target_modules {unknown} match no linear layer of {base_path} "
                        f"(it has {sorted(names)})")


def check_resources(recipe: Recipe) -> None:
    import ray

    s = recipe.scaling
    available = ray.cluster_resources()
    if s.use_gpu and available.get("GPU", 0) < s.num_workers * max(s.gpus_per_worker, 1):
        raise UserError(f"scaling.use_gpu: the recipe asks for {s.num_workers} GPU worker(s) but the Ray "
                        f"cluster has {int(available.get('GPU', 0))} GPU(s); use a GPU cluster or --set scaling.use_gpu=false")
    # Workers stream their data through Ray Data tasks, which need CPUs of their own: with every
    # CPU held by a worker the reads never get scheduled and training hangs without an error.
    spare = available.get("CPU", 0) - s.num_workers * s.cpus_per_worker
    if spare < 0.5:
        raise UserError(f"scaling: {s.num_workers} workers x {s.cpus_per_worker} CPU leave {max(spare, 0):g} of the "
                        f"cluster's {available.get('CPU', 0):g} CPUs for data loading (at least 0.5 needed); "
                        "lower scaling.cpus_per_worker or num_workers")


def run_name(stage_dir: Path, stage_name: str, resume: bool) -> str:
    """A fresh name per run (Ray would silently resume a name it has seen); --resume reuses it."""
    record = stage_dir / RUN_FILE
    if resume:
        if not record.is_file():
            raise UserError(f"--resume: no earlier run of stage {stage_name} in {stage_dir}")
        return json.loads(record.read_text())["run_name"]
    name = f"{stage_name}-{time.strftime('%Y%m%d-%H%M%S')}-{hashlib.blake2b(str(time.time_ns()).encode(), digest_size=3).hexdigest()}"
    stage_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"run_name": name}))
    return name


def model_shape(base_path: Path) -> dict:
    config = json.loads((base_path / "config.json").read_text())
    return {"num_layers": config["num_hidden_layers"], "hidden_size": config["hidden_size"]}


def count_params(base_path: Path, stage: StageConfig) -> tuple[int, int]:
    """(all parameters, trainable parameters) without loading weights (meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(base_path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    if stage.method == "full":
        return total, total
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=stage.lora.r, lora_alpha=stage.lora.alpha,
                                                  target_modules=stage.lora.target_modules, task_type="CAUSAL_LM"))
    return total, sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def run_stage(recipe: Recipe, stage_name: str, stage: StageConfig, base_path: Path, shards: Path,
              data_dir: Path, out: Path, resume: bool) -> Path:
    """One Ray Train run; returns the directory of the trained model (or adapter)."""
    import ray.data
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    rows = check_stage_inputs(recipe, stage, base_path, shards, data_dir)
    check_resources(recipe)
    s, t = recipe.scaling, stage.training
    stage_dir = out / stage_name
    name = run_name(stage_dir, stage_name, resume)
    metrics_path = stage_dir / "metrics.jsonl"
    if not resume:
        metrics_path.unlink(missing_ok=True)
    steps_per_epoch = rows // (s.num_workers * t.micro_batch_size * t.grad_accum)
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
    num_params, trainable = count_params(base_path, stage)
    seq_len = pads.dataset(str(shards / "train"), format="parquet").head(1).column("input_ids")[0]
    config = {
        "stage_name": stage_name, "stage": stage.model_dump(mode="json", exclude={"enabled"}),
        "model": recipe.model.model_dump(mode="json"), "base_path": str(base_path.resolve()),
        "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
        "metrics_path": str(metrics_path.resolve()), "final_dir": str((stage_dir / "model").resolve()),
        "num_params": num_params, "trainable_params": trainable, "seq_len": len(seq_len),
        **model_shape(base_path),
    }
    log.info("stage %s: %s on %d worker(s), %d packed rows, %d steps (%.1fM of %.1fM params trainable)",
             stage_name, stage.method, s.num_workers, rows, total_steps, trainable / 1e6, num_params / 1e6)
    # Packed rows arrive in the same order on every run, so a resumed run can skip exactly the
    # batches it already trained on.
    data_context = ray.data.DataContext.get_current()
    data_context.execution_options.preserve_order = True
    datasets = {"train": ray.data.read_parquet(str(shards / "train"), columns=SHARD_COLUMNS)}
    if count_rows(shards / "eval"):
        datasets["eval"] = ray.data.read_parquet(str(shards / "eval"), columns=SHARD_COLUMNS)
    from pipelines.train_loop import train_loop_per_worker

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                     resources_per_worker={"CPU": s.cpus_per_worker,
                                                           **({"GPU": s.gpus_per_worker} if s.use_gpu else {})}),
        torch_config=TorchConfig(backend=s.backend),
        run_config=RunConfig(name=name, storage_path=str((out / "ray_results").resolve()),
                             failure_config=FailureConfig(max_failures=s.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split="all"),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    final = stage_dir / "model"
    if final.exists():
        shutil.rmtree(final)
    result.checkpoint.to_directory(str(final))
    (final / "train_state.json").unlink(missing_ok=True)
    for name_ in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (base_path / name_).is_file():
            shutil.copy(base_path / name_, final / name_)
    log.info("stage %s done: %s", stage_name, final)
    return final


def train(recipe: Recipe, data_dir: str | Path | None = None, output: str | Path | None = None,
          resume: bool = False, stages: str = "all") -> dict[str, Path]:
    data_dir = Path(data_dir or Path(recipe.output_dir) / "data")
    out = Path(output or Path(recipe.output_dir) / "train")
    manifest = data_dir / "manifest.json"
    if not manifest.is_file():
        raise UserError(f"data {data_dir}: no manifest.json; run `python -m pipelines.prepare` first")
    base = Path(recipe.model.path or json.loads(manifest.read_text())["base_model"])
    out.mkdir(parents=True, exist_ok=True)
    dump_recipe(recipe, out / "recipe.yaml")
    init_ray()
    models: dict[str, Path] = {}
    if recipe.pretrain.enabled and stages in ("all", "pretrain"):
        models["pretrain"] = run_stage(recipe, "pretrain", recipe.pretrain, base, data_dir / "pretrain",
                                       data_dir, out, resume)
        base = models["pretrain"]
    elif stages == "finetune" and recipe.pretrain.enabled and (out / "pretrain" / "model").is_dir():
        base = out / "pretrain" / "model"
    if recipe.data.task != "pretrain" and stages in ("all", "finetune"):
        models["finetune"] = run_stage(recipe, "finetune", recipe.finetune_stage(), base, data_dir / "sft",
                                       data_dir, out, resume)
    return models


def main(argv: list[str] | None = None) -> int:
    parser = recipe_parser(__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="prepared data directory (default: <output_dir>/data)")
    parser.add_argument("--resume", action="store_true", help="continue the last run of each stage")
    parser.add_argument("--stage", choices=["all", "pretrain", "finetune"], default="all")
    args = parser.parse_args(argv)
    recipe = parse_recipe(args)
    init_ray(args.address)
    models = train(recipe, args.data, args.output, args.resume, args.stage)
    print(json.dumps({k: str(v) for k, v in models.items()}))
    return 0


run = main_wrapper(main)

if __name__ == "__main__":
    run()
