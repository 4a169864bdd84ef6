"""Prepare training data: raw reports -> de-identified records -> packed token shards (Ray Data).

    python -m pipelines.prepare [--recipe R] [--input PATH_OR_GLOB ...] [--output DIR] [--set ...]

Writes to DIR: records/ (Parquet, partitioned by split, rejected rows included: the audit trail,
de-identified), rejects.jsonl (id, source, file, row and reason of every dropped row, never its
text), base_model/ (embedded default only: the tokenizer trained on the training records and the
tiny Llama), sft/{train,eval}/ and/or pretrain/{train,eval}/ packed Parquet shards, and
manifest.json whose counts reconcile (rows read = kept + rejected, per reason).

The passes, each streaming:
1. clean (Ray Data): read the files (or generate synthetic reports) -> canonical fields ->
   de-identify -> sections -> quality filters -> content hash and split;
2. select (driver, three numbers a row): exact duplicates and mixture sampling;
3. tokenize (Ray Data): drop what the selection dropped, template, tokenize (overlong rejects);
4. pack (one Ray task per shard set): best-fit decreasing with open rows carried across windows.
A user's mistake (a missing file, a column the recipe names that a file lacks) stops the run in
one line before any of it. A rerun with the same inputs, data and model sections, tokenizer and
pipeline code finds the manifest's cache key and does nothing.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipelines import data_stages, readers
from pipelines.cli import UserError, main_wrapper, parse_recipe, recipe_parser
from pipelines.config import Recipe
from pipelines.deid import PHI_TYPES
from pipelines.models import tokenizer_fingerprint
from pipelines.raycluster import init_ray
from pipelines.selection import SELECTION_COLUMNS, Selection, Target, select

log = logging.getLogger("medray.prepare")

MANIFEST = "manifest.json"
OUTPUTS = ("records", "rejects.jsonl", "base_model", "sft", "pretrain", "cache", MANIFEST)
# Rows per block, and so per task. Every task costs scheduling and a block's round trip through
# the object store: at 100k reports 4,096 rows prepared 20 % faster than 1,024 (and 8,192 no faster),
# measured here; an input smaller than a block is cleaned by one task.
BLOCK_ROWS = 4096
# The modules whose code decides what a prepared row looks like: a change to any of them is a
# change of the cache key, like a change of the inputs or of the recipe.
CODE = ("prepare", "data_stages", "readers", "selection", "packing", "prompts", "deid", "sections", "synthetic",
        "models")
# The fields a task cannot do without (any one of the alternatives).
REQUIRED = {"impression": [{"findings", "impression"}, {"text"}], "instruct": [{"instruction", "output"}],
            "pretrain": [{"text"}, {"findings"}, {"impression"}]}


@dataclass(frozen=True)
class Source:
    """A named set of input files read with one column mapping (synthetic reports: no files)."""

    name: str
    task: str
    files: tuple[str, ...] = ()
    columns: tuple[tuple[str, str], ...] = ()
    text_column: str | None = None
    target: Target | None = None

    def spec(self) -> dict:
        return {"task": self.task, "columns": dict(self.columns), "text_column": self.text_column}


# ------------------------------------------------------------------ before any work


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
            if readers.file_format(path) is None:
                raise UserError(f"input {match}: unsupported format (expected {', '.join(sorted(readers.FORMATS))})")
            files.append(path)
    return files


def plan_sources(recipe: Recipe, inputs: list[str] | None) -> list[Source]:
    data = recipe.data
    if data.mixture:
        if inputs:
            raise UserError("--input cannot be combined with a recipe whose data.mixture names the inputs")
        return [Source(m.name, m.task, tuple(str(f) for f in resolve_inputs(m.inputs)), tuple(m.columns.items()),
                       m.text_column, Target(m.count, m.ratio)) for m in data.mixture]
    files = resolve_inputs(inputs if inputs is not None else data.inputs)
    if not files:
        return [Source("synthetic", data.task)]
    # Without a mixture every file is its own source (named after it), read with the recipe's mapping.
    return [Source(f.name, data.task, (str(f),), tuple(data.columns.items()), data.text_column) for f in files]


def check_tasks(recipe: Recipe, sources: list[Source]) -> None:
    if any(s.task == "pretrain" for s in sources) and not (recipe.data.task == "pretrain" or recipe.pretrain.enabled):
        raise UserError("a data.mixture source has task pretrain, but the recipe trains no language-modelling "
                        "stage: set pretrain.enabled: true (or data.task: pretrain)")


def check_columns(recipe: Recipe, sources: list[Source]) -> None:
    """Every column the recipe names exists, and the task's fields can be found, in every file."""
    for source in sources:
        mapping = data_stages.field_mapping(dict(source.columns), source.text_column)
        named = [*dict(source.columns).values(), *([source.text_column] if source.text_column else [])]
        for path in source.files:
            try:
                names = readers.column_names(path, recipe.data.encoding)
            except (OSError, ValueError, pa.ArrowException) as exc:
                # The exception's own message is left out: it may quote the file's content.
                raise UserError(f"input {path}: cannot be read as {readers.file_format(path)} "
                                f"({type(exc).__name__})") from None
            if not names:
                log.warning("input %s: no rows", path)
                continue
            shown = ", ".join(sorted(names)[:30])
            missing = [c for c in named if c not in names]
            if missing:
                raise UserError(f"input {path}: the recipe maps column(s) {missing} that the file does not have "
                                f"(it has: {shown})")
            present = {field for field, column in mapping.items() if column in names}
            if not any(need <= present for need in REQUIRED[source.task]):
                need = " or ".join("+".join(sorted(n)) for n in REQUIRED[source.task])
                raise UserError(f"input {path}: task {source.task} needs {need}, and no column maps to them "
                                f"(it has: {shown}); map them with data.columns")
            ignored = sorted(names - set(mapping.values()))
            if ignored:
                log.info("input %s: ignoring column(s) %s", path, ", ".join(ignored[:30]))


def cache_key(recipe: Recipe, sources: list[Source]) -> str:
    """Changes whenever the inputs, the data section, the model/tokenizer or the pipeline code would
    change a row."""
    h = hashlib.sha256()
    h.update(json.dumps(recipe.data.model_dump(mode="json"), sort_keys=True).encode())
    h.update(json.dumps(recipe.model.model_dump(mode="json", exclude={"dtype", "attn_implementation",
                                                                       "gradient_checkpointing"}),
                        sort_keys=True).encode())
    h.update(str(recipe.pretrain.enabled).encode())
    for source in sorted(sources, key=lambda s: s.name):
        h.update(source.name.encode())
        for f in sorted(source.files):
            st = Path(f).stat()
            h.update(f"{Path(f).resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    if recipe.model.path and Path(recipe.model.path, "tokenizer.json").is_file():
        h.update(Path(recipe.model.path, "tokenizer.json").read_bytes())
    package = Path(__file__).parent
    for module in CODE:
        h.update((package / f"{module}.py").read_bytes())
    return h.hexdigest()[:16]


def reusable_manifest(out: Path, key: str) -> dict | None:
    """The previous manifest when it has this key and its outputs are all still there."""
    path = out / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("cache_key") != key:
        return None
    if not (out / "records").is_dir() or not all((out / name).is_dir() for name in manifest.get("packed", {})):
        return None
    return manifest


def clear_outputs(out: Path) -> None:
    """Remove what an earlier run wrote here, and nothing else (the directory may hold other files)."""
    for name in OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


# ------------------------------------------------------------------ the Ray Data passes


def one_block_per_file(count: int):
    """A dataset of the indices 0..count-1, one per block: each file gets a task of its own
    (`ray.data.from_items` hands all its blocks to a single task)."""
    import ray.data

    return ray.data.range(count, override_num_blocks=count)


def cleaned_dataset(recipe: Recipe, sources: list[Source]):
    """Pass 1: every input row as a cleaned, de-identified record (or a reject with its reason)."""
    import ray.data

    data = recipe.data
    if not sources[0].files:
        syn = data.synthetic
        blocks = max(2, min(1000, -(-syn.num_reports // BLOCK_ROWS)))
        ds = ray.data.range(syn.num_reports, override_num_blocks=blocks)
        ds = ds.map_batches(data_stages.synthetic_batch, batch_format="pyarrow", batch_size=None,
                            fn_kwargs={"seed": syn.seed, "defect_rate": syn.defect_rate, "task": data.task})
    else:
        files = [(path, s.name) for s in sources for path in s.files]
        ds = one_block_per_file(len(files)).map_batches(
            data_stages.read_files_batch, batch_format="pyarrow", batch_size=None,
            fn_kwargs={"files": files, "sources": {s.name: s.spec() for s in sources}, "encoding": data.encoding,
                       "max_field_chars": data.max_field_chars, "rows_per_block": BLOCK_ROWS})
        # A file is read by one task; cutting its stream into blocks here lets cleaning (the
        # expensive part) run on every core even for a single large file.
        ds = ds.repartition(target_num_rows_per_block=BLOCK_ROWS)
    return ds.map_batches(data_stages.clean_batch, batch_format="pyarrow", batch_size=BLOCK_ROWS,
                          fn_kwargs={"deidentify": data.deidentify, "min_findings_words": data.min_findings_words,
                                     "eval_fraction": data.splits.eval, "test_fraction": data.splits.test})


def selected_batches(cleaned: Path, selection: Selection, columns: list[str]):
    """Pyarrow batches of the cleaned records with the selection applied (for driver-side reads)."""
    dataset = pads.dataset(str(cleaned), format="parquet")
    for batch in dataset.to_batches(columns=sorted({*columns, *SELECTION_COLUMNS, "reject_reason", "split"}),
                                    batch_size=4096):
        yield data_stages.select_batch(pa.Table.from_batches([batch]), selection.duplicates, selection.thresholds)


def parquet_dataset(folder: Path):
    """The Parquet files under `folder` as a Ray dataset, each file read by the task that uses it.

    Not `ray.data.read_parquet`: its file-listing step (a ListFiles task) took 25-70 s per call on
    this 2-core machine with Ray 2.60, even for five small files. The pipeline's own
    intermediate files are known, so they are listed here and read directly.
    """
    files = [str(p) for p in sorted(folder.rglob("*.parquet"))]
    return one_block_per_file(len(files)).map_batches(data_stages.read_parquet_batch, batch_format="pyarrow",
                                                      batch_size=None, fn_kwargs={"files": files})


def tokens_dataset(recipe: Recipe, sources: list[Source], cleaned: Path, selection: Selection, tokenizer: Path):
    """Pass 3: the selection's drops become rejects; train and eval records get their token ids."""
    data = recipe.data
    # Whole blocks (one cleaned file each, BLOCK_ROWS rows at most): a batch size here would make
    # the fused read task wait for that many *files* and read them all itself.
    ds = parquet_dataset(cleaned)
    ds = ds.map_batches(data_stages.select_batch, batch_format="pyarrow", batch_size=None,
                        fn_kwargs={"duplicates": selection.duplicates, "thresholds": selection.thresholds})
    return ds.map_batches(data_stages.encode_batch, batch_format="pyarrow", batch_size=None,
                          fn_kwargs={"tokenizer_path": str(tokenizer), "chat_format": recipe.model.chat_format,
                                     "lead_in_probability": data.lead_in_probability,
                                     "max_length": data.pack_length, "overlong": data.overlong,
                                     "sft": data.task != "pretrain", "lm_tasks": lm_tasks(recipe, sources)})


def lm_tasks(recipe: Recipe, sources: list[Source]) -> list[str]:
    """The tasks whose records become language-modelling documents: those of pre-training sources
    when a mixture has some (continual pre-training on its own corpus), else every record."""
    if not (recipe.data.task == "pretrain" or recipe.pretrain.enabled):
        return []
    tasks = sorted({s.task for s in sources})
    return ["pretrain"] if "pretrain" in tasks else tasks


# ------------------------------------------------------------------ driver-side steps


def run_selection(recipe: Recipe, sources: list[Source], cleaned: Path) -> Selection:
    dataset = pads.dataset(str(cleaned), format="parquet")
    batches = dataset.to_batches(columns=SELECTION_COLUMNS, filter=pc.field("reject_reason").is_null(),
                                 batch_size=65536)
    targets = {s.name: s.target for s in sources if s.target is not None}
    return select(batches, targets, recipe.data.deduplicate)


def check_model_path(recipe: Recipe) -> None:
    if recipe.model.path and not Path(recipe.model.path).is_dir():
        raise UserError(f"model.path {recipe.model.path}: no such directory")


def resolve_base_model(recipe: Recipe, cleaned: Path, selection: Selection, out: Path) -> Path:
    """The recipe's model directory, or the embedded tiny Llama built on this run's training texts."""
    if recipe.model.path:
        return Path(recipe.model.path)
    from pipelines.models import build_embedded_base

    columns = ["task", "text", "exam_code", "findings", "impression", "instruction", "input", "output"]

    def corpus():
        for table in selected_batches(cleaned, selection, columns):
            for row in table.filter(pc.equal(table.column("split"), "train")).select(columns).to_pylist():
                yield data_stages.document_text(row)

    return build_embedded_base(recipe.model, corpus(), out / "base_model")


def write_records(tokens: Path, out: Path) -> None:
    """records/ is the tokenized pass's output without its token columns, file by file."""
    keep = [name for name in data_stages.RECORD_SCHEMA.names if name != "split"]
    for folder in sorted(tokens.glob("split=*")):
        dest = out / "records" / folder.name
        dest.mkdir(parents=True, exist_ok=True)
        for path in sorted(folder.glob("*.parquet")):
            pq.write_table(pq.read_table(path, columns=keep), dest / path.name)


def write_rejects(out: Path) -> None:
    folder = out / "records" / "split=rejected"
    with open(out / "rejects.jsonl", "w") as fh:
        if not folder.is_dir():
            return
        dataset = pads.dataset(str(folder), format="parquet")
        for batch in dataset.to_batches(columns=["id", "source", "file", "row", "reject_reason"]):
            for row in batch.to_pylist():
                row["reason"] = row.pop("reject_reason")
                fh.write(json.dumps(row) + "\n")


def pack_all(recipe: Recipe, sources: list[Source], tokens: Path, out: Path, tokenizer: Path) -> dict[str, dict]:
    """Pack each split's examples, one Ray task per shard set (sft/train, sft/eval, ...)."""
    import ray

    from pipelines.models import load_tokenizer
    from pipelines.packing import pack_shards

    data = recipe.data
    pad_id = load_tokenizer(tokenizer, recipe.model.chat_format).pad_token_id
    kinds = ([("sft", "sft_ids", "sft_labels")] if data.task != "pretrain" else []) + \
        ([("pretrain", "lm_ids", None)] if lm_tasks(recipe, sources) else [])
    task = ray.remote(num_cpus=1)(pack_shards)
    refs = {}
    for kind, ids_column, labels_column in kinds:
        for split in ("train", "eval"):
            source = tokens / f"split={split}"
            if source.is_dir():
                refs[f"{kind}/{split}"] = task.remote(str(source), str(out / kind / split), ids_column,
                                                      labels_column, data.pack_length, pad_id, data.pack_window)
    return dict(zip(refs, ray.get(list(refs.values()))))


def count_records(out: Path) -> dict[str, Counter]:
    """Rows per split, reject reason, input file and (kept rows) source, and PHI per type, streamed."""
    records = pads.dataset(str(out / "records"), format="parquet", partitioning="hive")
    counts: dict[str, Counter] = {name: Counter() for name in ("split", "reject_reason", "file", "source", "phi")}
    for batch in records.to_batches(columns=["split", "reject_reason", "file", "source", "phi"], batch_size=65536):
        kept = batch.filter(pc.is_null(batch.column("reject_reason")))
        for name, column in (("split", batch.column("split")), ("reject_reason", batch.column("reject_reason")),
                             ("file", batch.column("file")), ("source", kept.column("source"))):
            for item in pc.value_counts(column).to_pylist():
                counts[name][item["values"]] += item["counts"]
        for found in batch.column("phi").to_pylist():
            if found != "{}":
                counts["phi"].update(json.loads(found))
    counts["reject_reason"].pop(None, None)
    return counts


def summarize(recipe: Recipe, sources: list[Source], out: Path, tokens: Path, selection: Selection,
              packed: dict[str, dict]) -> dict:
    counts = count_records(out)
    reasons = counts["reject_reason"]
    truncated = pads.dataset(str(tokens), format="parquet").to_table(columns=["truncated"]).column("truncated")
    manifest = {
        "recipe": recipe.name, "task": recipe.data.task,
        "rows_read": sum(counts["split"].values()), "rows_kept": sum(counts["source"].values()),
        "rows_rejected": sum(reasons.values()), "rejects_by_reason": dict(sorted(reasons.items())),
        "splits": {s: counts["split"].get(s, 0) for s in ("train", "eval", "test")},
        "inputs": dict(sorted(counts["file"].items())),
        "phi_replacements": {kind: counts["phi"].get(kind, 0) for kind in PHI_TYPES},
        "pack_length": recipe.data.pack_length, "truncated_examples": pc.sum(truncated).as_py() or 0, "packed": {},
    }
    for name, stats in sorted(packed.items()):
        slots = stats["rows"] * recipe.data.pack_length
        # Against naive padding: every example alone in a row of the same length.
        padded = stats["examples"] * recipe.data.pack_length
        manifest["packed"][name] = {**stats, "efficiency": round(stats["tokens"] / slots, 4) if slots else None,
                                    "padding_efficiency": round(stats["tokens"] / padded, 4) if padded else None}
    if selection.targets:
        achieved = counts["source"]
        total_target, total_achieved = sum(selection.targets.values()), sum(achieved.values())
        manifest["mixture"] = {s.name: {
            "target": selection.targets[s.name], "available": selection.available.get(s.name, 0),
            "achieved": achieved.get(s.name, 0),
            "target_share": round(selection.targets[s.name] / total_target, 4) if total_target else None,
            "achieved_share": round(achieved.get(s.name, 0) / total_achieved, 4) if total_achieved else None,
        } for s in sources}
    return manifest


# ------------------------------------------------------------------ the whole preparation


def prepare(recipe: Recipe, inputs: list[str] | None = None, output: str | Path | None = None, *,
            address: str | None = None) -> dict:
    """Run the whole preparation; returns the manifest (cached when nothing changed).

    `address`: the Ray cluster to run on (default: RAY_ADDRESS, else a local Ray), joined only
    once the inputs and the recipe have been checked."""
    sources = plan_sources(recipe, inputs)
    check_tasks(recipe, sources)
    check_columns(recipe, sources)
    check_model_path(recipe)
    out = Path(output or Path(recipe.output_dir) / "data")
    key = cache_key(recipe, sources)
    previous = reusable_manifest(out, key)
    if previous is not None:
        log.info("inputs, data section, tokenizer and code unchanged (cache key %s): reusing %s", key, out)
        return previous
    clear_outputs(out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(recipe.data.cache_dir or out / "cache") / key
    if work.exists():
        shutil.rmtree(work)
    start = time.time()
    seconds: dict[str, float] = {}

    def timed(name: str, fn, *args):
        t = time.time()
        result = fn(*args)
        seconds[name] = round(time.time() - t, 2)
        return result

    init_ray(address)
    timed("clean", lambda: cleaned_dataset(recipe, sources).write_parquet(str(work / "cleaned")))
    if not (work / "cleaned").is_dir():
        raise UserError("the inputs hold no rows")
    selection = timed("select", run_selection, recipe, sources, work / "cleaned")
    base = timed("base_model", resolve_base_model, recipe, work / "cleaned", selection, out)
    timed("tokenize", lambda: tokens_dataset(recipe, sources, work / "cleaned", selection, base).write_parquet(
        str(work / "tokens"), partition_cols=["split"]))
    timed("records", lambda: (write_records(work / "tokens", out), write_rejects(out)))
    packed = timed("pack", pack_all, recipe, sources, work / "tokens", out, base)
    manifest = summarize(recipe, sources, out, work / "tokens", selection, packed)
    wall = time.time() - start
    manifest.update(cache_key=key, base_model=str(base), tokenizer=tokenizer_fingerprint(base),
                    wall_seconds=round(wall, 2), stage_seconds=seconds,
                    rows_per_second=round(manifest["rows_read"] / wall, 1) if wall else None)
    shutil.rmtree(work)
    if recipe.data.cache_dir is None:
        shutil.rmtree(out / "cache")
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    log.info("read %d rows: kept %d, rejected %d %s", manifest["rows_read"], manifest["rows_kept"],
             manifest["rows_rejected"], manifest["rejects_by_reason"])
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = recipe_parser(__doc__.splitlines()[0])
    parser.add_argument("--input", action="append", default=None, metavar="PATH_OR_GLOB",
                        help="input file(s): CSV, JSON, JSONL or Parquet (default: the recipe's data.inputs)")
    args = parser.parse_args(argv)
    recipe = parse_recipe(args)
    manifest = prepare(recipe, args.input, args.output, address=args.address)
    print(json.dumps({k: manifest[k] for k in ("rows_read", "rows_kept", "rows_rejected", "rejects_by_reason",
                                               "splits", "packed")}))
    return 0


run = main_wrapper(main)

if __name__ == "__main__":
    run()
