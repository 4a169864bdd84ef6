"""Prepare training data: raw reports -> de-identified records -> packed token shards (Ray Data).

    python -m pipelines.prepare [--recipe R] [--input PATH_OR_GLOB ...] [--output DIR] [--set ...]

Writes to DIR: records/ (Parquet, partitioned by split: the audit trail, de-identified),
rejects.jsonl (id + reason, never text), base_model/ (embedded default only: the tokenizer
trained on the training records and the tiny Llama), sft/{train,eval}/ or pretrain/{train,eval}/
packed Parquet shards, and manifest.json whose counts reconcile (read = kept + rejected).
A rerun with the same inputs, data section and tokenizer finds the manifest's cache key and
does nothing.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import time
from collections import Counter
from pathlib import Path

import pyarrow.dataset as pads

from pipelines import data_stages
from pipelines.cli import UserError, main_wrapper, parse_recipe, recipe_parser
from pipelines.config import Recipe
from pipelines.models import tokenizer_fingerprint
from pipelines.raycluster import init_ray

log = logging.getLogger("medray.prepare")

READERS = {".csv": "read_csv", ".json": "read_json", ".jsonl": "read_json", ".parquet": "read_parquet"}
MANIFEST = "manifest.json"


def resolve_inputs(patterns: list[str]) -> list[Path]:
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if any(c in pattern for c in "*?[") else [pattern]
        if not matches:
            raise UserError(f"input {pattern}: no file matches")
        for match in matches:
            path = Path(match)
            if not path.is_file():
                raise UserError(f"input {match}: no such file")
            if path.suffix.lower() not in READERS:
                raise UserError(f"input {match}: unsupported format (expected {', '.join(sorted(READERS))})")
            files.append(path)
    return files


def cache_key(recipe: Recipe, files: list[Path]) -> str:
    """Changes whenever the inputs, the data section or the model/tokenizer would change a row."""
    h = hashlib.sha256()
    h.update(json.dumps(recipe.data.model_dump(mode="json"), sort_keys=True).encode())
    h.update(json.dumps(recipe.model.model_dump(mode="json", exclude={"dtype", "attn_implementation",
                                                                       "gradient_checkpointing"}),
                        sort_keys=True).encode())
    h.update(str(recipe.pretrain.enabled).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    if recipe.model.path and Path(recipe.model.path, "tokenizer.json").is_file():
        h.update(Path(recipe.model.path, "tokenizer.json").read_bytes())
    return h.hexdigest()[:16]


def read_raw(recipe: Recipe, files: list[Path]):
    """One Ray dataset of normalized records from synthetic reports or the input files."""
    import ray.data

    data = recipe.data
    if not files:
        syn = data.synthetic
        blocks = max(2, min(200, syn.num_reports // 5000))
        ds = ray.data.range(syn.num_reports, override_num_blocks=blocks)
        ds = ds.map_batches(data_stages.synthetic_batch, batch_format="pandas",
                            fn_kwargs={"seed": syn.seed, "defect_rate": syn.defect_rate})
        return ds.map_batches(data_stages.normalize_batch, batch_format="pandas",
                              fn_kwargs={"columns": {}, "text_column": "text", "source": "synthetic"})
    parts = []
    for f in files:
        reader = getattr(ray.data, READERS[f.suffix.lower()])
        ds = reader(str(f))
        parts.append(ds.map_batches(data_stages.normalize_batch, batch_format="pandas",
                                    fn_kwargs={"columns": data.columns, "text_column": data.text_column,
                                               "source": f.name}))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def write_records(recipe: Recipe, files: list[Path], out: Path) -> None:
    data = recipe.data
    ds = read_raw(recipe, files)
    ds = ds.map_batches(data_stages.clean_batch, batch_format="pandas",
                        fn_kwargs={"task": data.task, "min_findings_words": data.min_findings_words,
                                   "deidentify": data.deidentify})
    ds = ds.map_batches(data_stages.split_batch, batch_format="pandas",
                        fn_kwargs={"eval_fraction": data.splits.eval, "test_fraction": data.splits.test})
    ds.write_parquet(str(out / "records"), partition_cols=["split"])


def read_split(out: Path, split: str, columns: list[str] | None = None):
    """A pyarrow dataset over one split of the written records (empty table when absent)."""
    folder = out / "records" / f"split={split}"
    if not folder.exists():
        return None
    return pads.dataset(str(folder), format="parquet")


def iter_corpus(out: Path, split: str = "train"):
    """Texts of the training records, streamed: the embedded tokenizer is trained on them."""
    ds = read_split(out, split)
    if ds is None:
        return
    for batch in ds.to_batches(columns=["text", "findings", "impression", "exam_code"], batch_size=4096):
        for row in batch.to_pylist():
            yield data_stages.prompts.pretrain_text(row)


def resolve_base_model(recipe: Recipe, out: Path) -> Path:
    """The recipe's model directory, or the embedded tiny Llama built on this run's corpus."""
    if recipe.model.path:
        path = Path(recipe.model.path)
        if not path.is_dir():
            raise UserError(f"model.path {recipe.model.path}: no such directory")
        return path
    from pipelines.models import build_embedded_base

    return build_embedded_base(recipe.model, iter_corpus(out), out / "base_model")


def write_packed(recipe: Recipe, out: Path, tokenizer_path: Path, task: str, split: str, dest: Path) -> None:
    import ray.data

    from pipelines.models import load_tokenizer

    folder = out / "records" / f"split={split}"
    if not folder.exists():
        return
    pad_id = load_tokenizer(tokenizer_path, recipe.model.chat_format).pad_token_id
    data = recipe.data
    ds = ray.data.read_parquet(str(folder))
    ds = ds.map_batches(data_stages.encode_batch, batch_format="pandas",
                        fn_kwargs={"tokenizer_path": str(tokenizer_path), "chat_format": recipe.model.chat_format,
                                   "task": task, "lead_in_probability": data.lead_in_probability,
                                   "max_length": data.pack_length, "overlong": data.overlong})
    ds = ds.map_batches(data_stages.pack_batch, batch_format="pandas", batch_size=data.pack_window,
                        fn_kwargs={"length": data.pack_length, "pad_id": pad_id})
    ds.write_parquet(str(dest))


def summarize(recipe: Recipe, out: Path, key: str, seconds: float) -> dict:
    records = pads.dataset(str(out / "records"), format="parquet", partitioning="hive")
    table = records.to_table(columns=["split", "reject_reason", "phi"])
    splits = Counter(table.column("split").to_pylist())
    reasons = Counter(r for r in table.column("reject_reason").to_pylist() if r)
    phi: Counter = Counter()
    for counts in table.column("phi").to_pylist():
        phi.update(json.loads(counts))
    read = table.num_rows
    manifest = {
        "recipe": recipe.name, "cache_key": key, "task": recipe.data.task,
        "rows_read": read, "rows_kept": read - sum(reasons.values()), "rows_rejected": sum(reasons.values()),
        "rejects_by_reason": dict(reasons), "splits": {s: splits.get(s, 0) for s in ("train", "eval", "test")},
        "phi_replacements": dict(sorted(phi.items())), "pack_length": recipe.data.pack_length, "packed": {},
        "wall_seconds": round(seconds, 2), "rows_per_second": round(read / seconds, 1) if seconds else None,
    }
    for shards in sorted(out.glob("*/*/")):
        if shards.parent.name not in ("sft", "pretrain"):
            continue
        t = pads.dataset(str(shards), format="parquet").to_table(columns=["num_tokens", "seq_lens"])
        tokens = sum(t.column("num_tokens").to_pylist())
        rows = t.num_rows
        manifest["packed"][f"{shards.parent.name}/{shards.name}"] = {
            "rows": rows, "examples": sum(len(x) for x in t.column("seq_lens").to_pylist()), "tokens": tokens,
            "efficiency": round(tokens / (rows * recipe.data.pack_length), 4) if rows else None,
        }
    return manifest


def write_rejects(out: Path) -> None:
    ds = read_split(out, "rejected")
    with open(out / "rejects.jsonl", "w") as fh:
        if ds is None:
            return
        for batch in ds.to_batches(columns=["id", "source", "reject_reason"]):
            for row in batch.to_pylist():
                fh.write(json.dumps({"id": row["id"], "source": row["source"], "reason": row["reject_reason"]}) + "\n")


def prepare(recipe: Recipe, inputs: list[str] | None = None, output: str | Path | None = None) -> dict:
    """Run the whole preparation; returns the manifest (cached when nothing changed)."""
    files = resolve_inputs(inputs if inputs is not None else recipe.data.inputs)
    out = Path(output or Path(recipe.output_dir) / "data")
    key = cache_key(recipe, files)
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        previous = json.loads(manifest_path.read_text())
        if previous.get("cache_key") == key:
            log.info("inputs, data section and tokenizer unchanged (cache key %s): reusing %s", key, out)
            return previous
    if out.exists() and any(out.iterdir()):
        import shutil

        log.info("inputs or recipe changed: rebuilding %s", out)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    init_ray()
    write_records(recipe, files, out)
    write_rejects(out)
    base = resolve_base_model(recipe, out)
    task = recipe.data.task
    for split in ("train", "eval"):
        if task != "pretrain":
            write_packed(recipe, out, base, task, split, out / "sft" / split)
        if task == "pretrain" or recipe.pretrain.enabled:
            write_packed(recipe, out, base, "pretrain", split, out / "pretrain" / split)
    manifest = summarize(recipe, out, key, time.time() - start)
    manifest["base_model"] = str(base)
    manifest["tokenizer"] = tokenizer_fingerprint(base)
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = recipe_parser(__doc__.splitlines()[0])
    parser.add_argument("--input", action="append", default=None, metavar="PATH_OR_GLOB",
                        help="input file(s): CSV, JSON, JSONL or Parquet (default: the recipe's data.inputs)")
    args = parser.parse_args(argv)
    recipe = parse_recipe(args)
    init_ray(args.address)
    manifest = prepare(recipe, args.input, args.output)
    print(json.dumps({k: manifest[k] for k in ("rows_read", "rows_kept", "rows_rejected", "splits", "packed")}))
    return 0


run = main_wrapper(main)

if __name__ == "__main__":
    run()
