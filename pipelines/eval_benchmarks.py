"""Scores for multiple-choice benchmarks: accuracy per benchmark and subject (Wilson 95 % CI) in
each scoring mode, forgetting of general knowledge across models and checkpoints, and accuracy
with and without the items that look contaminated by the training data.

A model's answers per item come from `model_under_test.answer_mcq`: `loglik_pred` (the option
with the highest log-likelihood) and/or a free-text `output` graded here with the continual
study's extraction chain. A failed request is missing: it is counted, not graded as wrong.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict

import numpy as np

from pipelines.config import EvaluationConfig
from pipelines.decontam import Contamination, accuracy_with_without, find_contamination, load_encoder
from pipelines.mcq import MCQItem, accuracy_table, extract_answer, wilson_accuracy

log = logging.getLogger(__name__)

MODES = ("loglik", "generative")
HELD_OUT_REPORTS = "held-out reports"
HISTOGRAM_BINS = np.linspace(-0.2, 1.0, 25)  # best cosine similarities, for the report's plot


def grade(items: Sequence[MCQItem], answers: Sequence[dict], exact: bool) -> list[dict]:
    """Per item: the benchmark, the key, and per mode the prediction and whether it is right."""
    graded = []
    for item, answer in zip(items, answers):
        row = {"benchmark": item.dataset, "id": item.id, "subject": item.subject, "answer": item.answer}
        if "loglik_pred" in answer:
            row.update(loglik_pred=answer["loglik_pred"], loglik_correct=answer["loglik_pred"] == item.answer)
        if "output" in answer:
            if answer["output"] is None:
                row["generative_missing"] = True
            else:
                got = extract_answer(answer["output"], item.options, exact=exact)
                row.update(generative_output=answer["output"], generative_pred=got.letter,
                           generative_method=got.method, generative_correct=got.letter == item.answer)
        graded.append(row)
    return graded


def accuracy_rows(model: str, items: Sequence[MCQItem], graded: Sequence[dict]) -> list[dict]:
    """One row per benchmark and mode: accuracy with its interval, missing answers, per subject."""
    rows = []
    for mode in MODES:
        key = f"{mode}_correct"
        scored = [(item, g[key]) for item, g in zip(items, graded) if key in g]
        missing = Counter(item.dataset for item, g in zip(items, graded) if g.get(f"{mode}_missing"))
        table = accuracy_table([item for item, _ in scored], [ok for _, ok in scored]) if scored else {}
        for bench in sorted(table.keys() | missing.keys()):
            overall = asdict(table[bench]["overall"]) if bench in table else {
                "correct": 0, "total": 0, "accuracy": None, "ci_low": None, "ci_high": None}
            subjects = {s: asdict(a) for s, a in table[bench]["subjects"].items()} if bench in table else {}
            rows.append({"model": model, "benchmark": bench, "mode": mode, **overall, "missing": missing[bench],
                         "subjects": subjects})
    return rows


def _pooled(rows: Iterable[dict]) -> dict:
    rows = list(rows)
    correct, total = sum(r["correct"] for r in rows), sum(r["total"] for r in rows)
    return asdict(wilson_accuracy(correct, total)) if total else {"accuracy": None, "ci_low": None, "ci_high": None}


def forgetting_section(general: str, by_model: dict[str, list[dict]], by_checkpoint: dict[str, list[dict]]) -> dict:
    """General-benchmark accuracy per model with its change from the FIRST model (the one before
    tuning), and per checkpoint next to the pooled medical accuracy, as the continual study tracked."""
    rows, before = [], {}
    for model, acc_rows in by_model.items():
        for r in acc_rows:
            if r["benchmark"] != general:
                continue
            ref = before.setdefault(r["mode"], r["accuracy"])
            delta = r["accuracy"] - ref if r["accuracy"] is not None and ref is not None else None
            rows.append({"model": model, "mode": r["mode"], "accuracy": r["accuracy"], "ci_low": r["ci_low"],
                         "ci_high": r["ci_high"], "total": r["total"], "delta": delta})
    checkpoints = []
    for name, acc_rows in by_checkpoint.items():
        for mode in MODES:
            mine = [r for r in acc_rows if r["mode"] == mode]
            if not mine:
                continue
            medical = [r for r in mine if r["benchmark"] != general]
            checkpoints.append({"checkpoint": name, "mode": mode,
                                "general": _pooled(r for r in mine if r["benchmark"] == general),
                                "medical": _pooled(medical) if medical else None})
    return {"benchmark": general, "reference_model": next(iter(by_model), None), "rows": rows,
            "checkpoints": checkpoints}


def find_flags(train_texts: Iterable[str], entries: Sequence[tuple[str, str, str]],
               ev: EvaluationConfig) -> Contamination:
    """Best cosine similarity of each (benchmark, id, text) entry to any training text."""
    encoder = load_encoder(ev.decontamination_encoder)
    result = find_contamination(train_texts, [text for _, _, text in entries], encoder,
                                threshold=ev.decontamination_threshold)
    log.info("decontamination: %d eval items, %d flagged", len(entries), sum(result.flagged))
    return result


def decontamination_section(entries: Sequence[tuple[str, str, str]], result: Contamination, n_train: int,
                            ev: EvaluationConfig, graded_by_model: dict[str, list[dict]],
                            rouge_by_model: dict[str, list[float | None]]) -> dict:
    """Flagged share per benchmark; each model's accuracy (and ROUGE-L on held-out reports) on all
    items and on the items that were not flagged."""
    flagged = {(bench, item_id): hit for (bench, item_id, _), hit in zip(entries, result.flagged)}
    shares = accuracy_with_without([b for b, _, _ in entries], [False] * len(entries), result.flagged)
    benchmarks = {name: {k: v[k] for k in ("items", "flagged", "flagged_share")} for name, v in shares.items()}
    accuracy = []
    for model, graded in graded_by_model.items():
        for mode in MODES:
            key = f"{mode}_correct"
            mine = [g for g in graded if key in g and (g["benchmark"], g["id"]) in flagged]
            if not mine:
                continue
            table = accuracy_with_without([g["benchmark"] for g in mine], [g[key] for g in mine],
                                          [flagged[(g["benchmark"], g["id"])] for g in mine])
            accuracy += [{"model": model, "mode": mode, "benchmark": bench, **values}
                         for bench, values in table.items()]
    generation = []
    report_flags = [hit for (bench, _, _), hit in zip(entries, result.flagged) if bench == HELD_OUT_REPORTS]
    for model, scores in rouge_by_model.items() if report_flags else ():
        kept = [s for s in scores if s is not None]
        clean = [s for s, hit in zip(scores, report_flags) if s is not None and not hit]
        generation.append({"model": model, "rouge_l": sum(kept) / len(kept) if kept else None,
                           "rouge_l_clean": sum(clean) / len(clean) if clean else None, "n_clean": len(clean)})
    counts, edges = np.histogram(np.clip(result.max_similarity, -0.2, 1.0), bins=HISTOGRAM_BINS)
    return {"threshold": result.threshold, "encoder": ev.decontamination_encoder or "all-MiniLM-L6-v2 (bundled)",
            "training_texts": n_train, "benchmarks": benchmarks, "accuracy": accuracy, "generation": generation,
            "similarity_histogram": {"edges": edges.tolist(), "counts": counts.tolist()}}
