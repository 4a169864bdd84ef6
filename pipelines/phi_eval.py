"""A planted-PHI evaluation set for the de-identifier, and the measure of how well it does.

Each example is a short clinical text (an addendum, a clinic letter, an outside-film note, a
critical-result call, ...) with PHI of every Safe-Harbor type planted at known offsets, next to
clinical numbers and medical eponyms that must come through untouched. Layouts, wording and name
pools differ from `pipelines.synthetic` on purpose, so a good score is not a memory of the
synthetic report generator. A planted span counts as found when every letter and digit of it is
inside a detected span (a partial name leaks); a clinical/eponym span counts as a false positive
when any detected span touches it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from string import Formatter
from typing import Callable, Protocol, Sequence

from pipelines.deid import PHI_TYPES, Span

Fragment = tuple[str, str | None]  # text, and its tag: a PHI type, "eponym", "clinical", or None
Rand = random.Random


@dataclass(frozen=True)
class PlantedExample:
    text: str
    phi: tuple[tuple[int, int, str], ...]  # (start, end, PHI type)
    keep: tuple[tuple[int, int, str], ...]  # (start, end, "eponym" | "clinical")


class SpanDetector(Protocol):
    def find_spans(self, text: str | None) -> list[Span]: ...


# ---------------------------------------------------------------- values

_FIRST = ("Aaliyah", "Bartholomew", "Chiamaka", "Dmitri", "Esperanza", "Fionnuala", "Gunnar", "Hye-Jin", "Ignatius",
          "Jolene", "Kenji", "Lucía", "Mateo", "Nadia", "Oluwaseun", "Pavel", "Quentin", "Rosalind", "Saoirse",
          "Tobias", "Ulrich", "Valentina", "Wendell", "Xiomara", "Yusuf", "Zofia", "Inês", "Björn")
_LAST = ("Abernathy", "Bergström", "Castellanos", "Delacroix", "Eriksen", "Fairweather", "Gonçalves", "Hollister",
         "Iwasaki", "Jablonski", "Kowalczyk", "Lindqvist", "McKenzie", "Nakamura", "O'Sullivan", "Petrosyan",
         "Quispe", "Rasmussen", "Smith-Jones", "Thibodeaux", "Underwood", "Vasquez", "Whitfield", "Yilmaz",
         "Zimmermann", "Al-Sayed", "Okonkwo", "van der Berg", "De la Cruz", "Muñoz")
# Surnames that are also eponyms: the report may hold both the person and the disease.
_EPONYM_SURNAMES = ("Parkinson", "Jones", "Baker", "Graves", "Smith", "Wilson", "Paget", "Murphy")
# Two-letter initials, except pairs that read as an abbreviation ("RN", "CT", ...).
_INITIALS = tuple(a + b for a in "ABCDEFGHJKLMNPRSTW" for b in "ABCDEFGHJKLMNPRSTW"
                  if a + b not in {"RN", "NP", "PA", "MD", "CT", "MR", "ED", "ER", "DR", "MS", "ST", "AP", "PT"})
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")
_STREETS = ("Elm Street", "Massachusetts Ave.", "Old Mill Road", "Harbor View Dr", "Kingsley Blvd", "Pine Ln",
            "Tremont St", "Cedar Court")
_CITIES = (("Springfield", "IL"), ("Worcester", "MA"), ("Ann Arbor", "MI"), ("Boise", "ID"), ("Tacoma", "WA"),
           ("Dayton", "OH"), ("Santa Fe", "NM"), ("Burlington", "VT"))
_EPONYM_TERMS = ("Hodgkin lymphoma", "Parkinson disease", "Crohn's disease", "Wilms tumor", "Colles fracture",
                 "Baker's cyst", "Graves disease", "Cushing syndrome", "Alzheimer's dementia", "Barrett esophagus",
                 "Bankart lesion", "Hill-Sachs deformity", "Schmorl nodes", "Monteggia fracture",
                 "Salter-Harris type II fracture", "Smith fracture", "Jones fracture", "Paget disease",
                 "Chiari I malformation", "Meckel diverticulum", "Morton neuroma", "Segond fracture",
                 "Osgood-Schlatter disease", "Murphy sign", "Wilson disease", "Zenker diverticulum",
                 "Klatskin tumor", "circle of Willis", "Foley catheter", "Swan-Ganz catheter", "Kerley B lines",
                 "Modic type 1 changes", "Baastrup disease", "Kienbock disease")
_CLINICAL = ("2/6 systolic murmur", "4/5 strength", "C5-C6", "L4-L5", "L5-S1", "T10", "3.2 cm", "segment 4",
             "1.5 T", "BI-RADS 4", "Grade 2", "T2-weighted", "120 kVp", "DLP 450 mGy-cm", "10 x 8 mm",
             "series 3 image 45", "EF 55%", "3/4 of the lumen", "72-year-old", "TI-RADS 3", "Bosniak IIF", "HU 20",
             "1/3 of the way", "95% stenosis", "90 degrees", "10:30 position", "6 months", "T1 and T2", "C2",
             "PI-RADS 5", "Lung-RADS 4A", "ASPECTS 8", "2-3 mm", "BP 120/80", "12 o'clock", "O2 saturation 97%",
             "Agatston score 412", "5.5 cm", "level IV", "4th ventricle")


def _name(r: Rand, surname: str | None = None) -> str:
    first, last = r.choice(_FIRST), surname or r.choice(_LAST)
    initial = r.choice("BCDFGHJKMNPRSTVW")
    return r.choice((
        f"{first} {last}", f"{first} {initial}. {last}", f"{last}, {first}", f"{last.upper()}, {first.upper()}",
        f"{last}, {first} {initial}.", f"{initial}. {last}",
    ))


def _date(r: Rand) -> str:
    y, m, d = r.randint(1931, 2024), r.randint(1, 12), r.randint(1, 28)
    month = _MONTHS[m - 1]
    return r.choice((
        f"{m}/{d}/{y % 100:02d}", f"{m:02d}.{d:02d}.{y}", f"{y}/{m:02d}/{d:02d}", f"{d} {month} {y}",
        f"{month} {d}th, {y}", f"{month[:3]}. {d}", f"{d}-{month[:3].upper()}-{y % 100:02d}", f"{month} {y}",
        f"{d:02d}/{m:02d}/{y}", f"{month[:3]} {d} {y}", f"{y}-{m:02d}-{d:02d}",
    ))


def _phone(r: Rand) -> str:
    area, ex, line = r.randint(201, 989), r.randint(200, 989), r.randint(0, 9999)
    return r.choice((f"({area}) {ex}-{line:04d}", f"{area}.{ex}.{line:04d}", f"+1 {area} {ex} {line:04d}",
                     f"{area}-{ex}-{line:04d} ext. {r.randint(10, 9999)}", f"1-{area}-{ex}-{line:04d}"))


def _age_over_89(r: Rand) -> list[Fragment]:
    age = str(r.randint(90, 104))
    before, after = r.choice((("", "-year-old"), ("", " yo"), ("aged ", ""), ("", " y/o"), ("Age: ", ""),
                              ("", " year old")))
    return [(before, None), (age, "AGE"), (after, None)]


def _city_zip(r: Rand) -> list[Fragment]:
    city, state = r.choice(_CITIES)
    return [(city, "ADDRESS"), (f", {state} ", None), (str(r.randint(10000, 99999)), "ZIP")]


def _ssn(r: Rand) -> str:
    return f"{r.randint(100, 899)}-{r.randint(10, 99)}-{r.randint(1000, 9999)}"


# Generators for template slots: each returns the fragments of one filled slot.
_SLOTS: dict[str, Callable[[Rand], list[Fragment]]] = {
    "name": lambda r: [(_name(r), "NAME")],
    "eponym_surname_name": lambda r: [(_name(r, r.choice(_EPONYM_SURNAMES)), "NAME")],
    "surname": lambda r: [(r.choice(_LAST + _EPONYM_SURNAMES), "NAME")],
    "first_last": lambda r: [(f"{r.choice(_FIRST)} {r.choice(_LAST)}", "NAME")],
    "initials": lambda r: [(r.choice(_INITIALS), "NAME")],
    "date": lambda r: [(_date(r), "DATE")],
    "age90": _age_over_89,
    "age90_number": lambda r: [(str(r.randint(90, 104)), "AGE")],
    "mrn": lambda r: [(str(r.randint(10**5, 10**9)), "ID")],
    "alnum_id": lambda r: [(f"{r.choice(('E', 'HP-', 'XG', 'A'))}{r.randint(10**5, 10**8)}", "ID")],
    "dashed_id": lambda r: [(f"{r.randint(100, 999)}-{r.randint(100, 999)}-{r.randint(10, 99)}", "ID")],
    "phone": lambda r: [(_phone(r), "PHONE")],
    "extension": lambda r: [(str(r.randint(1000, 9999)), "PHONE")],
    "email": lambda r: [(f"{r.choice(_FIRST).lower()}.{r.choice(('k', 'p', 'mz'))}"
                         f"{r.choice(('', '+rad', '2'))}@{r.choice(('mercy-health.org', 'uhosp.edu', 'gmail.com'))}",
                         "EMAIL")],
    "url": lambda r: [(r.choice((f"https://pacs.uhosp.edu/viewer?study={r.randint(10**6, 10**7)}",
                                 f"www.mercy-health.org/patients/{r.randint(100, 99999)}",
                                 f"portal.mychart.com/p/{r.randint(1000, 9999)}")), "URL")],
    "ip": lambda r: [(r.choice((f"10.{r.randint(0, 255)}.{r.randint(0, 255)}.{r.randint(1, 254)}",
                                f"192.168.{r.randint(0, 255)}.{r.randint(1, 254)}:{r.randint(1024, 9999)}",
                                f"fe80::{r.randint(4096, 65535):x}:{r.randint(4096, 65535):x}")), "IP")],
    "street": lambda r: [(f"{r.randint(1, 9999)} {r.choice(_STREETS)}", "ADDRESS")],
    "city_zip": _city_zip,
    "zip": lambda r: [(f"{r.randint(10000, 99999)}", "ZIP")],
    "ssn": lambda r: [(_ssn(r), "SSN")],
    "ssn_plain": lambda r: [(_ssn(r).replace("-", r.choice(("", " "))), "SSN")],
    "eponym": lambda r: [(r.choice(_EPONYM_TERMS), "eponym")],
    "clinical": lambda r: [(r.choice(_CLINICAL), "clinical")],
}

# Report fragments in layouts that synthetic.py does not produce.
_TEMPLATES = (
    "Pt: {name}   DOB {date}   MRN {mrn}",
    "Patient Name - {name} | Acct #: {alnum_id} | Visit date {date}",
    "ADDENDUM {date}: Critical result called to {first_last}, RN at 14:32; read-back confirmed.",
    "Case reviewed with Dr {surname} (radiology fellow) who agrees; {clinical} noted.",
    "Wet read by {name} (resident) - {clinical}, otherwise unremarkable.",
    "Attending: {name}, MD",
    "I, {first_last}, MD, personally reviewed the images and agree with the findings.",
    "Ms. {surname} tolerated the procedure well. Known {eponym}.",
    "Please contact {first_last} at {phone} with questions about {clinical}.",
    "Mrs {surname}'s daughter reports a fall on {date}.",
    "Comparison: outside films from {city_zip} dated {date}.",
    "Patient resides at {street}, {city_zip}. Emergency contact: {name} {phone}.",
    "The patient is a {age90} woman with {eponym} and {clinical}.",
    "A {age90} man, status post {eponym} repair; {clinical} unchanged.",
    "SSN {ssn_plain}; Social Security No. {ssn}; Health plan ID: {alnum_id}",
    "Images: {url} (PACS node {ip}). Questions: {email}.",
    "Fax report to {phone}. Send copy to {email}",
    "Referred by {name}, NP for {eponym}; {clinical} and {clinical}.",
    "CC: Dr. {surname}; Dr. {first_last}",
    "Signed: {name} {date} 09:14; transcribed by {initials}",
    "Patient {eponym_surname_name} presents with {eponym}. History of {eponym}.",
    "Pt: {eponym_surname_name}. {clinical}; {eponym} in the differential.",
    "Med Rec No. {dashed_id}  Encounter: {alnum_id}  Zip: {zip}",
    "Admitted {date}; discharged {date}. Last imaging {date}.",
    "Findings communicated to {first_last} by phone at {phone} on {date}.",
    "{clinical}. {clinical}. No {eponym}. {clinical}.",
    "Physician: Dr. {name}   Pager {phone}",
    "Remote read from {ip}; report at {url}.",
    # Written after the rules were frozen, and kept although some are still missed: the score
    # should show the contexts that rules do not cover (e.g. "with Ann Lee and Bo Chan").
    "Consult requested by {first_last} (x{extension}) regarding {clinical}.",
    "Outside CD from Mercy Hospital, {city_zip}, received {date}.",
    "PCP: {name}",
    "Reviewed at tumor board {date} with {first_last} and {first_last}.",
    "{name} is a {age90_number}-year-old gentleman with {eponym}.",
    "Patient's husband, {first_last}, can be reached at {phone}.",
    "Results texted to Dr {surname} at {phone} ({date} 22:10).",
    "Study sent to {email} and archived under order {mrn}.",
    "Referring: {name} / NPI {mrn}",
    "Insurance member number {alnum_id}; claim {mrn}.",
    "Home: {street}, {city_zip}",
    "Verbal report given to {first_last}, PA-C, on {date}.",
    "DOB: {date}  Sex: F  Age: {age90_number}",
    "Technologist: {initials}  Radiologist: {name}",
    "Second opinion for {eponym_surname_name} from {url}.",
    "The previous exam ({date}) showed {clinical}; now {eponym}.",
    "Pt seen by NP {first_last} in clinic; {clinical}.",
    "Device IP {ip}; workstation RAD-{mrn}.",
)
_PARSED = [list(Formatter().parse(t)) for t in _TEMPLATES]


def _example(r: Rand) -> PlantedExample:
    pieces: list[Fragment] = []
    for n in range(r.randint(2, 4)):
        if n:
            pieces.append((r.choice(("\n", "\n\n", " ")), None))
        for literal, slot, _, _ in r.choice(_PARSED):
            pieces.append((literal, None))
            if slot:
                pieces.extend(_SLOTS[slot](r))
    text, phi, keep, pos = [], [], [], 0
    for piece, tag in pieces:
        if tag in PHI_TYPES:
            phi.append((pos, pos + len(piece), tag))
        elif tag:
            keep.append((pos, pos + len(piece), tag))
        text.append(piece)
        pos += len(piece)
    return PlantedExample("".join(text), tuple(phi), tuple(keep))


def planted_phi_examples(n: int, seed: int = 0) -> list[PlantedExample]:
    """`n` texts with planted PHI and protected clinical/eponym spans (deterministic in `seed`)."""
    r = random.Random(seed)
    return [_example(r) for _ in range(n)]


def measure(detector: SpanDetector, examples: Sequence[PlantedExample]) -> dict:
    """Recall per PHI type and overall, false-positive rate on clinical spans, eponyms preserved."""
    found = dict.fromkeys(PHI_TYPES, 0)
    total = dict.fromkeys(PHI_TYPES, 0)
    touched = {"clinical": 0, "eponym": 0}
    kept_total = {"clinical": 0, "eponym": 0}
    for ex in examples:
        spans = detector.find_spans(ex.text)
        covered = bytearray(len(ex.text))
        for s in spans:
            covered[s.start:s.end] = b"\x01" * (s.end - s.start)
        for start, end, kind in ex.phi:
            total[kind] += 1
            found[kind] += all(covered[i] for i in range(start, end) if ex.text[i].isalnum())
        for start, end, kind in ex.keep:
            kept_total[kind] += 1
            touched[kind] += any(covered[start:end])
    recall_by_type = {k: found[k] / total[k] for k in PHI_TYPES if total[k]}
    keep_all = kept_total["clinical"] + kept_total["eponym"]
    return {
        "recall_by_type": recall_by_type,
        "recall": sum(found.values()) / max(1, sum(total.values())),
        "false_positive_rate": (touched["clinical"] + touched["eponym"]) / max(1, keep_all),
        "eponyms_preserved": 1 - touched["eponym"] / max(1, kept_total["eponym"]),
        "phi_spans": sum(total.values()),
        "protected_spans": keep_all,
    }
