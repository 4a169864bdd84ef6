import csv
import json
import re
import tracemalloc

import pyarrow.parquet as pq
import pytest

from pipelines import synthetic
from pipelines.synthetic import EXAMS, REGIONS, iter_reports, make_report, write_reports

REGION_OF = {code: region for code, _, region, _, _ in EXAMS}


def _abnormal_patterns(region: str) -> list[re.Pattern]:
    """Regexes that recognise each abnormal-finding template of a region, whatever its slot values."""
    patterns = []
    for _, _, abnormals in REGIONS[region][0]:
        for finding, _ in abnormals:
            literal = re.escape(finding[0].upper() + finding[1:])
            patterns.append(re.compile(re.sub(r"\\\{\w+\\\}", ".+?", literal)))
    return patterns


def test_same_seed_same_reports_and_other_seed_differs():
    assert list(iter_reports(40, seed=3)) == list(iter_reports(40, seed=3))
    assert [r["text"] for r in iter_reports(40, seed=3)] != [r["text"] for r in iter_reports(40, seed=4)]


def test_start_offset_continues_the_same_sequence():
    whole = list(iter_reports(60, seed=7))
    assert list(iter_reports(25, seed=7, start=35)) == whole[35:]
    assert [r["id"] for r in whole] == [f"syn7-{i:09d}" for i in range(60)]


def test_records_have_the_raw_fields_and_known_exam_codes():
    for rec in iter_reports(200, seed=1):
        assert set(rec) == {"id", "exam_code", "modality", "text"}
        assert rec["exam_code"] in REGION_OF
        assert len(rec["text"].split()) > 40


def test_all_modalities_and_many_regions_appear():
    records = list(iter_reports(600, seed=2))
    assert {r["modality"] for r in records} == {"CT", "MR", "XR", "RF"}
    assert len({REGION_OF[r["exam_code"]] for r in records}) >= 15


@pytest.mark.parametrize("rate", [0.0, 0.2])
def test_defect_rate_is_honoured(rate):
    reports = [make_report(i, seed=5, defect_rate=rate) for i in range(3000)]
    share = sum(r.defect is not None for r in reports) / len(reports)
    assert abs(share - rate) < 0.025
    if rate:
        assert {r.defect for r in reports} == {None, *synthetic.DEFECTS}


def test_defects_are_what_they_claim_and_good_reports_pass_the_filters():
    for i in range(2000):
        r = make_report(i, seed=6, defect_rate=0.3)
        if r.defect == "no_findings":
            assert r.findings is None and r.impression
        elif r.defect == "no_impression":
            assert r.impression is None and r.findings
        elif r.defect == "short_findings":
            assert len(r.findings.split()) < 10
        else:
            assert len(r.findings.split()) >= 10 and r.impression


def test_impression_follows_from_the_findings():
    abnormal_seen = normal_seen = 0
    for i in range(1500):
        r = make_report(i, seed=8, defect_rate=0.0)
        region = REGION_OF[r.exam_code]
        abnormal = any(p.search(r.findings) for p in _abnormal_patterns(region))
        normal_impression = r.impression in REGIONS[region][1]
        assert abnormal != normal_impression, r.text
        abnormal_seen += abnormal
        normal_seen += not abnormal
    assert abnormal_seen > 300 and normal_seen > 300


def test_a_lung_nodule_is_named_with_size_lobe_and_follow_up_in_the_impression():
    nodule = re.compile(r"There is a (\d\.\d) cm solid nodule in the ([a-z ]+?)\.")
    checked = 0
    for i in range(3000):
        r = make_report(i, seed=9, defect_rate=0.0)
        m = nodule.search(r.findings)
        if m:
            size, lobe = m.groups()
            assert f"{size} cm {lobe} pulmonary nodule; recommend follow-up CT in" in r.impression
            months = "12 months" if float(size) < 0.6 else "6 months" if float(size) < 1.0 else "3 months"
            assert months in r.impression
            checked += 1
    assert checked > 20


def test_eponyms_and_phi_are_present_for_the_deidentifier_to_face():
    texts = " ".join(r["text"] for r in iter_reports(800, seed=10))
    for eponym in ("Hodgkin lymphoma", "Baker cyst", "Colles fracture", "Crohn disease", "Wilms tumor"):
        assert eponym in texts
    for phi in (r"MRN: \d{8}", r"Dr\. [A-Z][a-z]+ [A-Z]", r"\(\d{3}\) 555-\d{4}", r"discussed with Dr\."):
        assert re.search(phi, texts)


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "parquet"])
def test_write_reports_round_trips_every_format(tmp_path, suffix):
    path = tmp_path / f"reports.{suffix}"
    assert write_reports(path, 2500, seed=11, chunk=1000) == 2500
    expected = list(iter_reports(2500, seed=11))
    if suffix == "jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    elif suffix == "csv":
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = pq.read_table(path).to_pylist()
    assert len(rows) == 2500
    assert rows[0] == expected[0] and rows[-1] == expected[-1]
    assert [r["id"] for r in rows] == [r["id"] for r in expected]


def test_write_reports_rejects_an_unknown_format(tmp_path):
    with pytest.raises(ValueError):
        write_reports(tmp_path / "reports.txt", 10)
    write_reports(tmp_path / "reports.txt", 10, fmt="jsonl")
    assert len((tmp_path / "reports.txt").read_text().splitlines()) == 10


def test_writing_streams_with_flat_memory(tmp_path):
    tracemalloc.start()
    try:
        write_reports(tmp_path / "big.csv", 12_000, chunk=500)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    size = (tmp_path / "big.csv").stat().st_size
    assert size > 6_000_000
    assert peak < size / 5  # a chunk of 500 reports, never the whole file
