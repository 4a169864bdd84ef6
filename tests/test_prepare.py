"""The preparation end to end on Ray: bad input, reconciliation, rejects, cache, mixtures, pre-training."""

from __future__ import annotations

import csv
import json
import logging
import time

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipelines import prepare as prep
from pipelines.cli import UserError
from pipelines.config import load_recipe
from pipelines.synthetic import iter_reports

SECRET = "Quagmire"  # a planted surname: never in a reject, a log line, the manifest or a kept record


def _reports(n: int, seed: int) -> list[dict]:
    rows = []
    for i, r in enumerate(iter_reports(n, seed=seed)):
        header = f"Patient: {SECRET}, ZEBULON\n" if i % 10 == 0 else ""
        rows.append({"report_id": r["id"], "report": header + r["text"], "scanner": "S1"})
    return rows


def write_messy_inputs(folder) -> dict[str, int]:
    """Report files in every format with every kind of bad row; returns the rows each file holds."""
    folder.mkdir()
    csv_rows = _reports(40, seed=1)
    csv_rows.append(dict(csv_rows[3], report_id="copy-of-3"))  # exact duplicate content
    csv_rows.append({"report_id": "huge", "report": "FINDINGS: " + "x " * 2_600_000, "scanner": "S1"})  # 5 MB
    csv_rows.append({"report_id": "empty", "report": "", "scanner": "S1"})
    with open(folder / "reports.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["report_id", "report", "scanner"])
        writer.writeheader()
        writer.writerows(csv_rows)
    with open(folder / "reports.csv", "ab") as fh:
        fh.write(f"bad-bytes,Patient {SECRET} caf\xe9,S1\n".encode("latin-1"))
        fh.write(b"too,many,fields,here\n")
    lines = [json.dumps(r) for r in _reports(30, seed=2)]
    lines += [f'{{"report_id": "cut", "report": "Patient: {SECRET}', "[1, 2]", '{"report_id": "nul", "report": null}']
    (folder / "more.jsonl").write_bytes("\n".join(lines).encode() + b"\n" + b'{"report": "\xff\xfe"}\n')
    (folder / "array.json").write_text(json.dumps(_reports(12, seed=3)))
    pq.write_table(pa.Table.from_pylist(_reports(15, seed=4)), folder / "tail.parquet")
    (folder / "empty.csv").write_text("")
    return {"reports.csv": len(csv_rows) + 2, "more.jsonl": len(lines) + 1, "array.json": 12, "tail.parquet": 15}


@pytest.fixture(scope="module")
def messy(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("messy")
    counts = write_messy_inputs(root / "in")
    recipe = load_recipe("local", ["data.columns={id: report_id}", "data.text_column=report",
                                   "data.pack_length=256", "data.overlong=reject", "data.pack_window=40",
                                   "data.splits={eval: 0.1, test: 0.1}", "model.tiny.vocab_size=512"])
    inputs = [str(root / "in" / "*.*")]
    return recipe, inputs, root / "out", counts


@pytest.fixture(scope="module")
def messy_run(messy, caplog_module):
    recipe, inputs, out, counts = messy
    manifest = prep.prepare(recipe, inputs, out)
    return manifest, out, counts


@pytest.fixture(scope="module")
def caplog_module():
    """Every log line of the module's runs, to check that no PHI reaches one."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    root = logging.getLogger()
    handler, level = Keep(level=logging.DEBUG), root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield lines
    root.removeHandler(handler)
    root.setLevel(level)


def _records(out):
    return pads.dataset(str(out / "records"), format="parquet", partitioning="hive").to_table().to_pylist()


def test_every_row_is_kept_or_rejected_with_a_reason(messy_run):
    manifest, out, counts = messy_run
    read = sum(counts.values())
    assert manifest["rows_read"] == read == manifest["rows_kept"] + manifest["rows_rejected"]
    assert sum(manifest["rejects_by_reason"].values()) == manifest["rows_rejected"]
    assert {p.rsplit("/", 1)[-1]: n for p, n in manifest["inputs"].items()} == counts
    reasons = manifest["rejects_by_reason"]
    for reason in ("malformed_csv", "bad_encoding", "malformed_json", "not_an_object", "oversized_field",
                   "missing_findings", "duplicate", "overlong"):
        assert reasons.get(reason, 0) >= 1, reason
    assert sum(manifest["splits"].values()) == manifest["rows_kept"]
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == manifest["rows_rejected"]
    assert all(r["file"] and r["row"] >= 1 and r["reason"] for r in rejects)
    by_row = {(r["file"].rsplit("/", 1)[-1], r["row"]): r["reason"] for r in rejects}
    raw = (out.parent / "in" / "reports.csv").read_bytes()
    bad_line = raw[:raw.index(b"bad-bytes,")].count(b"\n") + 1  # reports span several lines each
    assert by_row[("reports.csv", bad_line)] == "bad_encoding"
    assert by_row[("reports.csv", bad_line + 1)] == "malformed_csv"
    assert by_row[("more.jsonl", 31)] == "malformed_json" and by_row[("more.jsonl", 32)] == "not_an_object"
    assert by_row[("more.jsonl", 33)] == "missing_findings" and by_row[("more.jsonl", 34)] == "bad_encoding"


def test_no_phi_in_rejects_logs_manifest_or_kept_records(messy_run, caplog_module):
    manifest, out, _ = messy_run
    assert SECRET not in (out / "rejects.jsonl").read_text()
    assert SECRET not in json.dumps(manifest)
    assert any("ignoring column(s) scanner" in line for line in caplog_module)  # the log was captured
    assert not [line for line in caplog_module if SECRET in line]
    for rec in _records(out):
        assert SECRET not in json.dumps(rec), rec["reject_reason"]
    assert manifest["phi_replacements"]["NAME"] > 0


def test_packed_shards_hold_each_kept_example_once(messy_run):
    manifest, out, _ = messy_run
    packed = manifest["packed"]
    assert packed["sft/train"]["examples"] == manifest["splits"]["train"]
    assert packed["sft/eval"]["examples"] == manifest["splits"]["eval"]
    assert packed["pretrain/train"]["examples"] >= manifest["splits"]["train"]
    assert packed["pretrain/train"]["chunked_documents"] >= 1  # reports longer than a 256-token row
    rows = pq.read_table(out / "sft" / "train").to_pylist()
    assert all(len(r["input_ids"]) == len(r["labels"]) == len(r["position_ids"]) == 256 for r in rows)
    assert all(r["num_tokens"] == sum(r["seq_lens"]) <= 256 for r in rows)
    test_ids = {r["id"] for r in _records(out) if r["split"] == "test"}
    assert len(test_ids) == manifest["splits"]["test"] > 0


def test_a_rerun_reuses_the_output_and_any_change_makes_a_new_key(messy, messy_run, tmp_path):
    recipe, inputs, out, _ = messy
    manifest, _, _ = messy_run
    stamp = (out / "manifest.json").stat().st_mtime_ns
    start = time.time()
    assert prep.prepare(recipe, inputs, out) == manifest
    assert time.time() - start < 5 and (out / "manifest.json").stat().st_mtime_ns == stamp

    sources = prep.plan_sources(recipe, inputs)
    key = prep.cache_key(recipe, sources)
    assert prep.cache_key(recipe, sources[::-1]) == key  # the order files are named in does not matter
    changed = load_recipe("local", ["data.columns={id: report_id}", "data.text_column=report",
                                    "data.pack_length=256", "data.overlong=reject", "data.pack_window=40",
                                    "data.splits={eval: 0.1, test: 0.1}", "model.tiny.vocab_size=512",
                                    "data.lead_in_probability=0.9"])
    assert prep.cache_key(changed, sources) != key
    extra = tmp_path / "extra.jsonl"
    extra.write_text(json.dumps(_reports(1, seed=9)[0]) + "\n")
    assert prep.cache_key(recipe, prep.plan_sources(recipe, [*inputs, str(extra)])) != key


def test_split_is_the_same_whatever_the_file_order_or_block_size(messy, monkeypatch):
    recipe, inputs, _, _ = messy
    sources = prep.plan_sources(recipe, inputs)

    def splits(order):
        rows = prep.cleaned_dataset(recipe, order).select_columns(["file", "row", "id", "split"]).take_all()
        return {(r["file"], r["row"]): (r["id"], r["split"]) for r in rows}

    first = splits(sources)
    monkeypatch.setattr(prep, "BLOCK_ROWS", 7)
    assert splits(sources[::-1]) == first


@pytest.mark.parametrize("change, message", [
    ({"inputs": ["{in}/nope.csv"]}, "nope.csv: no such file"),
    ({"overrides": ["data.columns={id: rid}"]}, "does not have"),
    ({"overrides": ["data.text_column=null"]}, "needs findings+impression or text"),
    ({"overrides": ["data.task=instruct"]}, "needs instruction+output"),
    ({"overrides": ["model.path=/no/such/model"]}, "no such directory"),
])
def test_user_mistakes_stop_in_one_line_before_any_work(messy, tmp_path, change, message):
    recipe, inputs, _, _ = messy
    folder = inputs[0].rsplit("/", 1)[0]
    overrides = ["data.columns={id: report_id}", "data.text_column=report", *change.get("overrides", [])]
    patterns = [p.format(**{"in": folder}) for p in change.get("inputs", [])] or [f"{folder}/*.csv"]
    with pytest.raises(UserError) as err:
        prep.prepare(load_recipe("local", overrides), patterns, tmp_path / "out")
    assert message in str(err.value) and "\n" not in str(err.value) and SECRET not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_an_unreadable_file_is_a_user_error_without_its_content(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(f"Patient {SECRET} is not parquet".encode())
    with pytest.raises(UserError, match="cannot be read as parquet") as err:
        prep.prepare(load_recipe("local"), [str(bad)], tmp_path / "out")
    assert SECRET not in str(err.value)


# ------------------------------------------------------------------ mixtures and pre-training


def write_mixture_inputs(folder) -> None:
    folder.mkdir()
    # 70 distinct items, the first 20 twice; items 5 to 8 have no answer.
    instruct = [{"instruction": f"Explain term number {k}.", "input": "" if k % 3 else f"Context {k}",
                 "output": "" if 5 <= k <= 8 else f"Term {k} means something specific."}
                for k in (i % 70 for i in range(90))]
    (folder / "instruct.jsonl").write_text("".join(json.dumps(r) + "\n" for r in instruct))
    with open(folder / "reports.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["rid", "body"])
        writer.writeheader()
        writer.writerows({"rid": r["report_id"], "body": r["report"]} for r in _reports(50, seed=5))
    docs = [{"doc": " ".join(f"Sentence {j} of medical document {i}." for j in range(30 * (1 + i % 4)))}
            for i in range(25)]
    pq.write_table(pa.Table.from_pylist(docs), folder / "corpus.parquet")


def test_a_mixture_samples_each_source_to_its_target(tmp_path, ray_session):
    write_mixture_inputs(tmp_path / "in")
    folder = tmp_path / "in"
    mixture = (f"data.mixture=[{{name: qa, inputs: [{folder}/instruct.jsonl], count: 30}}, "
               f"{{name: reports, inputs: [{folder}/reports.csv], task: impression, ratio: 0.4, "
               f"columns: {{id: rid}}, text_column: body}}, "
               f"{{name: corpus, inputs: [{folder}/corpus.parquet], task: pretrain, count: 12, text_column: doc}}]")
    recipe = load_recipe("local", ["data.task=instruct", mixture, "data.pack_length=512",
                                   "data.splits={eval: 0.1, test: 0.0}", "model.tiny.vocab_size=512"])
    manifest = prep.prepare(recipe, None, tmp_path / "out")
    assert manifest["rows_read"] == 90 + 50 + 25 == manifest["rows_kept"] + manifest["rows_rejected"]
    mix = manifest["mixture"]
    # The reports' share: 0.4 of the whole, around the 30 + 12 counted rows.
    assert (mix["qa"]["target"], mix["corpus"]["target"], mix["reports"]["target"]) == (30, 12, 28)
    assert all(m["achieved"] == min(m["target"], m["available"]) for m in mix.values())
    assert mix["qa"]["available"] == 70 - 4  # duplicates and rows without an output go first
    assert manifest["rejects_by_reason"]["missing_output"] == 8
    assert manifest["rejects_by_reason"]["not_sampled"] == sum(m["available"] - m["achieved"] for m in mix.values())
    packed = manifest["packed"]
    kept = [r for r in _records(tmp_path / "out") if not r["reject_reason"]]
    supervised_train = sum(r["split"] == "train" and r["task"] != "pretrain" for r in kept)
    assert packed["sft/train"]["examples"] == supervised_train
    corpus_train = sum(r["split"] == "train" and r["task"] == "pretrain" for r in kept)
    assert packed["pretrain/train"]["examples"] >= corpus_train > 0  # only the corpus is pre-trained on
    rows = pq.read_table(tmp_path / "out" / "pretrain" / "train").to_pylist()
    for row in rows:  # language modelling: every token but each example's first is a target
        starts = {sum(row["seq_lens"][:k]) for k in range(len(row["seq_lens"]))}
        for pos in range(row["num_tokens"]):
            assert row["labels"][pos] == (-100 if pos in starts else row["input_ids"][pos])
