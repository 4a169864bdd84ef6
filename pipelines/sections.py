"""Split a free-text radiology report into its FINDINGS, IMPRESSION and EXAM sections.

A section header is a known heading word (case-insensitive) that is either
- at the start of a line and followed by a colon ("FINDINGS: ..."), or alone on its line ("Findings"),
- at the start of a line in capitals and followed by text ("IMPRESSION No acute ..."), or
- inside a line after a sentence end or a wide gap, followed by a colon ("... history. FINDINGS: ...").
A section runs to the next header. Signature/dictation lines end a section's text.

A combined "FINDINGS AND IMPRESSION" section is split by this rule: when its text ends with a
numbered list that follows some prose ("... prose\\n1. ...\\n2. ..."), or with a paragraph that opens
with a summary cue ("In summary", "Overall", ...), that trailing part is the impression and the text
before it the findings; otherwise the whole text is the findings and the impression is None. A
separate FINDINGS or IMPRESSION section, when present, takes precedence over the combined one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Sections:
    findings: str | None
    impression: str | None
    exam: str | None  # the exam code when the exam line has one, else the exam line
    modality: str | None  # CT, MR, XR, RF, US, NM or MG


# Heading phrases per section kind, matched in any case; a blank stands for any run of blanks.
_HEADINGS: dict[str, tuple[str, ...]] = {
    "findings_impression": ("findings and impression", "findings and impressions", "findings & impression",
                            "findings/impression", "impression and findings"),
    "findings": ("findings", "finding"),
    "impression": ("impression", "impressions", "conclusion", "conclusions", "summary", "opinion"),
    "exam": ("exam", "examination", "exam type", "type of exam", "type of examination", "procedure", "study"),
    # Sections we do not extract; they only end the section before them.
    "other": ("clinical history", "clinical indication", "clinical indications", "clinical information",
              "clinical data", "clinical summary", "history", "indication", "indications", "reason for exam",
              "reason for examination", "reason for study", "technique", "comparison", "comparisons", "prior",
              "priors", "contrast", "dose", "radiation dose", "addendum", "recommendation", "recommendations",
              "note", "notes"),
}
_KIND = {phrase: kind for kind, phrases in _HEADINGS.items() for phrase in phrases}

# A heading word or phrase, then a colon, " - ", or the end of its line. It is matched on an
# ASCII-lower-cased copy of the text (same length, so offsets carry over): a case-insensitive
# alternation is several times slower in `re`.
_HEADING = re.compile(
    r"(?<![a-z])(?P<name>"
    + "|".join(re.escape(p).replace(r"\ ", r"[ \t]+") for p in sorted(_KIND, key=len, reverse=True))
    + r")(?![a-z])(?P<tail>[ \t]*:|[ \t]+-(?=[ \t])|[ \t]*$)",
    re.MULTILINE,
)
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
# "IMPRESSION No acute ..." style: a capitalised heading opening a line of text.
_CAPS_HEADING = re.compile(r"^[ \t]*(?P<name>FINDINGS AND IMPRESSION|FINDINGS|IMPRESSION|CONCLUSION)[ \t]+(?=\S)",
                           re.MULTILINE)
# A signature line starts a line, or follows a sentence end and a blank; it is matched only at
# those places (`_SIGNATURE_AT`): a search for it would try the pattern at every position.
_SIGNATURE = re.compile(
    r"[ \t]*(?:"
    r"(?:electronically |e-)?signed\b|dictated\b|transcribed\b|(?:read|interpreted|reviewed|verified|approved|"
    r"finalized|reported) by\b|attending(?: radiologist)?:|radiologist:|resident:|report (?:approved|finalized)\b|"
    r"I have personally reviewed\b"
    # "Name, MD" alone at the end of a line (case-sensitive: "to do" is not a credential)
    r"|(?-i:(?:Dr\.?[ \t]+)?[A-Z][A-Za-z'\-]+(?:[ \t]+(?:[A-Z]\.?|[A-Z][A-Za-z'\-]+)){0,3},?[ \t]+"
    r"(?:M\.?D|D\.?O|MBBS|FRCR|Ph\.?D))\.?[ \t]*$"
    r")",
    re.IGNORECASE | re.MULTILINE,
)
_SIGNATURE_AT = re.compile(r"\n|[.!?](?=[ \t])")
_NUMBERED_START = re.compile(r"^[ \t]*1[.)][ \t]+", re.MULTILINE)
_SUMMARY_CUE = re.compile(r"(?:in summary|summary|overall|impression|conclusion)\b[:,]?", re.IGNORECASE)
_CODE = re.compile(r"\b(?P<code>(?:CT|MR|XR|CR|DX|RF|FL|US|NM|PT|MG)[A-Z0-9]{2,10})\b(?P<sep>[ \t]*[-:|])?")
_CODE_MODALITY = {"CT": "CT", "MR": "MR", "XR": "XR", "CR": "XR", "DX": "XR", "RF": "RF", "FL": "RF",
                  "US": "US", "NM": "NM", "PT": "NM", "MG": "MG"}
# Abbreviations are matched in capitals only ("US" vs "us"); words in any case.
_MODALITY = re.compile(
    r"(?P<CT>\bCTA?\b|(?i:\bcomputed tomograph|\bCAT scan))"
    r"|(?P<MR>\bMR[IA]?\b|\bMRCP\b|(?i:\bmagnetic resonance))"
    r"|(?P<XR>\b(?:XR|CR|DX)\b|(?i:\bx-?ray|\bradiograph|\bplain films?\b))"
    r"|(?P<RF>\b(?:RF|FL)\b|(?i:\bfluoro|\bbarium|\besophagram|\bswallow\b|\bupper GI\b|\bUGI\b|"
    r"\bcystourethrogram|\bVCUG\b|\benema\b|\bsmall bowel follow))"
    r"|(?P<US>\bUS\b|(?i:\bultraso|\bsonogra|\bdoppler\b|\bduplex\b))"
    r"|(?P<NM>\b(?:NM|PET)\b|(?i:\bnuclear medicine|\bscintigra|\bbone scan\b|\bSPECT\b))"
    r"|(?P<MG>\bMG\b|(?i:\bmammogra))"
)


def normalize_whitespace(text: str) -> str:
    """Collapse every run of whitespace (newlines included) into one space and strip the ends."""
    return " ".join(text.split())


def _headers(text: str) -> list[tuple[str, int, int]]:
    """(kind, header start, body start) of every accepted header, in text order."""
    found = []
    for m in _HEADING.finditer(text.translate(_ASCII_LOWER)):
        start = m.start()
        before = text[text.rfind("\n", 0, start) + 1:start]
        at_line_start = not before.strip(" \t")
        if m["tail"].strip(" \t"):  # a colon or a dash: line start, after a sentence, or after a wide gap
            accepted = at_line_start or before.endswith("  ") or before.rstrip(" \t")[-1:] in (".", "!", "?", ";")
        else:  # alone on its line
            accepted = at_line_start
        if accepted:
            found.append((_KIND[" ".join(m["name"].split())], start, m.end()))
    starts = {start for _, start, _ in found}
    for m in _CAPS_HEADING.finditer(text):
        if m.start("name") not in starts:  # "FINDINGS AND IMPRESSION:" is not "FINDINGS" + text
            found.append((_KIND[m["name"].lower()], m.start("name"), m.end()))
    return sorted(found, key=lambda header: header[1])


def _clean_body(body: str) -> str | None:
    """Cut signature/dictation lines and surrounding whitespace; None when nothing is left."""
    sig = _SIGNATURE.match(body)
    if not sig:
        for place in _SIGNATURE_AT.finditer(body):
            if sig := _SIGNATURE.match(body, place.end()):
                break
    if sig:
        body = body[: sig.start()]
    body = body.strip()
    return body or None


def _split_combined(body: str) -> tuple[str | None, str | None]:
    """(findings, impression) of a combined section, by the rule in the module docstring."""
    numbered = list(_NUMBERED_START.finditer(body))
    if numbered and body[: numbered[-1].start()].strip():
        cut = numbered[-1].start()
        return body[:cut].strip() or None, body[cut:].strip() or None
    paragraphs = re.split(r"\n[ \t]*\n", body)
    if len(paragraphs) > 1 and _SUMMARY_CUE.match(paragraphs[-1].lstrip()):
        cut = body.rfind(paragraphs[-1])
        return body[:cut].strip() or None, body[cut:].strip() or None
    return body or None, None


def _exam_and_modality(exam_line: str | None, title: str) -> tuple[str | None, str | None]:
    source = exam_line if exam_line else title
    code = _CODE.search(source)
    if code and (code["sep"] or len(code["code"]) >= 5 or source.strip() == code["code"]):
        modality = _CODE_MODALITY[code["code"][:2]]
    else:
        code = None
        m = _MODALITY.search(source)
        modality = m.lastgroup if m else None
    exam = code["code"] if code else exam_line
    return exam, modality


def extract_sections(text: str | None) -> Sections:
    """Findings, impression, exam and modality of a free-text report (None for what is absent)."""
    if not text:
        return Sections(None, None, None, None)
    headers = _headers(text)
    bodies: dict[str, str | None] = {}
    for n, (kind, _, body_start) in enumerate(headers):
        if kind in bodies or kind == "other":
            continue  # the first occurrence of a section wins (later ones are addenda); "other" only ends one
        body_end = headers[n + 1][1] if n + 1 < len(headers) else len(text)
        body = text[body_start:body_end]
        if kind == "exam":
            body = body.strip().split("\n", 1)[0].rstrip(" .;")  # the exam line only
        bodies[kind] = _clean_body(body)
    findings, impression = bodies.get("findings"), bodies.get("impression")
    if bodies.get("findings_impression") and (findings is None or impression is None):
        combined_findings, combined_impression = _split_combined(bodies["findings_impression"])
        findings = findings or combined_findings
        impression = impression or combined_impression
    title = text[: headers[0][1]] if headers else text[:200]
    exam, modality = _exam_and_modality(bodies.get("exam"), title)
    return Sections(findings, impression, exam, modality)
