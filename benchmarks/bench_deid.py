"""De-identification benchmark: recall, false positives and throughput against the study's approach.

The baseline is what the radiology study did: one regular expression that finds names after a
title or a name label, and the sentence holding such a name is removed. Both run on the same
planted-PHI set (pipelines.phi_eval) and the same synthetic reports, in the same process, so the
throughput ratio holds however loaded the machine is.

    .venv/bin/python benchmarks/bench_deid.py [--reports 5000] [--planted 2000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from collections import Counter
from datetime import date
from pathlib import Path

from pipelines.deid import PHI_TYPES, Deidentifier, Span
from pipelines.phi_eval import measure, planted_phi_examples
from pipelines.synthetic import iter_reports
from provenance import git_commit

IU_XRAY = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "radiology" / "iu_xray_dev.jsonl"


class SentenceNameRegex:
    """The study's approach: a sentence holding a titled or labelled name is removed, as [NAME]."""

    _MARKER = re.compile(r"\b(?:Dr|Mr|Mrs|Ms|Patient|Name|Physician|Radiologist|signed by)\b\.?:?\s*[A-Z][a-z]+")

    def find_spans(self, text: str | None) -> list[Span]:
        spans: list[Span] = []
        for m in self._MARKER.finditer(text or ""):
            start = max(text.rfind(".", 0, m.start()), text.rfind("\n", 0, m.start())) + 1
            if spans and start < spans[-1].end:
                continue  # same sentence
            ends = [i for i in (text.find(".", m.end()), text.find("\n", m.end())) if i != -1]
            spans.append(Span(start, min(ends) if ends else len(text), "NAME"))
        return spans

    def redact(self, text: str | None) -> tuple[str, dict[str, int]]:
        pieces, pos = [], 0
        spans = self.find_spans(text)
        for span in spans:
            pieces += [text[pos:span.start], "[NAME]"]
            pos = span.end
        return "".join(pieces) + (text or "")[pos:], {"NAME": len(spans)}


def throughput(detector, texts: list[str], repeats: int = 3) -> tuple[float, float]:
    """Best-of-`repeats` (wall seconds, process CPU seconds) to redact every text once."""
    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        for text in texts:
            detector.redact(text)
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return best_wall, best_cpu


def real_report_spans(detector, rows: list[dict]) -> Counter:
    """Spans found in real, already de-identified reports, outside the collection's own XXXX marks."""
    found: Counter = Counter()
    for row in rows:
        for field in ("exam_type", "indication", "comparison", "findings", "impression"):
            text = row.get(field) or ""
            for span in detector.find_spans(text):
                if "XXXX" not in text[span.start:span.end]:
                    found[span.kind] += 1
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", type=int, default=5000, help="synthetic reports for the throughput run")
    parser.add_argument("--planted", type=int, default=2000, help="planted-PHI texts for recall/false positives")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    commit = git_commit()
    print(f"# bench_deid  {date.today()}  commit {commit}  Python {platform.python_version()}  "
          f"{platform.machine()}")

    ours, baseline = Deidentifier(), SentenceNameRegex()
    examples = planted_phi_examples(args.planted, seed=args.seed)
    scores = {name: measure(d, examples) for name, d in (("ours", ours), ("baseline", baseline))}
    print(f"\nPlanted-PHI set: {args.planted} texts, {scores['ours']['phi_spans']} PHI spans, "
          f"{scores['ours']['protected_spans']} clinical/eponym spans that must survive (seed {args.seed})")
    print(f"{'':28}{'ours':>10}{'baseline':>10}")
    for kind in PHI_TYPES:
        print(f"{'recall ' + kind:28}" + "".join(f"{s['recall_by_type'].get(kind, 0):10.3f}" for s in scores.values()))
    for key, label in (("recall", "recall, all types"), ("false_positive_rate", "false-positive rate"),
                       ("eponyms_preserved", "eponyms preserved")):
        print(f"{label:28}" + "".join(f"{s[key]:10.3f}" for s in scores.values()))

    texts = [r["text"] for r in iter_reports(args.reports, seed=args.seed)]
    megabytes = sum(len(t.encode()) for t in texts) / 1e6
    print(f"\nThroughput: {args.reports} synthetic reports ({megabytes:.2f} MB), one core, best of 3")
    rates = {}
    for name, detector in (("ours", ours), ("baseline", baseline)):
        wall, cpu = throughput(detector, texts)
        rates[name] = megabytes / wall
        print(f"  {name:9} {megabytes / wall:7.2f} MB/s  {args.reports / wall:8.0f} reports/s   "
              f"(CPU time: {megabytes / cpu:.2f} MB/s)")
    print(f"  ratio ours/baseline: {rates['ours'] / rates['baseline']:.3f}x")

    if IU_XRAY.is_file():
        rows = [json.loads(line) for line in IU_XRAY.open(encoding="utf-8")]
        print(f"\nReal reports ({len(rows)} IU X-ray, already de-identified): spans found outside XXXX marks")
        for name, detector in (("ours", ours), ("baseline", baseline)):
            print(f"  {name:9} {dict(real_report_spans(detector, rows)) or 'none'}")
    else:
        print(f"\n(real-report check skipped: {IU_XRAY} not found)")


if __name__ == "__main__":
    main()
