"""Evaluate models side by side and write one report.

    python -m pipelines.evaluate [--recipe R] [--model NAME=PATH_OR_ENDPOINT ...]
                                 [--predictions [NAME=]FILE ...] [--data DIR] [--tasks TASK ...]
                                 [--output DIR] [--set ...]

Tasks (default: the recipe's evaluation.tasks):
- generation: impressions for the held-out reports, ROUGE-L and BERTScore, all and abnormal
  references, next to two no-model baselines (the most frequent training impression as a
  constant, the first sentence of the findings);
- judge: an LLM grades each impression 0-10 over any OpenAI-compatible API
  (evaluation.judge.base_url / .model; the key from OPENAI_API_KEY);
- grounding: impressions stating terms the findings never mention;
- mcq: zero-shot multiple-choice benchmarks, log-likelihood and generative scoring;
- decontamination: benchmark items and held-out reports too similar to a training text;
- forgetting: a general benchmark across the models given (the first one is "before"), and
  across evaluation.forgetting_checkpoints.

`--predictions` (JSONL: id, prediction, reference[, findings]) scores impressions written
elsewhere without any model. Local models run on Ray Data actors, endpoints get concurrent
requests. A part that cannot run (judge down, missing benchmark file, empty test split) is
listed under "What is missing" in the report and the rest carries on.

Writes to DIR: report.json, report.md, report.html, plots/*.png, predictions.jsonl, mcq.jsonl,
decontamination.jsonl, judge_cache.jsonl.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import get_args

from pipelines import eval_benchmarks as bench
from pipelines import eval_impressions as impressions
from pipelines.cli import UserError, main_wrapper, parse_recipe, recipe_parser
from pipelines.config import EvaluationConfig, Recipe
from pipelines.eval_inputs import (
    Example, TrainingTexts, benchmark_files, checkpoint_specs, forgetting_benchmark, load_benchmark,
    load_prediction_files, load_test_records, most_frequent_impression, test_examples,
)
from pipelines.eval_report import Problems, write_report
from pipelines.metrics import is_normal_impression
from pipelines.model_under_test import Answers, Work, parse_model_spec, run_models
from pipelines.raycluster import init_ray

__all__ = ["TASKS", "evaluate", "load_test_records", "main"]

log = logging.getLogger("medray.evaluate")

# The recipe's schema holds the one list of task names.
TASKS = get_args(get_args(EvaluationConfig.model_fields["tasks"].annotation)[0])
BENCHMARK_TASKS = {"mcq", "forgetting", "decontamination"}


def _check_tasks(tasks: list[str]) -> list[str]:
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise UserError(f"--tasks {' '.join(unknown)}: unknown (known: {', '.join(TASKS)})")
    return list(dict.fromkeys(tasks))


def _check_names(names: list[str]) -> None:
    seen = set()
    for name in names:
        if name in seen or name.startswith("baseline:") or name == impressions.REFERENCE:
            raise UserError(f"model name {name!r} is used twice or is reserved; give each model its own NAME")
        seen.add(name)


# ----------------------------------------------------------------------------- inputs


def load_examples(recipe: Recipe, data_dir: Path | None, prediction_files: list[str],
                  problems: Problems) -> tuple[list[Example], dict[str, list[str]]]:
    """The reports to score, and the predictions the files give for them."""
    if prediction_files:
        return load_prediction_files(prediction_files)
    try:
        return test_examples(data_dir, recipe.evaluation.max_examples), {}
    except UserError as err:  # no held-out reports: the benchmark tasks can still run
        problems.add("generation", str(err))
        return [], {}


def load_benchmarks(ev: EvaluationConfig, tasks: list[str], problems: Problems) -> tuple[list, str | None, list]:
    """(every usable item, the general benchmark's name, per-file load summaries with their role)."""
    items, files = [], []
    wanted = benchmark_files(ev) if {"mcq", "decontamination"} & set(tasks) else []
    if {"mcq", "decontamination"} & set(tasks) and not wanted:
        problems.add("mcq", "no benchmark files: set evaluation.mcq_files (../shared/data/mcqa is not present)")
    general_file = forgetting_benchmark(ev) if {"forgetting", "decontamination"} & set(tasks) else None
    if "forgetting" in tasks and general_file is None:
        problems.add("forgetting", "no general benchmark: set evaluation.forgetting_file")
    roles = [(b, "mcq") for b in wanted]
    if general_file and general_file.name not in {b.name for b in wanted}:
        roles.append((general_file, "forgetting"))
    for b, role in roles:
        try:
            loaded_items, loaded = load_benchmark(b, ev.mcq_limit)
        except (OSError, UnicodeDecodeError) as err:
            problems.add(role, f"{b.name}: cannot read {b.path} ({err})")
            continue
        defects = {reason: n for reason, n in loaded.skipped.items() if reason != "has image"}  # excluded by design
        if defects:
            problems.add(role, f"{b.name}: skipped {sum(defects.values())} defective rows {defects}")
        if not loaded_items:
            problems.add(role, f"{b.name}: no usable questions in {b.path}")
            continue
        files.append({"benchmark": b.name, "role": role, "path": str(b.path), "splits": ",".join(b.splits or ()),
                      "kept": loaded.kept, "items": len(loaded_items), "skipped": dict(loaded.skipped)})
        items += loaded_items
    return items, general_file.name if general_file else None, files


def ask_models(recipe: Recipe, specs: list, checkpoints: list, reports: list[dict], questions: list,
               problems: Problems) -> dict[str, Answers]:
    """Models write impressions and answer questions; checkpoints answer questions only."""
    if questions and not specs:
        problems.add("mcq", "multiple-choice scoring needs a model (--model)")
    for spec in specs:
        if spec.kind == "endpoint" and questions and "loglik" in recipe.evaluation.mcq_modes:
            problems.add("mcq", f"{spec.name}: an endpoint gives no option log-likelihoods; scored generatively only")
    jobs = {s.name: (s, Work(reports, questions)) for s in specs if reports or questions}
    jobs.update({c.name: (c, Work([], questions)) for c in checkpoints})
    answers = run_models(recipe, jobs) if jobs else {}
    for name, answer in answers.items():
        if answer.failures:
            asked = len(jobs[name][1].reports) + len(jobs[name][1].questions)
            problems.add("models", f"{name}: {sum(answer.failures.values())} of {asked} answers missing "
                                   f"{dict(answer.failures)}")
    return answers


# ----------------------------------------------------------------------------- scoring


def score_impressions(recipe: Recipe, tasks: list[str], examples: list[Example], predictions: dict, out: Path,
                      problems: Problems, report: dict) -> dict:
    """Generation, judge and grounding sections; returns per-example scores keyed (name, index)."""
    ev = recipe.evaluation
    per_example: dict[tuple[str, int], dict] = defaultdict(dict)

    def merge(scores: dict) -> None:
        for key, values in scores.items():
            per_example[key].update(values)

    if "generation" in tasks:
        report["generation"], report["generation_setup"], scores = impressions.score_generation(
            predictions, examples, ev, problems)
        merge(scores)
    if "judge" in tasks:
        judged = predictions if ev.judge.include_baselines else {
            name: preds for name, preds in predictions.items() if not name.startswith("baseline:")}
        report["judge"], scores = impressions.run_judge(judged, examples, ev.judge,
                                                        ev.judge.cache or str(out / "judge_cache.jsonl"), problems)
        merge(scores)
        if report["judge"] and not ev.judge.cache:
            report["files"].append("judge_cache.jsonl")
    if "grounding" in tasks:
        report["grounding"], scores = impressions.run_grounding(predictions, examples, problems)
        merge(scores)
    with open(out / "predictions.jsonl", "w") as fh:
        for name, preds in predictions.items():
            for i, (example, pred) in enumerate(zip(examples, preds)):
                fh.write(json.dumps({"model": name, "id": example.id, "prediction": pred,
                                     "reference": example.reference, "normal": is_normal_impression(example.reference),
                                     **per_example.get((name, i), {})}) + "\n")
    report["files"].append("predictions.jsonl")
    return per_example


def score_benchmarks(recipe: Recipe, tasks: list[str], questions: list, general_name: str | None, files: list,
                     answers: dict[str, Answers], checkpoints: list[str], out: Path, report: dict) -> dict:
    """MCQ and forgetting sections from the models' answers; returns the graded items per model."""
    graded = {name: bench.grade(questions, answers[name].mcq, recipe.evaluation.mcq_exact_match)
              for name in answers if answers[name].mcq}
    accuracy = {name: bench.accuracy_rows(name, questions, rows) for name, rows in graded.items()}
    if graded:
        with open(out / "mcq.jsonl", "w") as fh:
            for model, rows in graded.items():
                fh.writelines(json.dumps({"model": model, **row}) + "\n" for row in rows)
        report["files"].append("mcq.jsonl")
    models = {name: rows for name, rows in accuracy.items() if name not in checkpoints}
    if "mcq" in tasks and models:
        report["mcq"] = {"files": [f for f in files if f["role"] == "mcq"],
                         "rows": [r for rows in models.values() for r in rows]}
    if "forgetting" in tasks and any(item.dataset == general_name for item in questions):
        report["forgetting"] = bench.forgetting_section(
            general_name, models, {name: accuracy[name] for name in checkpoints if name in accuracy})
    return {name: rows for name, rows in graded.items() if name not in checkpoints}


def decontaminate(ev: EvaluationConfig, data_dir: Path | None, items: list, examples: list[Example], graded: dict,
                  per_example: dict, out: Path, problems: Problems, report: dict) -> None:
    train = TrainingTexts(data_dir)
    if not train:
        problems.add("decontamination", f"no training records under {data_dir}/records/split=train")
        return
    entries = [(item.dataset, item.id, item.as_text()) for item in items]
    entries += [(bench.HELD_OUT_REPORTS, e.id, e.as_text()) for e in examples]
    if not entries:
        problems.add("decontamination", "nothing to check: no benchmark items and no held-out reports")
        return
    result = bench.find_flags(train, entries, ev)
    rouge = {row["model"]: [per_example.get((row["model"], i), {}).get("rouge_l") for i in range(len(examples))]
             for row in report["generation"]}
    report["decontamination"] = bench.decontamination_section(entries, result, len(train.ids), ev, graded, rouge)
    with open(out / "decontamination.jsonl", "w") as fh:
        for (benchmark, item_id, _), sim, index, hit in zip(entries, result.max_similarity,
                                                            result.nearest_train_index, result.flagged):
            fh.write(json.dumps({"benchmark": benchmark, "id": item_id, "max_similarity": round(sim, 4),
                                 "flagged": hit, "nearest_train_id": train.id_at(index)}) + "\n")
    report["files"].append("decontamination.jsonl")


# ----------------------------------------------------------------------------- the job


def evaluate(recipe: Recipe, models: list[str], data_dir: str | Path | None = None, output: str | Path | None = None,
             tasks: list[str] | None = None, predictions: list[str] | None = None) -> dict:
    """Evaluate `models` (NAME=PATH_OR_ENDPOINT) and/or prediction files; write and return the report."""
    ev = recipe.evaluation
    predictions = predictions or []
    # Prediction files come from elsewhere: training data is used only when named explicitly.
    data = Path(data_dir) if data_dir else (None if predictions else Path(recipe.output_dir) / "data")
    out = Path(output or Path(recipe.output_dir) / "eval")
    tasks = _check_tasks(tasks or ev.tasks)
    specs = [parse_model_spec(m) for m in models]
    if not specs and not predictions:
        raise UserError("nothing to evaluate: give --model NAME=PATH_OR_ENDPOINT or --predictions FILE")
    out.mkdir(parents=True, exist_ok=True)
    problems = Problems()
    report = {"recipe": recipe.name, "tasks": tasks, "output": str(out),
              "source": ", ".join(predictions) if predictions else str(data),
              "models": [{"name": s.name, "kind": s.kind, "location": s.public_location()} for s in specs],
              "examples": 0, "generation": [], "problems": problems.items, "files": []}

    # 1. What to ask: held-out reports, benchmark questions, checkpoints.
    impression_tasks = {"generation", "judge", "grounding"} & set(tasks)
    examples, given = (load_examples(recipe, data, predictions, problems)
                       if impression_tasks or "decontamination" in tasks else ([], {}))
    report["examples"] = len(examples)
    loaded, general_name, files = ([], None, [])
    if BENCHMARK_TASKS & set(tasks):
        loaded, general_name, files = load_benchmarks(ev, tasks, problems)
    answered = {f["benchmark"] for f in files if f["role"] == "mcq"} if "mcq" in tasks else set()
    answered |= {general_name} if "forgetting" in tasks else set()
    questions = [item for item in loaded if item.dataset in answered]
    checkpoints = []
    if "forgetting" in tasks and questions and ev.forgetting_checkpoints:
        checkpoints, skipped = checkpoint_specs(ev.forgetting_checkpoints)
        for message in skipped:
            problems.add("forgetting", message)
    _check_names([s.name for s in [*specs, *checkpoints]])
    writable = impression_tasks and examples and all(e.findings for e in examples)
    reports = [{"findings": e.findings, "exam_code": e.exam_code} for e in examples] if writable else []
    if specs and impression_tasks and examples and not reports:
        problems.add("generation", "the predictions file has no findings: the models cannot write impressions")

    # 2. Every model answers once (local models in one Ray Data pass).
    answers = ask_models(recipe, specs, checkpoints, reports, questions, problems)

    # 3. Scores and the report.
    per_example = {}
    if impression_tasks and examples:
        preds = {**impressions.baselines(examples, most_frequent_impression(data), problems), **given}
        preds.update({s.name: answers[s.name].impressions for s in specs
                      if reports and any(p is not None for p in answers[s.name].impressions)})
        per_example = score_impressions(recipe, tasks, examples, preds, out, problems, report)
    graded = score_benchmarks(recipe, tasks, questions, general_name, files, answers,
                              [c.name for c in checkpoints], out, report)
    if "decontamination" in tasks:
        decontaminate(ev, data, loaded, examples, graded, per_example, out, problems, report)
    write_report(report, out)
    if not any(report.get(task) for task in TASKS):
        raise UserError(f"nothing could be evaluated ({'; '.join(p['message'] for p in problems.items)}); "
                        f"see {out / 'report.md'}")
    return report


def print_summary(report: dict) -> None:
    judge = {r["model"]: r["mean"] for r in (report.get("judge") or {}).get("rows", [])}
    for row in report["generation"]:
        extra = f"  BERTScore F1 {row['bertscore_f1']:.4f}" if row["bertscore_f1"] is not None else ""
        extra += f"  judge {judge[row['model']]:.2f}" if judge.get(row["model"]) is not None else ""
        print(f"{row['model']:<40} ROUGE-L {row['rouge_l']:.4f}{extra}")
    for row in (report.get("mcq") or {}).get("rows", []):
        accuracy = "n/a" if row["accuracy"] is None else f"{row['accuracy']:.3f}"
        print(f"{row['model']:<24} {row['benchmark']:<28} {row['mode']:<10} accuracy {accuracy} (n={row['total']})")
    for problem in report["problems"]:
        print(f"missing: {problem['task']}: {problem['message']}")
    print(f"report: {Path(report['output']) / 'report.md'}")


def main(argv: list[str] | None = None) -> int:
    parser = recipe_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH_OR_ENDPOINT",
                        help="a model directory, a PEFT adapter directory or an OpenAI-compatible URL (repeatable)")
    parser.add_argument("--predictions", action="append", default=[], metavar="[NAME=]FILE",
                        help="JSONL with id, prediction, reference[, findings] to score without a model (repeatable)")
    parser.add_argument("--data", default=None, help="prepared data directory (default: <output_dir>/data)")
    parser.add_argument("--tasks", nargs="+", default=None,
                        help=f"any of: {', '.join(TASKS)} (default: the recipe's evaluation.tasks)")
    args = parser.parse_args(argv)
    recipe = parse_recipe(args)
    if args.address:
        init_ray(args.address)
    print_summary(evaluate(recipe, args.model, args.data, args.output, args.tasks, args.predictions))
    return 0


run = main_wrapper(main)

if __name__ == "__main__":
    run()
