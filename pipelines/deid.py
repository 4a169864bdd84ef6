"""De-identification of radiology report text: HIPAA Safe-Harbor identifiers -> typed placeholders.

Why compiled rules and not Presidio or another NER model: Presidio's recognisers need spaCy
language models, which cannot be downloaded on this platform (nor, usually, on an air-gapped
hospital cluster), and a model would have to be shipped to and loaded by every Ray Data worker.
Report PHI also sits in predictable places: header fields ("Patient:", "MRN:"), titles ("Dr."),
signature and dictation lines, credentials ("..., MD"), critical-result sentences ("discussed with
..."), and identifiers with a recognisable shape (dates, phone numbers, e-mail addresses). Rules
anchored on those contexts run at several MB/s per core, behave the same on every worker, and can
be audited line by line.

How it works:
1. Shape rules find identifiers by their form: numbers (dates, phones, SSNs, IPs, long IDs, street
   numbers, ages over 89), month-name dates, e-mail addresses, URLs, "City, ST 12345".
2. Label rules find a label ("MRN", "Referring physician", "SSN", "Age", "discussed with",
   "requested by", "husband,") on a lower-cased copy of the text, then match the value that
   follows it on the original text.
3. Name rules: titles ("Dr.", "Mrs."), credentials (", MD"), lines holding only "Last, First",
   "... and Bo Chan" after a found name, "Ann Lee is a 93-year-old ...".
4. Names found by a label, a title or a credential are searched for again in the whole report (a
   surname from the header is also removed where it stands alone in the body).
5. Medical eponyms (explicit allow-list, e.g. "Baker cyst", "Hodgkin lymphoma", "Hill-Sachs")
   override the weak name detections: those of 4 and those from looser contexts (verbs, roles,
   a bare "by", name-only lines), which also must not contain a stop word.
Overlapping detections are merged; each merged span becomes one placeholder such as `[NAME]`.

Speed: `re` tries a pattern at every position unless it starts with a literal or a character
class, which it skips to in C. So most scans start with one (a look-behind guard goes after the
first character), keyword lists are compiled as prefix trees so that a position is rejected after
one character, and the rarer rules are gated by a substring test. Nothing here logs, or raises
with, report text.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Iterable, NamedTuple

PHI_TYPES = ("NAME", "DATE", "AGE", "ID", "PHONE", "EMAIL", "URL", "IP", "ADDRESS", "ZIP", "SSN")
# When two detections cover the same text, the more specific type names the merged span.
_PRIORITY = {kind: rank for rank, kind in enumerate(
    ("SSN", "EMAIL", "URL", "IP", "PHONE", "DATE", "AGE", "ZIP", "ADDRESS", "ID", "NAME"))}


class Span(NamedTuple):
    start: int
    end: int
    kind: str


# A detection: (start, end, PHI type, weak). Weak name detections yield to medical eponyms.
_Hit = tuple[int, int, str, bool]


def _trie(words: Iterable[str]) -> str:
    """A regex alternation of `words`, factored into a prefix tree; a blank matches spaces/tabs.

    `re` tries the branches of an alternation one after the other at every position; with the
    branches sharing prefixes, a position is rejected after one character (about 5x faster here).
    """
    tree: dict = {}
    for word in words:
        node = tree
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = {}

    def build(node: dict) -> str:
        branches = [(r"[ \t]+" if ch == " " else re.escape(ch)) + build(child)
                    for ch, child in sorted(node.items()) if ch]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if "" in node else body

    return f"(?:{build(tree)})"


def _cased(words: Iterable[str]) -> list[str]:
    """Each word Capitalised and in CAPITALS (a lower-case "may" is a verb, not a month)."""
    return sorted({form for w in words for form in (w[0].upper() + w[1:], w.upper())})


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")

# ---------------------------------------------------------------- building blocks

_MONTH = _trie(_cased(("january", "jan", "february", "feb", "march", "mar", "april", "apr", "may", "june", "jun",
                       "july", "jul", "august", "aug", "september", "sept", "sep", "october", "oct", "november",
                       "nov", "december", "dec"))) + r"(?![A-Za-z])"
_DAY = r"(?:0?[1-9]|[12]\d|3[01])"
_MON = r"(?:0?[1-9]|1[0-2])"
_YEAR = r"(?:19|20)\d{2}"
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_STATES = _trie("AL AK AZ AR CA CO CT DE DC FL GA HI ID IL IN IA KS KY LA ME MD MA MI MN MS MO MT NE NV NH NJ NM "
                "NY NC ND OH OK OR PA RI SC SD TN TX UT VT VA WA WV WI WY PR".split())
_STATE_NAMES = _trie((
    "Alabama", "Alaska", "Arizona", "Arkansas", "California", "Colorado", "Connecticut", "Delaware", "Florida",
    "Georgia", "Hawaii", "Idaho", "Illinois", "Indiana", "Iowa", "Kansas", "Kentucky", "Louisiana", "Maine",
    "Maryland", "Massachusetts", "Michigan", "Minnesota", "Mississippi", "Missouri", "Montana", "Nebraska",
    "Nevada", "New Hampshire", "New Jersey", "New Mexico", "New York", "North Carolina", "North Dakota", "Ohio",
    "Oklahoma", "Oregon", "Pennsylvania", "Rhode Island", "South Carolina", "South Dakota", "Tennessee", "Texas",
    "Utah", "Vermont", "Virginia", "Washington", "West Virginia", "Wisconsin", "Wyoming"))
_STREET_SUFFIX = _trie(("Street", "St", "Avenue", "Ave", "Road", "Rd", "Boulevard", "Blvd", "Drive", "Dr", "Lane",
                        "Ln", "Way", "Court", "Ct", "Place", "Pl", "Terrace", "Ter", "Parkway", "Pkwy", "Highway",
                        "Hwy", "Circle", "Cir", "Square", "Sq", "Trail", "Trl", "Route", "Rte"))
_UNIT = r"(?:,?[ \t]*(?:Apt|Apartment|Suite|Ste|Unit|Floor|Fl|Room|Rm|#)\.?[ \t]*#?[A-Za-z0-9-]+)?"
_EXTENSION = r"(?:[ \t]*(?:x|ext\.?|extension)[ \t]*\d{1,6}(?!\d))?"

# A name word: "Smith", "SMITH", "O'Connor", "McAllister", "Smith-Jones", "Muñoz" (never a lone initial).
_UPPER = "A-ZÀ-ÖØ-Þ"
_TOKEN = rf"[{_UPPER}](?:['’][{_UPPER}])?[^\W\d_]+(?:-[{_UPPER}][^\W\d_]+)?"
_PARTICLE_WORDS = ("van", "von", "de", "der", "den", "del", "della", "da", "di", "du", "la", "le", "bin", "ibn", "ben",
                   "al", "el")
_PARTICLES = rf"(?:{_trie([*_PARTICLE_WORDS, *_cased(_PARTICLE_WORDS)])}[ \t]+){{0,2}}"  # "van der", "De la"
_INITIAL = r"[A-Z](?:\.|(?![\w'’-]))"
_SUFFIX = r"(?:,?[ \t]+(?:Jr|Sr|II|III|IV)\.?(?![A-Za-z]))?"
_LAST_FIRST = rf"{_PARTICLES}{_TOKEN}[ \t]*,[ \t]*{_TOKEN}(?:[ \t]+(?:{_TOKEN}|{_INITIAL}))?"
_FIRST_LAST = (rf"(?:[A-Z]\.[ \t]*)?{_PARTICLES}{_TOKEN}(?:[ \t]+{_INITIAL})?(?:[ \t]+{_PARTICLES}{_TOKEN}){{0,2}}"
               rf"{_SUFFIX}")
_NAME = rf"(?:{_LAST_FIRST}|{_FIRST_LAST})"
# At least two words ("Ann Lee", "Lee, Ann", "A. Lee"): for contexts too common to trust one word.
_FULL_NAME = (rf"(?:{_LAST_FIRST}|[A-Z]\.[ \t]*{_PARTICLES}{_TOKEN}"
              rf"|{_TOKEN}(?:[ \t]+{_INITIAL})?(?:[ \t]+{_PARTICLES}{_TOKEN}){{1,2}}{_SUFFIX})")
_TITLE = _trie(("Dr", "DR", "Doctor", "Prof", "Professor", "Mrs", "MRS", "Mr", "Ms", "Miss", "Mx")) + r"\.?"

# ---------------------------------------------------------------- 1. shape rules

# Every rule that starts with a digit, tried only where a number starts (`_NUMBER_START`: a digit
# not inside a word, decimal or range); led by that look-behind, the scan would try every position.
_NUMBER_START = re.compile(r"\d(?<![\w./+-]\d)")
_NUMBERS = re.compile(
    r"(?:"
    r"(?P<SSN>\d{3}-\d{2}-\d{4}(?![\w-]))"
    rf"|(?P<PHONE>(?:1[ .-])?\d{{3}}[ .-]\d{{3}}[ .-]\d{{4}}(?![\w-]){_EXTENSION})"
    rf"|(?P<IP>{_OCTET}(?:\.{_OCTET}){{3}}(?::\d{{1,5}})?(?!\w|\.\d))"
    r"|(?P<DATE>"
    r"(?:[0-2]?\d|3[01])(?P<sep>[/-])(?:[0-2]?\d|3[01])(?P=sep)(?:19|20)?\d{2}(?![\w/]|[.-]\d)"  # 3/4/2015, 31-12-15
    rf"|(?:[0-2]?\d|3[01])\.(?:[0-2]?\d|3[01])\.{_YEAR}(?!\w|\.\d)"  # 04.03.2015
    rf"|{_YEAR}(?P<isep>[/.-]){_MON}(?P=isep){_DAY}(?!\d)"  # 2015-03-04
    rf"|{_MON}/{_YEAR}(?![\w/])"  # 03/2015
    rf"|{_DAY}(?:st|nd|rd|th)?[ \t]+(?:of[ \t]+)?{_MONTH}\.?(?:,?[ \t]+{_YEAR}(?!\d))?"  # 4th of March 2015
    rf"|{_DAY}[-/]?{_MONTH}[-/]?(?:{_YEAR}|\d{{2}})(?!\d)"  # 04-MAR-2015, 14MAR15
    rf"|(?<=\bon |\bOn ){_MON}/{_DAY}(?![\w/])"  # "on 3/4" (a bare 2/6 is a murmur grade)
    r")"
    r"|(?P<AGE>(?:9\d|1[0-2]\d)"
    r"(?=[ \t-]*(?:years?|yrs?)(?:[ \t-]*old)?(?![A-Za-z])|[ \t]*(?:y/?o|y\.o\.|YO)(?![A-Za-z]))"
    r"|(?<=in his |in her )(?:9|10)0'?s(?![\w']))"
    rf"|(?P<ADDRESS>\d{{1,6}}[A-Z]?[ \t]+(?:[NSEW]\.?[ \t]+)?(?:[A-Z][A-Za-z'’-]*\.?[ \t]+){{0,3}}?"
    rf"[A-Z][A-Za-z'’-]*[ \t]+{_STREET_SUFFIX}(?![A-Za-z])\.?{_UNIT})"
    r"|(?P<ID>\d{7,}(?:-?[A-Z0-9]{1,4})?(?![\w-]|\.\d))"
    r")"
)
_PHONE_PUNCT = re.compile(rf"\+1[ .-]?\(?\d{{3}}\)?[ .-]?\d{{3}}[ .-]\d{{4}}(?![\w-]){_EXTENSION}"
                          rf"|\(\d{{3}}\)[ .-]?\d{{3}}[ .-]\d{{4}}(?![\w-]){_EXTENSION}")
_EXTENSION_ONLY = re.compile(r"(?:x|ext\.?|extension)[ \t]?\d{3,5}(?![\w.])")  # "(x4321)"
# The guard (not inside a word) follows the first letter, so that the scan is led by a class.
_LETTER_ID = re.compile(r"[A-Z](?<![\w.-][A-Z])[A-Z]{0,3}-?\d{5,}(?:-?[A-Z0-9]{1,4})?(?![\w-]|\.\d)")
_MONTH_DATE = re.compile(rf"{_MONTH}\.?(?:[ \t]+{_DAY}(?:st|nd|rd|th)?(?!\w|:\d)(?:,?[ \t]+{_YEAR}(?!\d))?"
                         rf"|,?[ \t]+{_YEAR}(?!\d))")
_AGE_WORDS = re.compile(r"(?<![a-z])(?:ninety|one hundred)(?:[ -](?:one|two|three|four|five|six|seven|eight|nine))?"
                        r"(?=[ -]years?[ -])")
_STATE_ZIP = re.compile(rf",[ \t]*(?:{_STATES}\.?,?[ \t]+(?P<zip>\d{{5}}(?:-\d{{4}})?)(?!\d)"
                        rf"|{_STATE_NAMES}(?![a-z])(?:,?[ \t]+(?P<zip2>\d{{5}}(?:-\d{{4}})?)(?!\d))?)")
_CITY_BEFORE = re.compile(r"(?<![A-Za-z])[A-Z][a-z]+(?:[ \t][A-Z][a-z]+){0,2}\Z")
_PO_BOX = re.compile(r"(?<![a-z])p\.?[ \t]?o\.?[ \t]*box[ \t]+\d+")
_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
_TLD = re.compile(r"\.(?:com|org|net|edu|gov|mil|io|info|health)(?![A-Za-z0-9-])", re.IGNORECASE)
_URL_ANCHOR = re.compile(r"://|www\.")
_URL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~:/?#@!$&*+,;=%")
_IPV6_HINT = re.compile(r"::|:[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{1,4}:")  # literal-led: a cheap gate
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![\w:])"
                   r"|(?<![\w:])(?=[0-9A-Fa-f:]*::)[0-9A-Fa-f]{1,4}(?::{1,2}[0-9A-Fa-f]{1,4}){1,7}(?![\w:])")

# ---------------------------------------------------------------- 2. label rules

_NAME_VALUE = re.compile(rf"[ \t]*(?:[:=]|-(?=[ \t]))[ \t]*(?:{_TITLE}[ \t]+)?(?P<v>{_NAME})")
_BY_VALUE = re.compile(rf"[ \t]*:?[ \t]*(?:{_TITLE}[ \t]+)?(?P<v>{_NAME})")
_VERB_VALUE = re.compile(
    r"[ \t]+(?:(?:with|to)[ \t]+)?(?:the[ \t]+)?"
    r"(?:(?:referring|ordering|covering|on-call|treating|primary|attending|emergency|ED|ER|ICU|charge)[ \t]+)?"
    r"(?:(?:physician|provider|clinician|doctor|nurse|NP|PA|PA-C|resident|surgeon|practitioner|radiologist)"
    rf",?[ \t]+)?(?:{_TITLE}[ \t]+)?(?P<v>{_NAME})"
)
_BY_NAME_VALUE = re.compile(rf"[ \t]+(?:{_TITLE}[ \t]+)?(?P<v>{_FULL_NAME})")
_ROLE_VALUE = re.compile(rf"[ \t]*,?[ \t]+(?:{_TITLE}[ \t]+)?(?P<v>{_FULL_NAME})")
_ID_VALUE = re.compile(r"[ \t]*(?:(?i:number|num|nbr|no)\.?|#|(?i:id))?[ \t]*[:#=]?[ \t]*"
                       r"(?P<v>(?=[A-Za-z-]*\d)[A-Za-z0-9][A-Za-z0-9-]{2,24})(?![A-Za-z0-9])")
_PHONE_VALUE = re.compile(r"[ \t]*(?:(?i:number|no)\.?|#)?[ \t]*[:#]?[ \t]*"
                          r"(?P<v>\+?\(?\d[\d ().-]{2,16}\d(?:[ \t]*(?:x|ext\.?)[ \t]*\d{1,6})?)(?!\w)")
_SSN_VALUE = re.compile(r"[ \t]*(?:(?i:number|no)\.?|#)?[ \t]*[:#]?[ \t]*(?P<v>\d{3}[- ]?\d{2}[- ]?\d{4})(?!\d)")
_AGE_VALUE = re.compile(r"[ \t]*[:=]?[ \t]*(?P<v>9\d|1[0-2]\d)(?!\d|\.\d)")
_ZIP_VALUE = re.compile(r"[ \t]*[:#]?[ \t]*(?P<v>\d{5}(?:-\d{4})?)(?!\d)")
_ADDRESS_VALUE = re.compile(r"[ \t]*:?[ \t]*(?P<v>[^\s;|][^\n;|]{3,80}?)(?=[ \t]*(?:\n|;|\||$)|[ \t]{2,}|,?[ \t]+"
                            r"(?:Phone|Tel|MRN|DOB|SSN)\b)")

# (labels, PHI type, value pattern, weak). Labels are lower case; a blank stands for any run of
# blanks. A name after a verb ("discussed with ...") is weak: it yields to eponyms ("so-called
# Baker cyst") and is not searched for elsewhere.
_LABEL_GROUPS: tuple[tuple[tuple[str, ...], str, re.Pattern, bool], ...] = (
    (("patient name", "patient's name", "patient", "pt name", "pt", "name", "referring physician",
      "referring provider", "referring doctor", "referring md", "referring clinician", "referring",
      "ordering physician", "ordering provider", "ordering md", "ordering clinician", "ordering", "attending",
      "attending physician", "attending radiologist", "radiologist", "reading radiologist", "interpreting radiologist",
      "physician", "provider", "pcp", "primary care physician", "technologist", "tech", "resident", "fellow", "cc",
      "copy to", "consultant", "surgeon", "guarantor", "subscriber", "emergency contact", "next of kin",
      "spouse", "guardian", "mother", "father", "dictating physician", "signing physician",
      "signed", "signature", "dictated", "transcribed", "transcriptionist", "author"),
     "NAME", _NAME_VALUE, False),
    (("signed by", "electronically signed by", "e-signed by", "cosigned by", "co-signed by", "dictated by",
      "transcribed by", "read by", "interpreted by", "reviewed by", "verified by", "approved by", "performed by",
      "referred by", "seen by", "evaluated by", "attested by", "reported by", "finalized by", "entered by",
      "ordered by", "examined by", "scanned by", "prepared by", "requested by"),
     "NAME", _BY_VALUE, False),
    (("discussed with", "d/w", "communicated to", "communicated with", "conveyed to", "relayed to", "reported to",
      "spoke with", "spoke to", "spoken with", "spoken to", "talked to", "talked with", "reviewed with", "called",
      "called to", "paged", "notified", "informed", "telephoned", "faxed to", "sent to", "emailed to",
      "care of", "attn", "attention", "contact", "please contact", "given to", "provided to", "handed to",
      "delivered to", "results to"),
     "NAME", _VERB_VALUE, True),
    # "... requested by Ann Lee", "husband, Ann Lee": weak, and two words at least
    (("by",), "NAME", _BY_NAME_VALUE, True),
    (("husband", "wife", "son", "daughter", "sister", "brother", "partner", "caregiver", "friend", "nurse", "np",
      "pa", "pa-c", "rn", "colleague", "fellow", "resident", "technologist", "tech"),
     "NAME", _ROLE_VALUE, True),
    (("mrn", "mr#", "mr #", "mr no", "mr number", "medical record", "medical record number", "med rec",
      "medical rec", "record", "record number", "acc", "accession", "accn", "account", "acct", "encounter", "enc",
      "visit", "visit id", "fin", "csn", "har", "order", "requisition", "req", "patient id", "pt id", "pid",
      "member id", "member", "subscriber id", "policy", "insurance id", "health plan", "beneficiary", "claim",
      "certificate", "license", "licence", "lic", "dea", "npi", "serial", "device id", "vin", "plate", "id",
      "exam id", "study id", "specimen", "unit number"),
     "ID", _ID_VALUE, False),
    (("phone", "tel", "telephone", "cell phone", "mobile", "home phone", "work phone", "fax", "pager", "beeper",
      "pgr", "callback", "call back", "contact number"),
     "PHONE", _PHONE_VALUE, False),
    (("ssn", "ss#", "ss #", "social security", "social security number", "soc sec"), "SSN", _SSN_VALUE, False),
    (("age", "aged"), "AGE", _AGE_VALUE, False),
    (("zip", "zip code", "zipcode", "postal code"), "ZIP", _ZIP_VALUE, False),
    (("address", "home address", "mailing address", "street address", "addr", "resides at", "lives at",
      "residence"), "ADDRESS", _ADDRESS_VALUE, False),
)
# label -> the (PHI type, value pattern, weak) rules to try in order
_LABEL_RULE: dict[str, list[tuple[str, re.Pattern, bool]]] = {}
for _labels_, _kind, _pattern, _weak in _LABEL_GROUPS:
    for _label in _labels_:
        _LABEL_RULE.setdefault(_label, []).append((_kind, _pattern, _weak))
# Without a colon, "Patient John Smith ..." still names the patient, less surely; "Pt SOB" does not.
_PATIENT_VALUE = re.compile(rf"[ \t]+(?:{_TITLE}[ \t]+)?(?P<v>{_LAST_FIRST}"
                            rf"|[A-Z]\.[ \t]*{_TOKEN}"
                            rf"|(?=[A-Z][a-z]){_TOKEN}(?:[ \t]+{_INITIAL})?(?:[ \t]+{_PARTICLES}{_TOKEN}){{1,2}})")
for _label in ("patient", "pt"):
    _LABEL_RULE[_label].append(("NAME", _PATIENT_VALUE, True))
for _label in _LABEL_RULE:  # "Consult requested by Ann Lee": a "... by" label without its colon
    if _label.endswith(" by"):
        _LABEL_RULE[_label].append(("NAME", _BY_NAME_VALUE, True))
_LABELS = re.compile(r"(?<![a-z0-9])(?=[a-z])" + _trie(_LABEL_RULE) + r"(?![a-z0-9])")
# "Exam name:" and the like are not a person's name.
_NOT_A_PERSON = ("exam ", "study ", "procedure ", "protocol ", "file ", "series ", "drug ", "device ", "test ",
                 "facility ", "hospital ", "sequence ", "user ")

# ---------------------------------------------------------------- 3. name rules

_TITLED = re.compile(rf"{_TITLE}[ \t]+(?P<v>{_FIRST_LAST})")
# Credentials after a name; the short, ambiguous ones ("DO", "PA", "RN") only after a comma.
# One prefix tree, comma forms included, so that the scan is led by a character class (3x faster).
_CREDENTIAL = re.compile(_trie(("M.D.", "MD", "MBBS", "PhD", "Ph.D.", "FRCR", "FRCPC", "DABR", "APRN", "CRNA",
                                "PA-C", "RDMS", "RT(R)",
                                *(comma + c for comma in (",", ", ") for c in ("D.O.", "DO", "PA", "NP", "RN", "RT"))))
                         + r"(?![A-Za-z])(?![ \t]*\d{5})")
_NAME_BEFORE = re.compile(rf"(?<![A-Za-z'’-])(?P<v>{_NAME})[ \t]*,?[ \t]*\Z")
_AND_NAME = re.compile(rf"[ \t]+(?:and|&)[ \t]+(?:{_TITLE}[ \t]+)?(?P<v>{_FULL_NAME})")
# "Ann Lee is a 93-year-old ...": the name is found backwards from the phrase
_PERSON_IS = re.compile(r"[ \t]+(?:is|was)[ \t]+an?[ \t]+"
                        r"(?=\d{1,3}[ \t-]*(?:years?|yrs?|y/?o|yo)\b|[a-z]+(?:-[a-z]+)?[ -]year)")
_FULL_NAME_BEFORE = re.compile(rf"(?<![A-Za-z'’-])(?P<v>{_FULL_NAME})\Z")
_NAME_LINE = re.compile(rf"[ \t]*(?P<v>{_LAST_FIRST})[ \t]*\Z")
_WORD = re.compile(r"[^\W\d_](?:[^\W\d_]|['’-])*\.?")
_INITIALS = re.compile(r"[A-Z]{2,3}")  # "Tech: CM", "transcribed by PM": initials, whatever they spell
_COMPOUND = re.compile(r"[^\W\d_]{1,30}(?:-[^\W\d_]{1,30}){0,3}")

# Capitalised words that end or begin a name match but are not names.
_STOP = frozenset("""
a an and or of on at in by for with to from via per is was were has had have this that these those no not please
call thank you the patient pt name mrn dob date birth acc accession account age sex gender male female phone fax
tel address study procedure report radiology diagnostic imaging department dept hospital clinic center centre
medical health university service services unit ward floor room suite team emergency urgent care icu ed er pacu
nicu radiologist physician provider doctor nurse resident fellow attending technologist tech referring ordering
signed electronically dictated transcribed read reviewed verified approved final preliminary prelim amended
corrected addendum results result critical finding findings verbal telephone page pager time am pm today
tomorrow yesterday monday tuesday wednesday thursday friday saturday sunday january february march april may
june july august september october november december jan feb mar apr jun jul aug sep sept oct nov dec md do
pa np rn mbbs phd ct cta mr mri mra xr cr dx us rf fl nm pet kub ap lat chest head brain abdomen pelvis spine
knee shoulder wrist hand foot ankle hip neck left right bilateral views view portable contrast without wo w
protocol series image axial coronal sagittal normal stable unchanged new acute chronic yes none see above below
note impression conclusion summary recommendation exam examination history indication technique comparison
clinical reason mg ml cm mm ssn id npi by dr mr mrs ms miss prof st street ave road lane drive apt fin csn
encounter visit order requisition member policy record number consent orthopedics orthopaedics ortho surgery
cardiology neurology neurosurgery oncology urology medicine pediatrics gastroenterology pulmonology nephrology
hospitalist trauma ent obstetrics gynecology ob gyn ir interventional vascular primary family internal
dlp ctdi ctdivol kvp mas hu ef bi rads ti pi cad pe dvt ekg ecg
""".split())

# ---------------------------------------------------------------- 5. eponyms

EPONYMS = frozenset("""
hodgkin parkinson crohn wilms colles baker graves cushing alzheimer barrett bankart hill sachs schmorl monteggia
salter harris smith jones paget chiari arnold dandy walker meckel morton segond galeazzi bennett rolando barton
chance jefferson lisfranc maisonneuve pott tillaux osgood schlatter sinding larsen johansson kienbock kienböck
preiser perthes legg calve calvé scheuermann klippel feil trenaunay sturge weber kawasaki takayasu wegener kaposi
ewing burkitt hashimoto addison conn zenker killian mallory weiss boerhaave schatzki hirschsprung wilson budd
caroli klatskin whipple kerley hounsfield agatston bosniak fleischner virchow spigelian morgagni bochdalek
hampton westermark kartagener pancoast ghon ranke luschka magendie rathke wernicke korsakoff huntington
creutzfeldt jakob guillain barre barré binswanger fahr modic tarlov baastrup bertolotti kummell kümmell chopart
achilles hoffa pellegrini stieda wrisberg humphrey stener hutchinson essex lopresti madelung guyon sudeck
dupuytren ledderhose peyronie haglund sever freiberg kohler köhler couinaud glisson calot oddi vater wirsung
santorini gerota zuckerkandl treitz ladd bouveret rigler courvoisier murphy mcburney rovsing cullen turner marfan
ehlers danlos loeys dietz stanford debakey adamkiewicz willis galen rosenthal labbe labbé trolard monro sylvius
broca heschl batson osler rendu wallenberg horner bell brown sequard séquard tolosa hunt lhermitte charcot marie
tooth friedreich meniere ménière eustachian valsalva trendelenburg seldinger swan ganz hickman foley greenfield
nissen roux billroth hartmann kasai fontan glenn blalock taussig norwood ross mustard senning rastelli jatene
fallot ebstein eisenmenger kommerell bland garland holt oram williams noonan down klinefelter kallmann sheehan
nelson zollinger ellison peutz jeghers gardner lynch cowden hippel lindau bourneville recklinghausen gorlin
caffey blount panner brodie codman bouchard heberden still reiter behcet behçet sjogren sjögren raynaud kimura
castleman erdheim chester langerhans rosai dorfman gaucher niemann pick tay hurler hunter morquio wolff
kirschner steinmann harrington luque cobb ferguson risser kellgren lawrence outerbridge
""".split())
# What may follow an eponym that is used as a medical term (matched on lower-cased text).
_EPONYM_CONTEXT = re.compile(
    r"(?:['’]s)?(?:[ \t]+(?:type[ \t]+)?(?:[ivx]{1,4}f?|\d[a-z]?|[a-d]))?[ \t-]+" + _trie((
        "disease", "lymphoma", "tumor", "tumour", "fracture", "fractures", "fracture-dislocation", "cyst", "cysts",
        "lesion", "lesions", "deformity", "node", "nodes", "nodule", "esophagus", "syndrome", "sign", "signs",
        "ulcer", "diverticulum", "neuroma", "malformation", "anomaly", "dementia", "sarcoma", "procedure",
        "operation", "repair", "classification", "class", "type", "grade", "score", "scale", "criteria", "line",
        "lines", "angle", "triangle", "canal", "duct", "space", "pouch", "fascia", "hernia", "body", "bodies",
        "cell", "cells", "granuloma", "phenomenon", "palsy", "thyroiditis", "arteritis", "ligament", "joint",
        "ring", "pattern", "configuration", "injury", "tear", "fragment", "catheter", "filter", "shunt", "tube",
        "unit", "units", "hematoma", "contusion", "fat pad", "aneurysm", "band", "valve", "anastomosis",
        "reconstruction", "bursa", "bursitis", "tendon", "sclerosis", "vasculitis", "granulomatosis", "spot",
        "spots", "maneuver", "position", "view", "projection", "test", "effect", "system", "segment", "segments",
        "infarct", "area", "gyrus", "fissure", "sulcus", "nucleus", "membrane", "gland", "glands", "bar",
        "osteochondrosis", "apophysitis", "variant", "complex", "triad", "tetralogy", "atresia", "wire", "wires",
        "rod", "rods", "pin", "pins", "epiphysis", "encephalopathy", "chorea", "cardiomyopathy", "arthropathy",
        "neuropathy", "changes", "endplate", "flare", "stage", "staging"))
    + r"(?![a-z])|['’]s(?![a-z])",
    re.IGNORECASE,
)


# ---------------------------------------------------------------- the detector


class Deidentifier:
    """Finds PHI spans in report text and replaces them with typed placeholders.

    It holds no state (the compiled patterns are module-level), so one instance can be shared by
    the threads of a Ray Data worker.
    """

    def find_spans(self, text: str | None) -> list[Span]:
        """Merged, non-overlapping PHI spans, in text order."""
        if not text:
            return []
        lower = text.translate(_ASCII_LOWER)  # same length as `text`: offsets carry over
        hits: list[_Hit] = []
        _shapes(text, lower, hits)
        _labels(text, lower, hits)
        _names(text, hits)
        _propagate(text, lower, hits)
        return _merge([h for h in hits if not (h[3] and _is_eponym(text, h[0], h[1]))])

    def redact(self, text: str | None) -> tuple[str, dict[str, int]]:
        """The text with every PHI span replaced by `[TYPE]`, and the count of replacements per type."""
        counts = dict.fromkeys(PHI_TYPES, 0)
        if not text:
            return "", counts
        out: list[str] = []
        pos = 0
        for start, end, kind in self.find_spans(text):
            out.append(text[pos:start])
            out.append(f"[{kind}]")
            counts[kind] += 1
            pos = end
        out.append(text[pos:])
        return "".join(out), counts


def _shapes(text: str, lower: str, hits: list[_Hit]) -> None:
    end = 0
    for start in _NUMBER_START.finditer(text):
        if start.start() >= end and (m := _NUMBERS.match(text, start.start())):
            hits.append((m.start(), m.end(), m.lastgroup, False))
            end = m.end()
    for pattern, kind in ((_PHONE_PUNCT, "PHONE"), (_LETTER_ID, "ID")):
        for m in pattern.finditer(text):
            hits.append((m.start(), m.end(), kind, False))
    # Checked here, not by a leading guard, which would slow these scans down several times.
    for pattern, kind in ((_MONTH_DATE, "DATE"), (_EXTENSION_ONLY, "PHONE")):
        for m in pattern.finditer(text):
            if not _inside_word(text, m.start()):
                hits.append((m.start(), m.end(), kind, False))
    if "ninety" in lower or "hundred" in lower:
        hits.extend((m.start(), m.end(), "AGE", False) for m in _AGE_WORDS.finditer(lower))
    for m in _STATE_ZIP.finditer(text):
        city = _CITY_BEFORE.search(text, max(0, m.start() - 40), m.start())
        if city:
            hits.append((city.start(), city.end(), "ADDRESS", False))
        zip_group = "zip" if m["zip"] else "zip2" if m["zip2"] else None
        if zip_group:
            hits.append((m.start(zip_group), m.end(zip_group), "ZIP", False))
    if "box" in lower:
        hits.extend((m.start(), m.end(), "ADDRESS", False) for m in _PO_BOX.finditer(lower))
    if "@" in text:
        hits.extend((m.start(), _strip_punct(text, *m.span()), "EMAIL", False) for m in _EMAIL.finditer(text))
    if "://" in text or "www." in lower or _TLD.search(text):
        _urls(text, lower, hits)
    if _IPV6_HINT.search(text):
        hits.extend((m.start(), m.end(), "IP", False) for m in _IPV6.finditer(text))


def _urls(text: str, lower: str, hits: list[_Hit]) -> None:
    """URLs around their anchors ("://", "www.", a top-level domain), widened to the URL's ends."""
    anchors = sorted([m.start() for m in _URL_ANCHOR.finditer(lower)] + [m.start() for m in _TLD.finditer(text)])
    end = 0
    for anchor in anchors:
        if anchor < end:
            continue  # inside the URL found from an earlier anchor
        start = anchor
        while start > 0 and text[start - 1] in _URL_CHARS and text[start - 1] != "@":
            start -= 1
        if start > 0 and text[start - 1] == "@":
            continue  # the domain of an e-mail address
        end = anchor
        while end < len(text) and text[end] in _URL_CHARS:
            end += 1
        hits.append((start, _strip_punct(text, start, end), "URL", False))


def _strip_punct(text: str, start: int, end: int) -> int:
    while end > start + 1 and text[end - 1] in ".,;:?!":  # sentence punctuation after a link or address
        end -= 1
    return end


def _labels(text: str, lower: str, hits: list[_Hit]) -> None:
    for m in _LABELS.finditer(lower):
        label = m.group()
        if label not in _LABEL_RULE:
            label = " ".join(label.split())  # "referring   physician"
        for kind, pattern, weak in _LABEL_RULE[label]:
            value = pattern.match(text, m.end())
            if value:
                break
        else:
            continue
        if label == "name" and lower[max(0, m.start() - 10):m.start()].endswith(_NOT_A_PERSON):
            continue
        if kind == "NAME":
            _add_name(text, value.start("v"), value.end("v"), hits, weak)
        else:
            hits.append((value.start("v"), value.end("v"), kind, False))


def _names(text: str, hits: list[_Hit]) -> None:
    _titled_names(text, hits)
    _credentialed_names(text, hits)
    _name_lines(text, hits)
    if " is a" in text or " was a" in text:
        for m in _PERSON_IS.finditer(text):  # "Ann Lee is a 93-year-old ..."
            name = _FULL_NAME_BEFORE.search(text, max(0, m.start() - 60), m.start())
            if name:
                _add_name(text, name.start("v"), name.end("v"), hits, weak=True)
    for start, end, kind, _ in hits[:]:  # "with Ann Lee and Bo Chan"
        if kind == "NAME" and (m := _AND_NAME.match(text, end)):
            _add_name(text, m.start("v"), m.end("v"), hits, weak=True)


def _titled_names(text: str, hits: list[_Hit]) -> None:
    # Scanned without a leading guard (much faster); the word boundary is checked here.
    pos = 0
    while m := _TITLED.search(text, pos):
        if not _inside_word(text, m.start()):
            _add_name(text, m.start("v"), m.end("v"), hits, weak=False)
        pos = m.start("v")  # a name may run into the next title: "Dr. Ann Lee Mrs Kay"


def _credentialed_names(text: str, hits: list[_Hit]) -> None:
    name_ends = {end for _, end, kind, _ in hits if kind == "NAME"}
    for m in _CREDENTIAL.finditer(text):
        if _inside_word(text, m.start()) or name_ends.intersection(range(m.start() - 3, m.start() + 1)):
            continue  # not a credential, or its name is already found ("signed by: Ann Lee, MD")
        line_start = max(text.rfind("\n", 0, m.start()) + 1, m.start() - 80)
        name = _NAME_BEFORE.search(text, line_start, m.start())
        if name:
            _add_name(text, name.start("v"), name.end("v"), hits, weak=False)


def _name_lines(text: str, hits: list[_Hit]) -> None:
    """Short lines that hold only "Last, First" (signature blocks, headers without labels)."""
    comma = text.find(",")
    while comma != -1:
        line_start = text.rfind("\n", 0, comma) + 1
        line_end = text.find("\n", comma)
        line_end = len(text) if line_end == -1 else line_end
        if line_end - line_start < 60:
            name = _NAME_LINE.match(text, line_start, line_end)
            if name:
                _add_name(text, name.start("v"), name.end("v"), hits, weak=True)
        comma = text.find(",", line_end)


def _inside_word(text: str, pos: int) -> bool:
    return pos > 0 and text[pos - 1].isalpha()


def _propagate(text: str, lower: str, hits: list[_Hit]) -> None:
    """Every other capitalised occurrence of the words of strongly detected names."""
    strong = [(start, end) for start, end, kind, weak in hits if kind == "NAME" and not weak]
    words = {w.rstrip(".") for start, end in strong for w in _WORD.findall(lower, start, end)}
    for word in words:
        if len(word) < 2 or word in _STOP or lower.count(word) < 2:
            continue  # one occurrence: the one already found
        pos = lower.find(word)
        while pos != -1:
            end = pos + len(word)
            if (text[pos].isupper() and not _inside_word(text, pos) and (end == len(text) or not text[end].isalpha())
                    and not any(s <= pos < e for s, e in strong)):
                hits.append((pos, end, "NAME", True))
            pos = lower.find(word, end)


def _add_name(text: str, start: int, end: int, hits: list[_Hit], weak: bool) -> None:
    """Add a name after trimming non-name words (labels, section words) off its ends.

    A weak candidate holding any such word is dropped instead: "PA Chest Radiograph" is no name.
    """
    words = text[start:end].translate(_ASCII_LOWER).replace(".", " ").replace(",", " ").split()
    if (_STOP.isdisjoint(words) and EPONYMS.isdisjoint(words)) or (not weak and _INITIALS.fullmatch(text, start, end)):
        hits.append((start, end, "NAME", weak))  # the common case: nothing to trim
        return
    kept: list[tuple[int, int]] = []
    for w in _WORD.finditer(text, start, end):
        word = w.group().rstrip(".")
        if word.lower() in _STOP and not (len(word) == 1 and word.isupper()):  # "A" may be an initial
            if weak:
                return
            if kept:
                break  # a stop word ends the name
            continue  # leading stop words are skipped
        if kept and _is_eponym(text, w.start(), w.end()):
            break  # "Dr. Ann Lee Bosniak IIF cyst": the next sentence's eponym
        kept.append(w.span())
    if any(e - s > 2 or text[e - 1] != "." for s, e in kept):  # more than initials
        hits.append((kept[0][0], kept[-1][1], "NAME", weak))


def _is_eponym(text: str, start: int, end: int) -> bool:
    """Whether a detected name holds a medical eponym used as one: "Baker cyst", "Hill-Sachs lesion"."""
    if EPONYMS.isdisjoint(text[start:end].lower().replace("-", " ").replace("'", " ").split()):
        return False
    for w in _WORD.finditer(text, start, end):
        first = _compound_start(text, w.start())
        last = max(w.end(), _COMPOUND.match(text, first).end())
        if not any(p in EPONYMS for p in text[first:last].lower().split("-")):
            continue
        if text[max(0, first - 3):first].lower() == "of " or _EPONYM_CONTEXT.match(text, last):
            return True
    return False


def _compound_start(text: str, pos: int) -> int:
    """Where the hyphenated compound holding the word at `pos` starts ("Sachs" -> "Hill-Sachs")."""
    for _ in range(3):  # bounded: compounds have few parts, and a scan must stay linear
        if pos < 2 or text[pos - 1] != "-" or not text[pos - 2].isalpha():
            break
        pos -= 1
        limit = max(0, pos - 30)
        while pos > limit and text[pos - 1].isalpha():
            pos -= 1
    return pos


def _merge(hits: list[_Hit]) -> list[Span]:
    """Union of overlapping detections; a merged span keeps the type of its first (longest, most specific) part."""
    merged: list[Span] = []
    for start, end, kind, _ in sorted(hits, key=lambda h: (h[0], -h[1], _PRIORITY[h[2]])):
        if merged and start < merged[-1].end:
            if end > merged[-1].end:
                merged[-1] = merged[-1]._replace(end=end)
        else:
            merged.append(Span(start, end, kind))
    return merged


@lru_cache(maxsize=1)
def _default() -> Deidentifier:
    return Deidentifier()


def deidentify(text: str | None) -> tuple[str, dict[str, int]]:
    """`Deidentifier().redact(text)` with a shared instance."""
    return _default().redact(text)
