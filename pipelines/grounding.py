"""Flag impression statements that assert something the findings do not mention.

The studies explain low judge scores partly by "added conclusions" (hallucinations). This module
gives a cheap, explainable proxy for that: every statement of a generated impression is reduced
to its clinical content words, and a statement is flagged when one of those words (after
stemming) is not asserted anywhere in the findings.

Method
1. Split the impression into statements: list numbering ("1.", "2)") and sentence ends.
2. Inside a statement, find negated words with a small NegEx-style rule set:
   - forward triggers ("no", "without", "free of", "absence of", "negative for") negate every word
     after them up to a clause terminator ("but", "however", "although", ";");
   - normality words ("normal", "clear", "unremarkable", "not", "negative", "resolved", ...)
     negate their own comma-delimited segment, before and after them ("lungs are clear").
3. Content words = non-negated words of 3+ letters that are not in the stop list (function words,
   report boilerplate, hedges, severity, time and location words), Porter-stemmed.
4. A term is supported when a non-negated findings word has the same stem, one stem is a prefix
   of the other (calcified / calcification), or a listed equivalent does (cardiomegaly /
   enlarged). A term that the findings only mention negated is reported as contradicted.
5. A statement is flagged when the share of its supported terms is below `min_support`
   (default 1.0: any unsupported term flags it). Statements with no positive content
   ("No acute cardiopulmonary process.") are never flagged.

Limits (read before trusting the number)
- Lexical only: a legitimate synthesis ("COPD" from "hyperexpanded lungs", "pneumonia" from
  "airspace opacity") is flagged unless an equivalence is listed; paraphrases outside the small
  equivalence table are flagged too. Treat the rate as an upper bound and compare models
  against each other and against the reference impressions, not against zero.
- Location and laterality words are ignored, so "left" for "right" is NOT caught.
- Normal statements are not checked against the findings ("Heart size is normal" passes even if
  the findings describe cardiomegaly).
- Negation scope is heuristic (no parser); double negatives and "cannot exclude" are not modelled.
- English radiology prose only; de-identification tokens (XXXX) are ignored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from nltk.stem.porter import PorterStemmer

FORWARD_NEGATIONS = ("no", "without", "free of", "absence of", "negative for")
SEGMENT_NEGATIONS = frozenset(
    "not normal normally unremarkable clear clearing negative resolved resolution absent "
    "removed intact".split()
)
CLAUSE_TERMINATORS = re.compile(r"\b(?:but|however|although|though|except|apart from)\b|;")

STOP_WORDS = frozenset(
    # function words
    "the and for with from into onto over under within per via also both either each other "
    "some any all may might can could should would will are was were been being has have had "
    "there this that these those which who its their than then what where when while does did "
    "is be as at of in on to by or an a it upon about after before along across between due "
    "most more less above below given including include "
    # report boilerplate, workflow words and de-identification tokens
    "xxxx impression finding study exam examination image imaging view radiograph radiographic "
    "radiographically chest xray ray film decubitus comparison compared prior previous again "
    "seen noted identified demonstrated visualized visualization present show appear "
    "appearance evidence suggest suggestive consistent compatible likely unlikely possible "
    "possibly probable probably suspicious concerning concern represent question questionable "
    "consider considered differential diagnosis cannot exclude excluded versus otherwise "
    "overall grossly further evaluation recommend follow followup clinical clinically "
    "correlation correlate history known patient result secondary available document "
    "described indicate help specific characterize characterization critical notification "
    "notified continue cardiopulmonary process abnormality abnormal disease "
    # hedges, severity, time
    "acute active chronic stable unchanged change interval new redemonstrated persistent "
    "status post mild mildly moderate moderately severe severely small large minimal "
    "minimally slight slightly trace tiny subtle significant definite definitely focal "
    "diffuse patchy scattered multiple several few single well limited low "
    "measuring measures size sized level type "
    # location and laterality
    "right left bilateral bilaterally bibasilar upper lower middle mid lobe base basilar basal "
    "apex apices apical lung pulmonary side sided region zone hemithorax anterior posterior "
    "lateral medial superior inferior central peripheral proximal distal portion aspect "
    "segmental subsegmental".split()
)

# Word pairs that express one finding in two ways; both directions count as support.
EQUIVALENTS = (
    ("cardiomegaly", "enlarged"),  # "enlargement" has the same stem
    ("atelectasis", "atelectatic"),
    ("pneumothorax", "pneumothoraces"),
    ("opacity", "opacification"),
    ("opacity", "density"),
    ("hyperinflation", "hyperexpanded"),
    ("hyperinflation", "hyperexpansion"),
    ("consolidation", "airspace"),
    ("spondylosis", "osteophytes"),
)

_STEMMER = PorterStemmer()
_NUMBERING = re.compile(r"(?:(?<=\s)|^)\(?\d{1,2}[.)](?=\s|[A-Za-z])")
_SENTENCE_END = re.compile(r"[.!?](?:\s+|$)|\n+")
_WORD = re.compile(r"[a-z]+")
_FORWARD = re.compile(r"\b(?:" + "|".join(FORWARD_NEGATIONS) + r")\b")
_FORWARD_MARK = "negfwd"  # stands in for a forward trigger (also multi-word ones)


@lru_cache(maxsize=65536)
def _stem(word: str) -> str:
    return _STEMMER.stem(word)


def _equivalents() -> dict[str, set[str]]:
    table: dict[str, set[str]] = {}
    for a, b in EQUIVALENTS:
        table.setdefault(_stem(a), set()).add(_stem(b))
        table.setdefault(_stem(b), set()).add(_stem(a))
    return table


_EQUIVALENT_STEMS = _equivalents()
# Compared on stems so that inflections ("changes", "suggested") are stopped too.
_STOP_STEMS = frozenset(_stem(w) for w in STOP_WORDS)


def split_statements(text: str) -> list[str]:
    """Split report text into statements at list numbering and sentence ends."""
    text = _NUMBERING.sub("\n", text or "")
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip(" .,;:-")]


def _words_with_negation(statement: str) -> list[tuple[str, bool]]:
    """Lower-cased words of a statement, each paired with whether it is negated."""
    out: list[tuple[str, bool]] = []
    for clause in CLAUSE_TERMINATORS.split(statement.lower()):
        clause = _FORWARD.sub(f" {_FORWARD_MARK} ", clause)
        negate_rest = False
        for segment in clause.split(","):
            words = _WORD.findall(segment)
            segment_negated = any(w in SEGMENT_NEGATIONS for w in words)
            for word in words:
                if word == _FORWARD_MARK:
                    negate_rest = True
                    continue
                out.append((word, negate_rest or segment_negated))
    return out


def _content_stems(words: Iterable[tuple[str, bool]], negated: bool) -> set[str]:
    stems = (_stem(w) for w, neg in words if neg == negated and len(w) >= 3)
    return {s for s in stems if s not in _STOP_STEMS}


def positive_terms(text: str) -> set[str]:
    """Stems of the clinical content words that `text` asserts (not negated, not stop words)."""
    return {t for s in split_statements(text) for t in _content_stems(_words_with_negation(s), False)}


def _supported(term: str, stems: set[str]) -> bool:
    if term in stems or _EQUIVALENT_STEMS.get(term, set()) & stems:
        return True
    return any(
        min(len(term), len(s)) >= 4 and (s.startswith(term) or term.startswith(s)) for s in stems
    )


@dataclass(frozen=True)
class StatementCheck:
    text: str
    terms: tuple[str, ...]  # stems the statement asserts
    unsupported: tuple[str, ...]  # stems with no positive mention in the findings
    contradicted: tuple[str, ...]  # subset of `unsupported` that the findings mention negated
    flagged: bool


@dataclass(frozen=True)
class GroundingCheck:
    statements: tuple[StatementCheck, ...]

    @property
    def n_flagged(self) -> int:
        return sum(s.flagged for s in self.statements)

    @property
    def flagged(self) -> bool:
        return self.n_flagged > 0

    @property
    def rate(self) -> float:
        return self.n_flagged / len(self.statements) if self.statements else 0.0


def check_grounding(findings: str, impression: str, min_support: float = 1.0) -> GroundingCheck:
    """Check every statement of `impression` against `findings` (see the module docstring)."""
    finding_words = [wn for s in split_statements(findings) for wn in _words_with_negation(s)]
    asserted = {_stem(w) for w, neg in finding_words if not neg}
    denied = {_stem(w) for w, neg in finding_words if neg}
    checks = []
    for statement in split_statements(impression):
        terms = sorted(_content_stems(_words_with_negation(statement), negated=False))
        unsupported = [t for t in terms if not _supported(t, asserted)]
        contradicted = [t for t in unsupported if _supported(t, denied)]
        support = 1 - len(unsupported) / len(terms) if terms else 1.0
        checks.append(
            StatementCheck(statement, tuple(terms), tuple(unsupported), tuple(contradicted),
                           flagged=support < min_support)
        )
    return GroundingCheck(tuple(checks))


def ungrounded_rate(checks: Sequence[GroundingCheck]) -> dict[str, float | int]:
    """Corpus totals: share of examples with a flagged statement and share of flagged statements."""
    n_statements = sum(len(c.statements) for c in checks)
    n_flagged_statements = sum(c.n_flagged for c in checks)
    n_flagged_examples = sum(c.flagged for c in checks)
    return {
        "examples": len(checks),
        "examples_flagged": n_flagged_examples,
        "example_rate": n_flagged_examples / len(checks) if checks else 0.0,
        "statements": n_statements,
        "statements_flagged": n_flagged_statements,
        "statement_rate": n_flagged_statements / n_statements if n_statements else 0.0,
    }
