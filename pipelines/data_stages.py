"""The preparation stages: small pure functions over Arrow batches, composed by `pipelines.prepare`.

Each stage is deterministic and idempotent (a retried Ray task gives the same rows) and keeps
every input row: a row that cannot be used gets a `reject_reason` (and split "rejected") instead
of disappearing, so rows read = kept + rejected holds at every step. A rejected row never carries
raw text: either it was rejected before any text was read, or its text is already de-identified.

    read_files_batch / synthetic_batch -> clean_batch -> [global selection] -> select_batch -> encode_batch
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import prompts
from pipelines.packing import IGNORE
from pipelines.readers import iter_rows

TEXT_FIELDS = ("exam_code", "modality", "findings", "impression", "text", "instruction", "input", "output")
RAW_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("task", pa.string()), ("file", pa.string()),
                        ("row", pa.int64()), ("reject_reason", pa.string()),
                        *[(f, pa.string()) for f in TEXT_FIELDS]])
# What records/ holds: the audit trail. content_hash links a rejected duplicate to the kept copy.
RECORD_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("split", pa.string()),
                           ("reject_reason", pa.string()), ("task", pa.string()),
                           *[(f, pa.string()) for f in TEXT_FIELDS],
                           ("phi", pa.string()), ("file", pa.string()), ("row", pa.int64()),
                           ("content_hash", pa.uint64())])
# Keys for the global selection: which copy of a duplicate is kept, and the mixture sampling order.
CLEANED_SCHEMA = RECORD_SCHEMA.append(pa.field("row_key", pa.uint64())).append(pa.field("sample_key", pa.uint64()))
TOKEN_COLUMNS = [("sft_ids", pa.list_(pa.int32())), ("sft_labels", pa.list_(pa.int32())),
                 ("truncated", pa.bool_()), ("lm_ids", pa.list_(pa.int32()))]
TOKENS_SCHEMA = pa.schema([*CLEANED_SCHEMA, *[pa.field(n, t) for n, t in TOKEN_COLUMNS]])

# Fields that make up one training example, per task: exact duplicates are judged on these.
EXAMPLE_FIELDS = {"impression": ("exam_code", "findings", "impression"),
                  "instruct": ("instruction", "input", "output"),
                  "pretrain": ("text", "exam_code", "findings", "impression")}
_SURROGATE = re.compile("[\ud800-\udfff]")  # what undecodable bytes become (surrogateescape)
_SCALARS = (str, int, float, bool)


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


def _table(columns: dict[str, list], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pydict({name: columns[name] for name in schema.names}, schema=schema)


# ------------------------------------------------------------------ reading


def field_value(value: Any, max_chars: int) -> tuple[str | None, str | None]:
    """(text or None, reject reason or None) for one input value, whatever its type."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None, None
    if not isinstance(value, _SCALARS):
        return None, "bad_field_type"
    text = value if isinstance(value, str) else str(value)
    if _SURROGATE.search(text):
        return None, "bad_encoding"
    if len(text) > max_chars:
        return None, "oversized_field"
    return (text if text.strip() else None), None


def canonical_row(values: dict[str, Any] | None, error: str | None, mapping: dict[str, str], max_chars: int,
                  ) -> dict[str, Any]:
    """The record fields of one parsed input row; a bad row keeps its reason and, when that
    parsed, its id, never its text."""
    row: dict[str, Any] = {"reject_reason": error, "id": None, **dict.fromkeys(TEXT_FIELDS)}
    if values is None:
        return row
    for field, column in mapping.items():
        text, reason = field_value(values.get(column), max_chars)
        if reason:
            row.update(dict.fromkeys(TEXT_FIELDS), reject_reason=reason)
            return row
        row[field] = text.strip() if field == "id" and text else text
    return row


def field_mapping(columns: dict[str, str], text_column: str | None) -> dict[str, str]:
    """Record field -> input column: the recipe's names, the canonical names for the rest."""
    mapping = {field: field for field in ("id", *TEXT_FIELDS)}
    mapping.update(columns)
    if text_column:
        mapping["text"] = text_column
    return mapping


def read_files_batch(batch: pa.Table, files: list[tuple[str, str]], sources: dict[str, dict], encoding: str,
                     max_field_chars: int, rows_per_block: int) -> Iterator[pa.Table]:
    """Stream the rows of the files whose indices are in `batch['id']` as canonical blocks.

    `files` holds (path, source name); `sources` maps a source name to its task, columns and text_column.
    """
    for index in batch.column("id").to_pylist():
        path, source = files[index]
        spec = sources[source]
        mapping = field_mapping(spec["columns"], spec["text_column"])
        wanted = sorted(set(mapping.values()))
        columns: dict[str, list] = {name: [] for name in RAW_SCHEMA.names}
        for raw in iter_rows(path, encoding, wanted):
            row = canonical_row(raw.values, raw.error, mapping, max_field_chars)
            row.update(source=source, task=spec["task"], file=path, row=raw.row)
            for name, values in columns.items():
                values.append(row[name])
            if len(columns["row"]) >= rows_per_block:
                yield _table(columns, RAW_SCHEMA)
                columns = {name: [] for name in RAW_SCHEMA.names}
        if columns["row"]:
            yield _table(columns, RAW_SCHEMA)


def read_parquet_batch(batch: pa.Table, files: list[str]) -> pa.Table:
    """The rows of the Parquet files whose indices are in `batch['id']` (the pipeline's own files)."""
    return pa.concat_tables([pq.read_table(files[index]) for index in batch.column("id").to_pylist()])


def synthetic_batch(batch: pa.Table, seed: int, defect_rate: float, task: str) -> pa.Table:
    """The synthetic reports whose indices are in `batch['id']` (a Ray range block)."""
    from pipelines.synthetic import iter_reports

    indices = batch.column("id").to_pylist()
    rows = list(iter_reports(len(indices), seed=seed, defect_rate=defect_rate, start=indices[0]))
    columns: dict[str, list] = {name: [None] * len(rows) for name in RAW_SCHEMA.names}
    for name in ("id", "exam_code", "modality", "text"):
        columns[name] = [r[name] for r in rows]
    columns.update(source=["synthetic"] * len(rows), task=[task] * len(rows), file=["synthetic"] * len(rows),
                   row=[i + 1 for i in indices])
    return _table(columns, RAW_SCHEMA)


# ------------------------------------------------------------------ cleaning


@lru_cache(maxsize=1)
def _deidentifier():
    from pipelines.deid import Deidentifier

    return Deidentifier()


def collapse(text: str | None) -> str | None:
    """One line: every run of whitespace becomes one space (the study's clean-up)."""
    collapsed = " ".join(text.split()) if text else ""
    return collapsed or None


def tidy(text: str | None) -> str | None:
    """Blanks collapsed, line breaks kept (at most one empty line): for documents and instructions."""
    if not text:
        return None
    lines = [" ".join(line.split()) for line in text.strip().splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)) or None


def document_text(record: dict[str, Any]) -> str:
    """A record as plain text for language modelling (every token is trained on)."""
    if record.get("task") == "instruct":
        return "\n\n".join(record[f] for f in ("instruction", "input", "output") if record.get(f))
    return prompts.pretrain_text(record)


def _clean_record(rec: dict[str, Any], deidentify: bool, phi: dict[str, int]) -> None:
    """De-identify the text fields in place (counting PHI per type), cut sections out of free text."""
    deid = _deidentifier() if deidentify else None

    def redact(text: str | None) -> str | None:
        if deid is None or not text:
            return text
        text, found = deid.redact(text)
        for kind, n in found.items():
            if n:
                phi[kind] = phi.get(kind, 0) + n
        return text

    # The whole report is redacted before its sections are cut out of it, so that a name found in
    # the header is also removed where it recurs in the findings, and nothing is redacted twice.
    for field in ("text", "findings", "impression", "instruction", "input", "output"):
        rec[field] = redact(rec[field])
    if rec["task"] == "impression" and rec["text"] and not (rec["findings"] and rec["impression"]):
        from pipelines.sections import extract_sections

        sections = extract_sections(rec["text"])
        rec["findings"] = rec["findings"] or sections.findings
        rec["impression"] = rec["impression"] or sections.impression
        rec["exam_code"] = rec["exam_code"] or sections.exam
        rec["modality"] = rec["modality"] or sections.modality
    for field in ("exam_code", "modality", "findings", "impression"):
        rec[field] = collapse(rec[field])
    for field in ("text", "instruction", "input", "output"):
        rec[field] = tidy(rec[field])


def quality_reason(rec: dict[str, Any], min_findings_words: int) -> str | None:
    """Why a cleaned record cannot make a training example of its task (None: it can)."""
    task = rec["task"]
    if task == "pretrain":
        return None if rec["text"] or rec["findings"] or rec["impression"] else "empty_text"
    if task == "instruct":
        return "missing_instruction" if not rec["instruction"] else "missing_output" if not rec["output"] else None
    if not rec["findings"]:
        return "missing_findings"
    if not rec["impression"]:
        return "missing_impression"
    if len(rec["findings"].split()) < min_findings_words:
        return "short_findings"
    return None


def assign_split(record_id: str, eval_fraction: float, test_fraction: float) -> str:
    """train / eval / test by a stable hash of the id: the same record always lands in the same split."""
    u = prompts.stable_fraction(record_id, "split")
    return "test" if u < test_fraction else "eval" if u < test_fraction + eval_fraction else "train"


def clean_batch(batch: pa.Table, deidentify: bool, min_findings_words: int, eval_fraction: float,
                test_fraction: float) -> pa.Table:
    """De-identify, extract sections, apply the quality filters, hash the content, assign the split."""
    records = batch.to_pylist()
    for rec in records:
        phi: dict[str, int] = {}
        if rec["reject_reason"] is None:
            _clean_record(rec, deidentify, phi)
            rec["reject_reason"] = quality_reason(rec, min_findings_words)
        example = "\x1f".join(rec[f] or "" for f in EXAMPLE_FIELDS[rec["task"]])
        has_text = any(rec[f] for f in TEXT_FIELDS)
        rec["content_hash"] = _hash64(f"{rec['task']}\x1f{example}") if has_text else None
        if rec["id"] is None and has_text:
            rec["id"] = f"h{rec['content_hash']:016x}"  # stable across reruns, file order and workers
        rec["phi"] = json.dumps(phi, sort_keys=True)
        rec["row_key"] = _hash64(f"{Path(rec['file']).name}\x1f{rec['row']}")
        rec["sample_key"] = _hash64(f"{rec['source']}\x1f{rec['id']}")
        rec["split"] = ("rejected" if rec["reject_reason"] else
                        assign_split(rec["id"], eval_fraction, test_fraction))
    return pa.Table.from_pylist(records, schema=CLEANED_SCHEMA)


# ------------------------------------------------------------------ selection


def select_batch(batch: pa.Table, duplicates: np.ndarray, thresholds: dict[str, tuple[int, int]]) -> pa.Table:
    """Reject the rows the global selection dropped: later copies of a duplicate, and the rows a
    mixture source was sampled down without (those above the source's (sample_key, row_key) cut)."""
    reasons = batch.column("reject_reason").to_pylist()
    splits = batch.column("split").to_pylist()
    row_keys = batch.column("row_key").to_numpy(zero_copy_only=False)
    if len(duplicates):  # a binary search per row: the duplicates can be many, a batch is small
        is_duplicate = duplicates[np.minimum(np.searchsorted(duplicates, row_keys), len(duplicates) - 1)] == row_keys
    else:
        is_duplicate = np.zeros(len(row_keys), bool)
    sources = batch.column("source").to_pylist()
    sample_keys = batch.column("sample_key").to_pylist()
    for i, reason in enumerate(reasons):
        if reason is not None:
            continue
        cut = thresholds.get(sources[i])
        if is_duplicate[i]:
            reasons[i] = "duplicate"
        elif cut is not None and (sample_keys[i], int(row_keys[i])) > cut:
            reasons[i] = "not_sampled"
        else:
            continue
        splits[i] = "rejected"
    batch = batch.set_column(batch.schema.get_field_index("reject_reason"), "reject_reason",
                             pa.array(reasons, pa.string()))
    return batch.set_column(batch.schema.get_field_index("split"), "split", pa.array(splits, pa.string()))


# ------------------------------------------------------------------ tokens


@lru_cache(maxsize=2)
def _tokenizer(path: str, chat_format: str):
    from pipelines.models import load_tokenizer

    return load_tokenizer(path, chat_format)


def sft_pair(record: dict[str, Any], lead_in_probability: float) -> tuple[list[dict[str, str]], str]:
    """Chat messages and the expected answer of a supervised record (impression or instruct)."""
    if record["task"] == "instruct":
        return prompts.instruct_messages(record["instruction"], record["input"]), record["output"]
    return prompts.impression_example(record, lead_in_probability)


def encode_sft(tok, records: list[dict[str, Any]], chat_format: str, lead_in_probability: float,
               ) -> tuple[list[list[int]], list[list[int]]]:
    """input_ids and labels (-100 on the prompt), exactly as `prompts.supervised_example` builds them,
    but rendered and tokenized a batch at a time (the tokenizer runs its batch in parallel)."""
    pairs = [sft_pair(r, lead_in_probability) for r in records]
    if not pairs:
        return [], []
    rendered = tok.apply_chat_template([m for m, _ in pairs], add_generation_prompt=True, tokenize=False)
    prompt_ids = tok(rendered, add_special_tokens=False)["input_ids"]
    end = tok.convert_tokens_to_ids(prompts.END_OF_TURN[chat_format])
    answer_ids = [ids + [end] for ids in tok([a.strip() for _, a in pairs], add_special_tokens=False)["input_ids"]]
    return ([p + a for p, a in zip(prompt_ids, answer_ids)],
            [[IGNORE] * len(p) + a for p, a in zip(prompt_ids, answer_ids)])


def encode_batch(batch: pa.Table, tokenizer_path: str, chat_format: str, lead_in_probability: float,
                 max_length: int, overlong: str, sft: bool, lm_tasks: list[str]) -> pa.Table:
    """Tokenize the train and eval records: a supervised example (`sft`) for impression and instruct
    records, a plain document for the records whose task is in `lm_tasks`. A supervised example
    longer than `max_length` is truncated or, per recipe, rejects its record ("overlong").
    Documents are never cut here: packing chunks them into rows (and counts them)."""
    tok = _tokenizer(tokenizer_path, chat_format)
    records = batch.to_pylist()
    n = len(records)
    out: dict[str, list] = {"sft_ids": [None] * n, "sft_labels": [None] * n, "truncated": [False] * n,
                            "lm_ids": [None] * n}
    todo = [i for i, r in enumerate(records) if r["split"] in ("train", "eval")]
    if sft:
        supervised = [i for i in todo if records[i]["task"] != "pretrain"]
        ids, labels = encode_sft(tok, [records[i] for i in supervised], chat_format, lead_in_probability)
        for i, example_ids, example_labels in zip(supervised, ids, labels):
            if len(example_ids) > max_length:
                if overlong == "reject":
                    records[i].update(reject_reason="overlong", split="rejected")
                    continue
                example_ids, example_labels = example_ids[:max_length], example_labels[:max_length]
                out["truncated"][i] = True
            out["sft_ids"][i], out["sft_labels"][i] = example_ids, example_labels
    documents = [i for i in todo if records[i]["task"] in lm_tasks and records[i]["split"] != "rejected"]
    if documents:
        encoded = tok([document_text(records[i]) for i in documents], add_special_tokens=False)["input_ids"]
        for i, ids in zip(documents, encoded):
            out["lm_ids"][i] = [tok.bos_token_id, *ids, tok.eos_token_id]
    for i, rec in enumerate(records):
        for name in out:
            rec[name] = out[name][i]
    return pa.Table.from_pylist(records, schema=TOKENS_SCHEMA)
