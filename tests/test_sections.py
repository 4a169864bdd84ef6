import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.sections import Sections, extract_sections, normalize_whitespace
from pipelines.synthetic import make_report

FINDINGS = "The lungs are clear. No pleural effusion or pneumothorax is seen."


@pytest.mark.parametrize("text, impression", [
    (f"FINDINGS: {FINDINGS}\nIMPRESSION: No acute process.", "No acute process."),
    (f"Findings\n{FINDINGS}\n\nImpression\nNo acute process.", "No acute process."),
    (f"findings: {FINDINGS}\nconclusion: No acute process.", "No acute process."),
    (f"FINDINGS {FINDINGS}\nIMPRESSION No acute process.", "No acute process."),
    (f"FINDINGS:\n{FINDINGS}\nSUMMARY:\nNo acute process.", "No acute process."),
    (f"Findings - {FINDINGS}\nOpinion - No acute process.", "No acute process."),
    (f"EXAM: CT chest. FINDINGS: {FINDINGS} CONCLUSIONS: No acute process.", "No acute process."),
    (f"FINDINGS: {FINDINGS}\nIMPRESSION:\n1. Clear lungs.\n2. No effusion.", "1. Clear lungs.\n2. No effusion."),
])
def test_header_variants(text, impression):
    sections = extract_sections(text)
    assert sections.findings == FINDINGS
    assert sections.impression == impression


@pytest.mark.parametrize("signature", [
    "Electronically signed by: Jane Smith, MD on 03/04/2015",
    "Dictated by: Jane Smith, M.D.",
    "Jane A. Smith, MD",
    "I have personally reviewed the images and agree.",
])
def test_signature_lines_are_not_part_of_the_impression(signature):
    sections = extract_sections(f"FINDINGS: {FINDINGS}\nIMPRESSION: No acute process.\n{signature}")
    assert sections.impression == "No acute process."
    inline = extract_sections(f"FINDINGS: {FINDINGS} IMPRESSION: No acute process. {signature}")
    assert inline.impression == "No acute process."


def test_a_signature_after_findings_is_dropped_when_there_is_no_impression():
    sections = extract_sections(f"FINDINGS:\n{FINDINGS}\n\nDictated by: Jane Smith, M.D.")
    assert sections.findings == FINDINGS and sections.impression is None


def test_combined_section_with_numbered_summary_is_split():
    text = f"FINDINGS AND IMPRESSION:\n{FINDINGS}\n\n1. Clear lungs.\n2. No effusion.\n\nDictated by: X Y, MD"
    sections = extract_sections(text)
    assert sections.findings == FINDINGS
    assert sections.impression == "1. Clear lungs.\n2. No effusion."


def test_capitalised_combined_heading_without_colon():
    sections = extract_sections(f"FINDINGS AND IMPRESSION {FINDINGS}\n\n1. Clear lungs.")
    assert (sections.findings, sections.impression) == (FINDINGS, "1. Clear lungs.")


def test_combined_section_with_summary_paragraph_is_split():
    sections = extract_sections(f"Findings/Impression: {FINDINGS}\n\nIn summary, no acute process.")
    assert sections.findings == FINDINGS
    assert sections.impression == "In summary, no acute process."


def test_combined_section_without_summary_has_no_impression():
    sections = extract_sections(f"FINDINGS & IMPRESSION: {FINDINGS}")
    assert sections == Sections(FINDINGS, None, None, None)


def test_separate_sections_win_over_a_combined_one():
    text = f"FINDINGS AND IMPRESSION: see below.\nFINDINGS: {FINDINGS}\nIMPRESSION: Normal."
    sections = extract_sections(text)
    assert (sections.findings, sections.impression) == (FINDINGS, "Normal.")


def test_missing_sections_are_none():
    assert extract_sections("IMPRESSION: Normal.").findings is None
    assert extract_sections(f"FINDINGS: {FINDINGS}").impression is None
    assert extract_sections("") == Sections(None, None, None, None)
    assert extract_sections(None) == Sections(None, None, None, None)


def test_words_that_only_look_like_headers_do_not_start_sections():
    text = (f"Exam Date: 03/04/2015\nFINDINGS: {FINDINGS}\nFindings were discussed with Dr. Lee.\n"
            "Contrast reached the colon.\nIMPRESSION: Normal.")
    sections = extract_sections(text)
    assert sections.findings == f"{FINDINGS}\nFindings were discussed with Dr. Lee.\nContrast reached the colon."
    assert sections.exam is None


@pytest.mark.parametrize("header, exam, modality", [
    ("EXAM: CTCHWO - CT CHEST WITHOUT CONTRAST", "CTCHWO", "CT"),
    ("EXAMINATION: MRI BRAIN WITH AND WITHOUT CONTRAST", "MRI BRAIN WITH AND WITHOUT CONTRAST", "MR"),
    ("Exam: XR CHEST 2 VIEWS", "XR CHEST 2 VIEWS", "XR"),
    ("PROCEDURE: Chest radiograph, portable", "Chest radiograph, portable", "XR"),
    ("Study: Fluoroscopic upper GI series", "Fluoroscopic upper GI series", "RF"),
    ("Exam type: US abdomen complete", "US abdomen complete", "US"),
    ("EXAM: RFBE", "RFBE", "RF"),
    ("EXAM: CRCHPORT - portable chest", "CRCHPORT", "XR"),
    ("CT ABDOMEN AND PELVIS WITH CONTRAST", None, "CT"),
])
def test_exam_and_modality(header, exam, modality):
    sections = extract_sections(f"{header}\nFINDINGS: {FINDINGS}\nIMPRESSION: Normal.")
    assert sections.exam == exam
    assert sections.modality == modality


def test_normalize_whitespace():
    assert normalize_whitespace("  a\n\n b\t\tc  ") == "a b c"
    assert normalize_whitespace("") == ""


def test_round_trip_over_synthetic_reports():
    for i in range(1500):
        report = make_report(i, seed=21, defect_rate=0.1)
        sections = extract_sections(report.text)
        if report.defect == "no_findings":
            assert sections.findings is None
        elif report.defect == "no_impression":
            assert sections.impression is None
        else:
            assert normalize_whitespace(sections.findings) == normalize_whitespace(report.findings)
        if report.defect != "no_impression":
            assert normalize_whitespace(sections.impression) == normalize_whitespace(report.impression)
        assert sections.modality == report.modality
        if report.exam_code in report.text:
            assert sections.exam == report.exam_code


REPORT_PIECES = st.sampled_from(["FINDINGS", "IMPRESSION", "Findings and impression", "EXAM", ":", " - ", ".",
                                  " ", "  ", "\n", "\n\n", "1. ", "Signed by", "Jane Smith, MD", "lungs", "CT"])


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.lists(REPORT_PIECES, max_size=40).map("".join)))
def test_never_crashes_and_returns_pieces_of_the_text(text):
    sections = extract_sections(text)
    for part in (sections.findings, sections.impression):
        assert part is None or (part and part in text)
