"""Readers and the read stage: every row of a file comes out once, bad rows as rejects without text."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines import data_stages, readers

SECRET = "Zebulon Quagmire"  # planted PHI: must never show up in a reason, an id or a log


def _read_stage(path, columns=None, text_column=None, task="impression", max_chars=10_000):
    sources = {"s": {"task": task, "columns": columns or {}, "text_column": text_column}}
    blocks = list(data_stages.read_files_batch(pa.table({"id": [0]}), [(str(path), "s")], sources, "utf-8", max_chars,
                                               rows_per_block=3))
    return pa.concat_tables(blocks).to_pylist() if blocks else []


def test_csv_rows_bad_quoting_wrong_width_bad_bytes_and_line_numbers(tmp_path):
    path = tmp_path / "r.csv"
    path.write_bytes(b"\xef\xbb\xbfreport_id,findings,impression,extra\n"
                     b'1,"Lungs clear,\nno effusion.",Normal.,x\n'   # a quoted field over two lines
                     b"2,too,few\n"
                     b"\n"                                             # a blank line is not a row
                     b"3,caf\xe9 latin-1,Normal.,x\n"                 # not UTF-8
                     b'4,"bad "quote,Normal.,x\n'
                     b"5,Fine findings here.,Normal.,x\n")
    assert readers.column_names(path) == {"report_id", "findings", "impression", "extra"}
    rows = _read_stage(path, columns={"id": "report_id"})
    got = [(r["row"], r["id"], r["reject_reason"]) for r in rows]
    assert got == [(2, "1", None), (4, None, "malformed_csv"), (6, "3", "bad_encoding"), (7, None, "malformed_csv"),
                   (8, "5", None)]
    assert rows[0]["findings"] == "Lungs clear,\nno effusion."
    assert all(r["findings"] is None for r in rows if r["reject_reason"])


def test_jsonl_and_json_array_rows(tmp_path):
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_bytes(b'{"id": "a", "findings": "x"}\n'
                      b'{"id": "b", "findings": \n'         # truncated
                      b'["not", "an", "object"]\n'
                      b'{"id": "c", "findings": "\xff\xfe"}\n'
                      b'\n'
                      b'{"id": "d", "findings": {"nested": 1}}\n'
                      b'{"id": 7, "findings": null, "impression": 3.5}\n')
    got = [(r["row"], r["id"], r["reject_reason"]) for r in _read_stage(jsonl)]
    assert got == [(1, "a", None), (2, None, "malformed_json"), (3, None, "not_an_object"), (4, None, "bad_encoding"),
                   (6, "d", "bad_field_type"), (7, "7", None)]  # a parsed id is kept
    array = tmp_path / "r.json"
    array.write_text(json.dumps([{"id": f"x{i}", "findings": "y" * (i * 400_000)} for i in range(4)], indent=1))
    assert [(r["row"], r["id"]) for r in _read_stage(array, max_chars=10**7)] == [(1, "x0"), (2, "x1"), (3, "x2"),
                                                                                  (4, "x3")]
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": "a"}, {"id": "b", oops}, {"id": "c"}]')
    assert [(r["row"], r["reject_reason"]) for r in _read_stage(broken)] == [(1, None), (2, "malformed_json")]


def test_parquet_reads_only_the_mapped_columns_and_stringifies_scalars(tmp_path):
    path = tmp_path / "r.parquet"
    pq.write_table(pa.table({"rid": [1, 2], "findings": ["a", None], "blob": [[1, 2], [3]]}), path)
    rows = _read_stage(path, columns={"id": "rid"})
    assert [(r["row"], r["id"], r["findings"], r["reject_reason"]) for r in rows] == [(1, "1", "a", None),
                                                                                     (2, "2", None, None)]


def test_empty_files_have_no_rows(tmp_path):
    for name in ("e.csv", "e.jsonl", "e.json", "h.csv"):
        (tmp_path / name).write_text("id,findings\n" if name == "h.csv" else "")
        assert _read_stage(tmp_path / name) == []
        assert readers.column_names(tmp_path / name) <= {"id", "findings"}


def test_oversized_fields_and_values_are_rejected_without_their_text():
    assert data_stages.field_value("x" * 11, 10) == (None, "oversized_field")
    assert data_stages.field_value("bad \udce9 byte", 100) == (None, "bad_encoding")
    assert data_stages.field_value(float("nan"), 100) == (None, None)
    assert data_stages.field_value("   ", 100) == (None, None)
    assert data_stages.field_value(12, 100) == ("12", None)
    assert data_stages.field_value(b"bytes", 100) == (None, "bad_field_type")


# ------------------------------------------------------------------ fuzz

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
_value = st.one_of(st.none(), _text, st.integers(), st.floats(allow_nan=True), st.booleans(),
                   st.lists(st.integers(), max_size=2), st.just(SECRET), st.just("x" * 300))
_line = st.one_of(
    st.fixed_dictionaries({}, optional={"id": _text, **{k: _value for k in ("findings", "impression", "text", "junk")}}).map(
        lambda d: json.dumps(d).encode()),
    st.binary(max_size=40).filter(lambda b: b"\n" not in b and b"\r" not in b and b.strip()),
    st.just(f'{{"findings": "{SECRET}\xe9"}}'.encode("latin-1")),  # PHI in a row that does not decode
    st.just(b'{"findings": "' + SECRET.encode() + b'"'),           # PHI in a truncated row
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_line, max_size=25))
def test_fuzzed_jsonl_every_line_is_one_row_and_no_reason_leaks_text(tmp_path, lines):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    rows = _read_stage(path, max_chars=200)
    assert [r["row"] for r in rows] == list(range(1, len(lines) + 1))
    for r in rows:
        assert (r["reject_reason"] is None) or all(r[f] is None for f in data_stages.TEXT_FIELDS)
        assert SECRET not in json.dumps([r["id"], r["reject_reason"], r["file"]])
    cleaned = data_stages.clean_batch(pa.Table.from_pylist(rows, schema=data_stages.RAW_SCHEMA), True, 3, 0.1, 0.1)
    assert cleaned.num_rows == len(lines)
    for r in cleaned.to_pylist():
        assert (r["reject_reason"] is None) == (r["split"] != "rejected")
        assert SECRET not in json.dumps([r["id"], r["reject_reason"]])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.lists(st.one_of(_text, st.just(SECRET)), min_size=2, max_size=4), max_size=20),
       garbage=st.lists(st.binary(max_size=30), max_size=5))
def test_fuzzed_csv_never_raises_and_keeps_rows_accounted(tmp_path, rows, garbage):
    path = tmp_path / "fuzz.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "findings", "impression"])
        writer.writerows(rows)
    with open(path, "ab") as fh:
        for g in garbage:
            fh.write(g + b"\n")
    out = _read_stage(path)
    # Each written row is one row, rejected when its width is not the header's; garbage follows.
    assert [r["row"] for r in out] == sorted({r["row"] for r in out})
    expected = [None if len(r) == 3 else "malformed_csv" for r in rows]
    assert [r["reject_reason"] for r in out[:len(rows)]] == expected
    for r in out:
        if r["reject_reason"]:
            assert r["id"] is None and all(r[f] is None for f in data_stages.TEXT_FIELDS)
