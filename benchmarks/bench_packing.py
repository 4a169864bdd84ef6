"""Packing benchmark: efficiency on the IU X-ray dev reports at 2,048 and 4,096 tokens.

The reports go through the preparation's own stages (filters, impression templating, chat
format), tokenized by a byte-level BPE tokenizer trained on them (the embedded default's kind: no
hub tokenizer is reachable here). Efficiency is real tokens / slots. Compared: naive padding (one
example per row), best-fit decreasing within each window (the previous packer), and the
streaming packer (`pipelines.packing.StreamingPacker`: exact subset-sum fill, leftovers carried
across windows). Speed is examples/s of each packer in one process.

    .venv/bin/python benchmarks/bench_packing.py [--window 1000] [--vocab 2048]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from datetime import date
from pathlib import Path

from pipelines import data_stages
from pipelines.models import train_tokenizer
from pipelines.packing import StreamingPacker, best_fit_decreasing, iter_windows
from provenance import git_commit

IU_XRAY = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "radiology" / "iu_xray_dev.jsonl"


def iu_examples(vocab: int) -> tuple[list[list[int]], list[list[int]]]:
    import pyarrow as pa

    rows = [json.loads(line) for line in IU_XRAY.open(encoding="utf-8")]
    raw = pa.Table.from_pylist([
        {name: None for name in data_stages.RAW_SCHEMA.names} | {
            "id": r["id"], "source": "iu", "task": "impression", "file": IU_XRAY.name, "row": i + 1,
            "findings": r["findings"], "impression": r["impression"], "exam_code": r["exam_type"],
            "modality": r["modality"]} for i, r in enumerate(rows)], schema=data_stages.RAW_SCHEMA)
    records = data_stages.clean_batch(raw, deidentify=False, min_findings_words=10, eval_fraction=0.0,
                                      test_fraction=0.0).to_pylist()
    kept = [r for r in records if not r["reject_reason"]]
    tokenizer = train_tokenizer((data_stages.document_text(r) for r in kept), vocab, "llama3")
    print(f"IU X-ray dev: {len(rows)} reports, {len(kept)} kept by the study's filters; tokenizer: byte-level "
          f"BPE, {len(tokenizer)} tokens, trained on them")
    return data_stages.encode_sft(tokenizer, kept, "llama3", lead_in_probability=0.3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=1000, help="examples per window (data.pack_window)")
    parser.add_argument("--vocab", type=int, default=2048)
    args = parser.parse_args()
    commit = git_commit()
    print(f"# bench_packing  {date.today()}  commit {commit}  Python {platform.python_version()}")
    if not IU_XRAY.is_file():
        print(f"skipped: {IU_XRAY} not found (the public data set lives beside the checkout)")
        sys.exit(0)
    ids, labels = iu_examples(args.vocab)
    lengths = sorted(map(len, ids))
    tokens = sum(lengths)
    print(f"{len(ids)} examples, {tokens} tokens; length min {lengths[0]}, median {lengths[len(lengths) // 2]}, "
          f"max {lengths[-1]}; window {args.window} examples\n")
    examples = list(zip(ids, labels))
    print(f"{'length':>7} {'lower bound':>12} {'naive padding':>14} {'BFD per window':>15} {'streaming packer':>17}"
          f" {'packer ex/s':>12}")
    for length in (2048, 4096):
        bfd_rows = sum(len(best_fit_decreasing([len(i) for i, _ in w], length))
                       for w in iter_windows(examples, args.window))
        start = time.process_time()
        packer = StreamingPacker(length)
        rows = [row for w in iter_windows(examples, args.window) for row in packer.add(w)] + packer.flush()
        speed = len(examples) / (time.process_time() - start)
        assert sum(len(i) for row in rows for i, _ in row) == tokens
        bound = math.ceil(tokens / length)
        print(f"{length:>7} {tokens / (bound * length):>8.4f} ({bound}) {tokens / (len(ids) * length):>10.4f}"
              f" ({len(ids)}) {tokens / (bfd_rows * length):>9.4f} ({bfd_rows}) {tokens / (len(rows) * length):>11.4f}"
              f" ({len(rows)}) {speed:>12.0f}")
    print("\n(efficiency = real tokens / slots; packed rows in parentheses)")


if __name__ == "__main__":
    main()
