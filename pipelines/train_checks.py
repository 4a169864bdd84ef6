"""Everything a user can get wrong about a training run, caught before any worker starts.

Each check raises a `UserError` whose message is one line naming the path or field at fault: a
mistake found by a worker would cost the cluster's start-up time and end in a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from pipelines.cli import UserError
from pipelines.config import Recipe, StageConfig
from pipelines.models import tokenizer_fingerprint


def parquet_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.parquet")) if folder.is_dir() else []


def check_data_dir(data_dir: Path) -> dict:
    """The prepared data directory's manifest."""
    if not data_dir.is_dir():
        raise UserError(f"data {data_dir}: no such directory; run `python -m pipelines.prepare` first")
    manifest = data_dir / "manifest.json"
    if not manifest.is_file():
        raise UserError(f"data {data_dir}: no manifest.json (empty, or not written by `python -m pipelines.prepare`)")
    return json.loads(manifest.read_text())


def check_base_model(base_path: Path) -> dict:
    """The base model's config.json."""
    if not (base_path / "config.json").is_file():
        what = "no such directory" if not base_path.is_dir() else "not a Hugging Face model directory (no config.json)"
        raise UserError(f"base model {base_path}: {what}")
    return json.loads((base_path / "config.json").read_text())


def check_shards(shards: Path, manifest: dict, base_path: Path, model_config: dict) -> int:
    """Packed training rows in `shards`/train, tokenized for this model. Returns their number."""
    files = parquet_files(shards / "train")
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    if rows == 0:
        raise UserError(f"data {shards}/train: no packed rows; run `python -m pipelines.prepare` first")
    expected, actual = manifest.get("tokenizer"), tokenizer_fingerprint(base_path)
    if expected and actual and expected != actual:
        raise UserError(f"data {shards} was tokenized with another tokenizer ({expected}) than the model at "
                        f"{base_path} ({actual}); prepare the data again for this model")
    top = max_token_id(files)
    vocab = model_config.get("vocab_size")
    if top is not None and vocab and top >= vocab:
        raise UserError(f"data {shards} holds token id {top} but the model at {base_path} has a vocabulary of {vocab}: "
                        "the shards come from another tokenizer; prepare the data again for this model")
    return rows


def max_token_id(files: list[Path]) -> int | None:
    """The largest input id, from the Parquet column statistics (no row is read)."""
    top = None
    for f in files:
        meta = pq.ParquetFile(f).metadata
        column = next((j for j in range(meta.num_columns)
                       if meta.row_group(0).column(j).path_in_schema.startswith("input_ids.")), None)
        for g in range(meta.num_row_groups if column is not None else 0):
            stats = meta.row_group(g).column(column).statistics
            if stats is None or not stats.has_min_max:
                return None
            top = stats.max if top is None else max(top, stats.max)
    return top


def check_lora_targets(stage: StageConfig, base_path: Path) -> None:
    """Instantiate the architecture on the meta device (no memory) and match the names."""
    targets = stage.lora.target_modules
    if stage.method == "full" or targets == "all-linear":
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(base_path)))
    names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise UserError(f"lora.target_modules {unknown} match no linear layer of {base_path} (it has {sorted(names)})")


def check_batch_fits(recipe: Recipe, stage: StageConfig, shards: Path, rows: int) -> None:
    t = stage.training
    need = recipe.scaling.num_workers * t.micro_batch_size * t.grad_accum
    if rows < need:
        raise UserError(f"data {shards}/train has {rows} packed rows, fewer than one step needs ({need}: "
                        "workers x micro_batch_size x grad_accum)")


def check_resources(recipe: Recipe) -> None:
    """The Ray cluster can host the workers and still feed them."""
    import ray

    s = recipe.scaling
    available = ray.cluster_resources()
    gpus = available.get("GPU", 0)
    if s.use_gpu and gpus < s.num_workers * max(s.gpus_per_worker, 1):
        raise UserError(f"scaling.use_gpu: the recipe asks for {s.num_workers} GPU worker(s) but the Ray cluster has "
                        f"{gpus:g} GPU(s); use a GPU cluster or --set scaling.use_gpu=false --set scaling.backend=gloo")
    # Workers stream their data through Ray Data tasks, which need CPUs of their own: with every
    # CPU held by a worker the reads never get scheduled and training hangs without an error.
    cpus = available.get("CPU", 0)
    spare = cpus - s.num_workers * s.cpus_per_worker
    if spare < 0.5:
        raise UserError(f"scaling: {s.num_workers} workers x {s.cpus_per_worker} CPU leave {max(spare, 0):g} of the "
                        f"cluster's {cpus:g} CPUs for data loading (at least 0.5 needed); lower "
                        "scaling.cpus_per_worker or scaling.num_workers")
