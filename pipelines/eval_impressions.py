"""Scores for generated impressions: ROUGE-L and BERTScore (all reports and the abnormal subset),
the LLM judge, and grounding in the findings.

`predictions` maps a model (or baseline) name to one prediction per example, None where the
model gave no answer (a failed request): such examples are counted as missing, never scored 0.
Each function returns report rows plus per-example scores keyed by (name, example index).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from statistics import mean

from pipelines.config import EvaluationConfig, JudgeConfig
from pipelines.eval_inputs import Example, first_sentence
from pipelines.eval_report import Problems
from pipelines.metrics import bertscore, describe_bertscore, is_normal_impression, rouge_l, summarize

BASELINE_MODE = "baseline: most frequent impression"
BASELINE_FIRST_SENTENCE = "baseline: first findings sentence"
REFERENCE = "reference impressions"
METRICS = ["rouge_l", "bertscore_precision", "bertscore_recall", "bertscore_f1"]

Predictions = dict[str, list[str | None]]
PerExample = dict[tuple[str, int], dict]


def baselines(examples: Sequence[Example], mode_impression: str | None, problems: Problems) -> dict[str, list[str]]:
    """The no-model answers every report carries: the training set's most frequent impression as a
    constant, and the first sentence of the findings."""
    out = {}
    if mode_impression is None:
        # Without training records the constant comes from the scored references themselves: an
        # optimistic constant, still the one a collapsed model would produce.
        mode_impression = Counter(e.reference for e in examples).most_common(1)[0][0]
        problems.add("generation", "no training records: the constant baseline is the most frequent "
                                   "REFERENCE impression (optimistic)")
    out[BASELINE_MODE] = [mode_impression] * len(examples)
    if all(e.findings for e in examples):
        out[BASELINE_FIRST_SENTENCE] = [first_sentence(e.findings) for e in examples]
    else:
        problems.add("generation", "no findings for some examples: the first-sentence baseline is left out")
    return out


def _means(per_example: PerExample, name: str, indices: list[int], keys: list[str]) -> dict:
    rows = [per_example[(name, i)] for i in indices]
    return {k: mean(r[k] for r in rows) if rows and k in rows[0] else None for k in keys}


def score_generation(predictions: Predictions, examples: Sequence[Example], ev: EvaluationConfig,
                     problems: Problems) -> tuple[list[dict], dict, PerExample]:
    """One row per name: means of ROUGE-L and BERTScore P/R/F1 overall and on abnormal references."""
    abnormal = [not is_normal_impression(e.reference) for e in examples]
    pairs = [(name, i) for name, preds in predictions.items() for i, p in enumerate(preds) if p is not None]
    preds = [predictions[name][i] for name, i in pairs]
    refs = [examples[i].reference for _, i in pairs]
    per_example: PerExample = {pair: {"rouge_l": score} for pair, score in zip(pairs, rouge_l(preds, refs))}
    setup = {"examples": len(examples), "abnormal": sum(abnormal),
             "rouge": "rouge-score ROUGE-L F-measure, Porter stemmer", "bertscore": None}
    try:
        encoder = describe_bertscore(ev.bertscore_model, ev.bertscore_layer)
        bert = bertscore(preds, refs, ev.bertscore_model, ev.bertscore_layer, batch_size=ev.batch_size * 4)
    except (ValueError, OSError) as err:  # no such encoder directory, or a layer it does not have
        problems.add("generation", f"BERTScore left out: {err}")
    else:
        setup["bertscore"] = encoder
        for pair, p, r, f in zip(pairs, bert["precision"], bert["recall"], bert["f1"]):
            per_example[pair].update(bertscore_precision=p, bertscore_recall=r, bertscore_f1=f)
    rows = []
    for name, model_preds in predictions.items():
        present = [i for i, p in enumerate(model_preds) if p is not None]
        present_abnormal = [i for i in present if abnormal[i]]
        rouge_ci = summarize([per_example[(name, i)]["rouge_l"] for i in present])
        rows.append({"model": name, "n": len(present), "missing": len(model_preds) - len(present),
                     **_means(per_example, name, present, METRICS),
                     "rouge_l_ci": [rouge_ci["ci_low"], rouge_ci["ci_high"]],
                     "abnormal": {"n": len(present_abnormal),
                                  **_means(per_example, name, present_abnormal, METRICS)}})
    return rows, setup, per_example


def run_judge(predictions: Predictions, examples: Sequence[Example], cfg: JudgeConfig, cache_path: str,
              problems: Problems) -> tuple[dict | None, PerExample]:
    """Every prediction graded 0-10 by the judge model; failed or unparseable answers are missing."""
    from pipelines.judge import JudgeItem, Pricing, judge_all_sync

    if not cfg.base_url:
        problems.add("judge", "no judge endpoint: set evaluation.judge.base_url (and OPENAI_API_KEY for a remote one)")
        return None, {}
    owners = [(name, i) for name, preds in predictions.items() for i, p in enumerate(preds) if p is not None]
    items = [JudgeItem(str(k), examples[i].reference, predictions[name][i]) for k, (name, i) in enumerate(owners)]
    try:
        result = judge_all_sync(items, base_url=cfg.base_url, model=cfg.model, concurrency=cfg.concurrency,
                                cache_path=cache_path, max_retries=cfg.max_retries, timeout=cfg.timeout_s,
                                pricing=Pricing(cfg.price_per_million_input, cfg.price_per_million_output))
    except RuntimeError as err:  # no API key for a remote endpoint
        problems.add("judge", str(err))
        return None, {}
    per_example: PerExample = {
        owner: {"judge_score": j.score, "judge_explanation": j.explanation, "judge_missing": j.missing_reason}
        for owner, j in zip(owners, result.judgments)}
    rows = []
    for name, preds in predictions.items():
        scores = [per_example[(name, i)]["judge_score"] for i in range(len(preds)) if (name, i) in per_example]
        abnormal = [per_example[(name, i)]["judge_score"] for i in range(len(preds))
                    if (name, i) in per_example and not is_normal_impression(examples[i].reference)]
        rows.append({"model": name, **summarize(scores), "abnormal_mean": summarize(abnormal)["mean"]})
    summary = result.summary()
    if summary["missing"]:
        problems.add("judge", f"{summary['missing']} of {summary['items']} judgments missing "
                              f"{summary['missing_reasons']}; means use the others")
    summary["pricing_usd_per_million"] = {"input": cfg.price_per_million_input, "output": cfg.price_per_million_output}
    return {"summary": summary, "rows": rows}, per_example


def run_grounding(predictions: Predictions, examples: Sequence[Example],
                  problems: Problems) -> tuple[dict | None, PerExample]:
    """Share of impressions (and statements) asserting terms the findings never mention; the
    reference impressions are scored too, as the floor a lexical check reaches on real text."""
    from pipelines.grounding import check_grounding, ungrounded_rate

    if not all(e.findings for e in examples):
        problems.add("grounding", "needs the findings of every example (add `findings` to the predictions file)")
        return None, {}
    named = {**predictions, REFERENCE: [e.reference for e in examples]}
    per_example: PerExample = {}
    rows = []
    for name, preds in named.items():
        checks = defaultdict(list)
        for i, pred in enumerate(preds):
            if pred is None:
                continue
            check = check_grounding(examples[i].findings, pred)
            checks["all"].append(check)
            if not is_normal_impression(examples[i].reference):
                checks["abnormal"].append(check)
            per_example[(name, i)] = {
                "grounding_flagged": check.flagged,
                "grounding_unsupported": sorted({t for s in check.statements for t in s.unsupported}),
                "grounding_contradicted": sorted({t for s in check.statements for t in s.contradicted})}
        rows.append({"model": name, **ungrounded_rate(checks["all"]),
                     "abnormal_example_rate": ungrounded_rate(checks["abnormal"])["example_rate"]
                     if checks["abnormal"] else None})
    return {"rows": rows}, per_example
