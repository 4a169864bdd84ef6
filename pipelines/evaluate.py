"""Evaluate models side by side on held-out reports and write one report.

    python -m pipelines.evaluate [--recipe R] --model NAME=PATH_OR_ENDPOINT ... [--data DIR]
                                 [--tasks generation] [--output DIR] [--set ...]

Generation runs on Ray Data (one model actor per local model) or as concurrent calls to an
OpenAI-compatible endpoint. Every report carries honest baselines: the most frequent training
impression as a constant answer, and the first sentence of the findings.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path
from statistics import mean

import pyarrow.dataset as pads

from pipelines.cli import UserError, main_wrapper, parse_recipe, recipe_parser
from pipelines.config import Recipe
from pipelines.model_under_test import LocalGenerator, ModelSpec, endpoint_generate, parse_model_spec
from pipelines.raycluster import init_ray

log = logging.getLogger("medray.evaluate")

TASKS = ["generation"]
TEST_COLUMNS = ["id", "exam_code", "findings", "impression"]


def load_test_records(data_dir: Path, limit: int | None) -> list[dict]:
    folder = data_dir / "records" / "split=test"
    if not folder.is_dir():
        raise UserError(f"data {data_dir}: no held-out test records (records/split=test); "
                        "prepare with data.splits.test > 0")
    rows = pads.dataset(str(folder), format="parquet").to_table(columns=TEST_COLUMNS).to_pylist()
    rows.sort(key=lambda r: r["id"])
    if not rows:
        raise UserError(f"data {data_dir}: the test split is empty")
    return rows[:limit] if limit else rows


def most_frequent_impression(data_dir: Path) -> str:
    table = pads.dataset(str(data_dir / "records" / "split=train"), format="parquet").to_table(columns=["impression"])
    return Counter(table.column("impression").to_pylist()).most_common(1)[0][0]


def first_sentence(text: str) -> str:
    return re.split(r"(?<=[.!?])\s+", text.strip(), maxsplit=1)[0]


def generate_predictions(spec: ModelSpec, recipe: Recipe, records: list[dict]) -> list[str]:
    from pipelines.prompts import impression_messages

    ev = recipe.evaluation
    if spec.kind == "endpoint":
        messages = [impression_messages(r["findings"], r["exam_code"]) for r in records]
        return endpoint_generate(spec, messages, ev.max_new_tokens)
    import ray.data

    ds = ray.data.from_items(records)
    ds = ds.map_batches(LocalGenerator, batch_size=ev.batch_size, batch_format="pandas",
                        fn_constructor_kwargs={"spec": spec, "model_cfg": recipe.model.model_dump(mode="json"),
                                               "max_new_tokens": ev.max_new_tokens},
                        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1)
    by_id = {row["id"]: row["prediction"] for row in ds.take_all()}
    return [by_id[r["id"]] for r in records]


def score_generation(name: str, predictions: list[str], records: list[dict]) -> dict:
    from pipelines.metrics import is_normal_impression, rouge_l

    refs = [r["impression"] for r in records]
    scores = rouge_l(predictions, refs)
    abnormal = [s for s, ref in zip(scores, refs) if not is_normal_impression(ref)]
    return {"model": name, "n": len(scores), "rouge_l": mean(scores),
            "rouge_l_abnormal": mean(abnormal) if abnormal else None, "n_abnormal": len(abnormal),
            "per_example": scores}


def evaluate(recipe: Recipe, models: list[str], data_dir: str | Path | None = None,
             output: str | Path | None = None, tasks: list[str] | None = None) -> dict:
    data_dir = Path(data_dir or Path(recipe.output_dir) / "data")
    out = Path(output or Path(recipe.output_dir) / "eval")
    specs = [parse_model_spec(m) for m in models]
    tasks = tasks or TASKS
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise UserError(f"--tasks {unknown}: unknown (known: {', '.join(TASKS)})")
    records = load_test_records(data_dir, recipe.evaluation.max_examples)
    out.mkdir(parents=True, exist_ok=True)
    init_ray()
    rows = []
    baselines = {"baseline: most frequent impression": [most_frequent_impression(data_dir)] * len(records),
                 "baseline: first findings sentence": [first_sentence(r["findings"]) for r in records]}
    predictions = dict(baselines)
    for spec in specs:
        log.info("generating with %s (%s)", spec.name, spec.kind)
        predictions[spec.name] = generate_predictions(spec, recipe, records)
    with open(out / "predictions.jsonl", "w") as fh:
        for name, preds in predictions.items():
            result = score_generation(name, preds, records)
            for rec, pred, score in zip(records, preds, result.pop("per_example")):
                fh.write(json.dumps({"model": name, "id": rec["id"], "prediction": pred,
                                     "reference": rec["impression"], "rouge_l": score}) + "\n")
            rows.append(result)
    report = {"recipe": recipe.name, "data": str(data_dir), "n_test": len(records), "generation": rows}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(render_markdown(report))
    return report


def render_markdown(report: dict) -> str:
    lines = [f"# Evaluation: {report['recipe']}", "",
             f"{report['n_test']} held-out test reports from `{report['data']}`.", "",
             "| model | ROUGE-L | ROUGE-L (abnormal) | n abnormal |", "|---|---|---|---|"]
    for row in report["generation"]:
        abn = f"{row['rouge_l_abnormal']:.4f}" if row["rouge_l_abnormal"] is not None else "n/a"
        lines.append(f"| {row['model']} | {row['rouge_l']:.4f} | {abn} | {row['n_abnormal']} |")
    lines += ["", "Baselines use no model: a constant answer scoring well on ROUGE-L means the test set is "
              "dominated by one (normal) impression; compare models on the abnormal column too."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = recipe_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, metavar="NAME=PATH_OR_ENDPOINT")
    parser.add_argument("--data", default=None, help="prepared data directory (default: <output_dir>/data)")
    parser.add_argument("--tasks", nargs="+", default=None, help=f"any of: {', '.join(TASKS)}")
    args = parser.parse_args(argv)
    recipe = parse_recipe(args)
    init_ray(args.address)
    report = evaluate(recipe, args.model, args.data, args.output, args.tasks)
    for row in report["generation"]:
        print(f"{row['model']:<40} ROUGE-L {row['rouge_l']:.4f}")
    return 0


run = main_wrapper(main)

if __name__ == "__main__":
    run()
