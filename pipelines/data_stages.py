"""The preparation stages: small pure functions over pandas batches, composed by `prepare`.

Each stage is deterministic and idempotent (a retried Ray task gives the same rows), and keeps
every input row: a row that cannot be used gets a `reject_reason` instead of disappearing.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache

import pandas as pd

from pipelines import prompts
from pipelines.packing import IGNORE, pack_examples

CANONICAL = ["id", "exam_code", "modality", "findings", "impression", "text"]
RECORD_COLUMNS = ["id", "source", "split", "reject_reason", "exam_code", "modality", "findings", "impression",
                  "text", "phi"]


# ------------------------------------------------------------------ records


def synthetic_batch(batch: pd.DataFrame, seed: int, defect_rate: float) -> pd.DataFrame:
    """Generate the synthetic reports whose indices are in `batch['id']` (a Ray range block)."""
    from pipelines.synthetic import iter_reports

    start, count = int(batch["id"].iloc[0]), len(batch)
    rows = list(iter_reports(count, seed=seed, defect_rate=defect_rate, start=start))
    frame = pd.DataFrame(rows)
    frame["source"] = "synthetic"
    return frame


def _clean(value) -> str | None:
    if not isinstance(value, str) and (value is None or pd.isna(value)):
        return None
    text = " ".join(str(value).split())
    return text or None


def normalize_batch(batch: pd.DataFrame, columns: dict[str, str], text_column: str | None, source: str,
                    ) -> pd.DataFrame:
    """Map input columns to the canonical fields; split free text into sections where needed."""
    from pipelines.sections import extract_sections

    rename = {col: field for field, col in columns.items()}
    if text_column:
        rename[text_column] = "text"
    batch = batch.rename(columns=rename)
    out = {field: [None] * len(batch) for field in CANONICAL}
    for field in CANONICAL:
        if field in batch.columns:
            out[field] = list(batch[field])
    records = []
    for i in range(len(batch)):
        rec = {field: out[field][i] for field in CANONICAL}
        raw_text = rec["text"] if isinstance(rec["text"], str) else None
        if raw_text and not (_clean(rec["findings"]) and _clean(rec["impression"])):
            sections = extract_sections(raw_text)
            rec["findings"] = rec["findings"] if _clean(rec["findings"]) else sections.findings
            rec["impression"] = rec["impression"] if _clean(rec["impression"]) else sections.impression
            rec["exam_code"] = rec["exam_code"] if _clean(rec["exam_code"]) else sections.exam
            rec["modality"] = rec["modality"] if _clean(rec["modality"]) else sections.modality
        rec["text"] = raw_text
        rec["source"] = source
        records.append(rec)
    frame = pd.DataFrame.from_records(records, columns=CANONICAL + ["source"])
    missing_id = frame["id"].isna()
    if missing_id.any():
        # No id column: a content hash is stable across reruns, file order and worker count.
        frame.loc[missing_id, "id"] = [_content_id(r) for r in frame[missing_id].itertuples(index=False)]
    frame["id"] = frame["id"].astype(str)
    return frame


def _content_id(row) -> str:
    key = "\x1f".join(str(getattr(row, f) or "") for f in ("exam_code", "findings", "impression", "text"))
    return "h" + hashlib.blake2b(key.encode(), digest_size=8).hexdigest()


@lru_cache(maxsize=1)
def _deidentifier():
    from pipelines.deid import Deidentifier

    return Deidentifier()


def clean_batch(batch: pd.DataFrame, task: str, min_findings_words: int, deidentify: bool) -> pd.DataFrame:
    """De-identify, collapse whitespace, and mark rows that fail the study's quality filters."""
    deid = _deidentifier() if deidentify else None
    records = batch.to_dict("records")
    for rec in records:
        counts: dict[str, int] = {}
        for column in ("findings", "impression", "text", "exam_code", "modality"):
            value = _clean(rec[column])
            if value and deid is not None and column in ("findings", "impression", "text"):
                value, found = deid.redact(value)
                for kind, n in found.items():
                    counts[kind] = counts.get(kind, 0) + n
            rec[column] = value
        rec["phi"] = json.dumps(counts, sort_keys=True)
        rec["reject_reason"] = _reject_reason(rec, task, min_findings_words)
    return pd.DataFrame.from_records(records, columns=[*batch.columns, "phi", "reject_reason"])


def _reject_reason(row, task: str, min_findings_words: int) -> str | None:
    if task == "pretrain":
        return None if (row["text"] or row["findings"]) else "empty_text"
    if not row["findings"]:
        return "missing_findings"
    if not row["impression"]:
        return "missing_impression"
    if len(row["findings"].split()) < min_findings_words:
        return "short_findings"
    return None


def split_batch(batch: pd.DataFrame, eval_fraction: float, test_fraction: float) -> pd.DataFrame:
    """train / eval / test by a stable hash of the id; rejected rows keep split 'rejected'."""
    splits = []
    for rid, reason in zip(batch["id"], batch["reject_reason"]):
        if isinstance(reason, str):
            splits.append("rejected")
            continue
        u = prompts.stable_fraction(rid, "split")
        splits.append("test" if u < test_fraction else "eval" if u < test_fraction + eval_fraction else "train")
    batch["split"] = splits
    return batch[RECORD_COLUMNS]


# ------------------------------------------------------------------ tokens


@lru_cache(maxsize=2)
def _tokenizer(path: str, chat_format: str):
    from pipelines.models import load_tokenizer

    return load_tokenizer(path, chat_format)


def encode_batch(batch: pd.DataFrame, tokenizer_path: str, chat_format: str, task: str,
                 lead_in_probability: float, max_length: int, overlong: str) -> pd.DataFrame:
    """Template and tokenize records; `overlong` examples are truncated or marked rejected."""
    tok = _tokenizer(tokenizer_path, chat_format)
    ids_out, labels_out, reasons = [], [], []
    records = batch.to_dict("records")
    if task == "pretrain":
        texts = [prompts.pretrain_text(r) for r in records]
        encoded = tok(texts, add_special_tokens=False)["input_ids"]
        for ids in encoded:
            # A document longer than a row is cut into row-sized pieces, each its own example.
            ids = [tok.bos_token_id, *ids, tok.eos_token_id]
            pieces = [ids[i:i + max_length] for i in range(0, len(ids), max_length)]
            ids_out.append(pieces)
            labels_out.append(pieces)
            reasons.append(None)
    else:
        for record in records:
            messages, response = prompts.impression_example(record, lead_in_probability)
            example = prompts.supervised_example(tok, messages, response, chat_format)
            ids, labels = example["input_ids"], example["labels"]
            reason = None
            if len(ids) > max_length:
                if overlong == "reject":
                    reason, ids, labels = "overlong", [], []
                else:
                    ids, labels = ids[:max_length], labels[:max_length]
            ids_out.append([ids] if ids else [])
            labels_out.append([labels] if labels else [])
            reasons.append(reason)
    return pd.DataFrame({"id": batch["id"].tolist(), "input_ids": ids_out, "labels": labels_out,
                         "reject_reason": reasons})


def pack_batch(batch: pd.DataFrame, length: int, pad_id: int) -> pd.DataFrame:
    """Pack the examples of one window into rows of `length` tokens (see pipelines.packing)."""
    ids, labels = [], []
    for pieces, label_pieces in zip(batch["input_ids"], batch["labels"]):
        for piece, lab in zip(pieces, label_pieces):
            ids.append(list(piece))
            labels.append([int(x) if x is not None else IGNORE for x in lab])
    if not ids:
        return pd.DataFrame({"input_ids": [], "labels": [], "position_ids": [], "seq_lens": [], "num_tokens": []})
    return pd.DataFrame(pack_examples(ids, labels, length, pad_id))
