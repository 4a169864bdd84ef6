"""What an evaluation reads: held-out reports, prediction files, benchmark files, training texts.

Prepared data (from `pipelines.prepare`): DATA/records/split={train,test}/*.parquet. Benchmark
files follow the shared multiple-choice schema (see pipelines.mcq); with no files in the recipe,
the public benchmarks beside the checkout (../shared/data/mcqa) are used when present.
"""

from __future__ import annotations

import glob
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads

from pipelines.cli import UserError
from pipelines.config import EvaluationConfig
from pipelines.mcq import LoadReport, MCQItem, load_mcq
from pipelines.model_under_test import ModelSpec, parse_model_spec
from pipelines.prompts import pretrain_text, stable_fraction

TEST_COLUMNS = ["id", "exam_code", "findings", "impression"]
SHARED_MCQA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mcqa"
DEFAULT_MCQ_FILES = ["medqa_usmle_4opt_test.jsonl", "medmcqa_dev.jsonl", "mmlu_medical6_test.jsonl",
                     "headqa_en_test.jsonl", "pubmedqa_pqal.jsonl#test"]
DEFAULT_FORGETTING_FILE = "mmlu_general_subset_test.jsonl"


@dataclass(frozen=True)
class Example:
    """One report to write (or score) an impression for."""

    id: str
    reference: str
    findings: str | None = None
    exam_code: str | None = None

    def as_text(self) -> str:
        """The report as training saw it (for decontamination)."""
        return pretrain_text({"exam_code": self.exam_code, "findings": self.findings, "impression": self.reference})


# ----------------------------------------------------------------------------- held-out reports


def load_test_records(data_dir: Path, limit: int | None) -> list[dict]:
    folder = Path(data_dir) / "records" / "split=test"
    if not folder.is_dir():
        raise UserError(f"data {data_dir}: no held-out test records (records/split=test); "
                        "prepare with data.splits.test > 0")
    rows = pads.dataset(str(folder), format="parquet").to_table(columns=TEST_COLUMNS).to_pylist()
    rows.sort(key=lambda r: r["id"])
    if not rows:
        raise UserError(f"data {data_dir}: the test split is empty")
    return rows[:limit] if limit else rows


def test_examples(data_dir: Path, limit: int | None) -> list[Example]:
    return [Example(str(r["id"]), r["impression"], r["findings"], r["exam_code"])
            for r in load_test_records(data_dir, limit)]


def _train_split(data_dir: Path):
    folder = Path(data_dir) / "records" / "split=train"
    return pads.dataset(str(folder), format="parquet") if folder.is_dir() else None


def most_frequent_impression(data_dir: Path | None) -> str | None:
    """The mode of the training impressions, or None without training records."""
    split = _train_split(data_dir) if data_dir else None
    if split is None:
        return None
    counts = Counter(v for v in split.to_table(columns=["impression"]).column("impression").to_pylist() if v)
    return counts.most_common(1)[0][0] if counts else None


def training_text(record: dict) -> str:
    """A training record as plain text: its document, its instruction turn, or its report."""
    turn = [record[f] for f in ("instruction", "input", "output") if record.get(f)]
    return "\n\n".join(turn) if turn and not record.get("text") else pretrain_text(record)


class TrainingTexts:
    """The training records as text, streamed; their ids are kept (one Arrow column, compact) so
    that a flagged evaluation item can name its nearest training record."""

    FIELDS = ("id", "text", "exam_code", "findings", "impression", "instruction", "input", "output")

    def __init__(self, data_dir: Path | None):
        self.split = _train_split(data_dir) if data_dir else None
        self.ids = pa.chunked_array([], type=pa.string())

    def __bool__(self) -> bool:
        return self.split is not None

    def __iter__(self) -> Iterator[str]:
        columns = [c for c in self.FIELDS if c in self.split.schema.names]
        chunks = []
        for batch in self.split.to_batches(columns=columns, batch_size=4096):
            chunks.append(batch.column("id").cast(pa.string()))
            yield from (training_text(row) for row in batch.to_pylist())
        self.ids = pa.chunked_array(chunks, type=pa.string())

    def id_at(self, index: int) -> str | None:
        return self.ids[index].as_py() if 0 <= index < len(self.ids) else None


def first_sentence(text: str) -> str:
    return re.split(r"(?<=[.!?])\s+", text.strip(), maxsplit=1)[0]


# ----------------------------------------------------------------------------- prediction files


def parse_predictions_arg(text: str) -> tuple[str, Path]:
    """`[NAME=]FILE`; the name defaults to the file's stem."""
    name, sep, path = text.partition("=")
    if not sep or Path(text).is_file():
        name, path = Path(text).stem, text
    if not Path(path).is_file():
        raise UserError(f"--predictions {path}: no such file")
    return name, Path(path)


def load_predictions(path: Path) -> tuple[list[Example], list[str]]:
    """Examples and predictions from JSONL rows `id`, `prediction`, `reference` [, `findings`]."""
    examples, predictions, seen = [], [], set()
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise UserError(f"--predictions {path}: not UTF-8 text") from None
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"--predictions {path} line {line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{where}: not valid JSON") from None
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected an object with id, prediction, reference")
        if not isinstance(row.get("id"), (str, int)):
            raise UserError(f"{where}: missing 'id'")
        if not isinstance(row.get("prediction"), str):
            raise UserError(f"{where}: missing or non-text 'prediction'")
        if not isinstance(row.get("reference"), str) or not row["reference"].strip():
            raise UserError(f"{where}: missing or empty 'reference'")
        if str(row["id"]) in seen:
            raise UserError(f"{where}: duplicate id {row['id']!r}")
        seen.add(str(row["id"]))
        findings = row.get("findings") if isinstance(row.get("findings"), str) else None
        exam_code = row.get("exam_code") if isinstance(row.get("exam_code"), str) else None
        examples.append(Example(str(row["id"]), row["reference"], findings, exam_code))
        predictions.append(row["prediction"])
    if not examples:
        raise UserError(f"--predictions {path}: no rows")
    return examples, predictions


def load_prediction_files(args: list[str]) -> tuple[list[Example], dict[str, list[str]]]:
    """Several files must score the same reports: they are aligned on the first file's ids."""
    examples: list[Example] = []
    by_model: dict[str, list[str]] = {}
    for arg in args:
        name, path = parse_predictions_arg(arg)
        if name in by_model:
            raise UserError(f"--predictions {arg}: the name {name!r} is used twice (write NAME=FILE)")
        rows, preds = load_predictions(path)
        if not examples:
            examples = rows
        elif sorted(r.id for r in rows) != sorted(e.id for e in examples):
            raise UserError(f"--predictions {path}: its ids differ from those of the first predictions file")
        order = {r.id: p for r, p in zip(rows, preds)}
        by_model[name] = [order[e.id] for e in examples]
    return examples, by_model


# ----------------------------------------------------------------------------- benchmarks


@dataclass(frozen=True)
class Benchmark:
    name: str  # the file's stem: "mmlu" alone would not tell the medical from the general subset
    path: Path
    splits: tuple[str, ...] | None  # from PATH#SPLIT[,SPLIT]


def parse_benchmark(entry: str) -> Benchmark:
    path, _, splits = entry.partition("#")
    return Benchmark(Path(path).name.removesuffix(".jsonl"), Path(path),
                     tuple(s for s in splits.split(",") if s) or None)


def benchmark_files(ev: EvaluationConfig) -> list[Benchmark]:
    entries = ev.mcq_files or ([str(SHARED_MCQA / f) for f in DEFAULT_MCQ_FILES] if SHARED_MCQA.is_dir() else [])
    return [parse_benchmark(e) for e in entries]


def forgetting_benchmark(ev: EvaluationConfig) -> Benchmark | None:
    if ev.forgetting_file:
        return parse_benchmark(ev.forgetting_file)
    default = SHARED_MCQA / DEFAULT_FORGETTING_FILE
    return parse_benchmark(str(default)) if default.is_file() else None


def load_benchmark(bench: Benchmark, limit: int | None) -> tuple[list[MCQItem], LoadReport]:
    """Usable items (renamed to the benchmark) and the loader's kept/skipped counts; a stable
    sample by id when `limit` is set, so every model and every rerun sees the same questions."""
    if not bench.path.is_file():
        raise FileNotFoundError("no such file")
    items, report = load_mcq(bench.path, splits=bench.splits)
    items = [replace(item, dataset=bench.name) for item in items]
    if limit and len(items) > limit:
        items = sorted(items, key=lambda item: stable_fraction(item.id, "mcq"))[:limit]
    return items, report


# ----------------------------------------------------------------------------- checkpoints


def _natural_key(path: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def checkpoint_specs(patterns: list[str]) -> tuple[list[ModelSpec], list[str]]:
    """Model or adapter directories matched by the patterns, in natural order (step 2 before 10);
    a Ray Train checkpoint holding an `adapter/` or `model/` folder counts as that folder."""
    specs, skipped = [], []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern), key=_natural_key) or [pattern]
        for match in matches:
            path = Path(match)
            inner = next((path / sub for sub in ("adapter", "model") if (path / sub).is_dir()), path)
            try:
                specs.append(parse_model_spec(f"{path.parent.name}/{path.name}={inner}"))
            except UserError:
                skipped.append(f"{match}: not a model or adapter directory (consolidate ZeRO checkpoints first)")
    return specs, skipped
