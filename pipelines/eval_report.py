"""The evaluation report: report.json, report.md and report.html (one set of tables rendered
twice) with PNG plots, plus the list of problems that kept part of the job from running.

Tables follow the study's Table 1: one row per model (baselines included), ROUGE-L, BERTScore
P/R/F1 and the judge's 0-10 score, then the same on the abnormal subset.
"""

from __future__ import annotations

import html
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("medray.evaluate")

CONSTANT_BASELINE = "baseline: most frequent impression"


@dataclass
class Problems:
    """What could not be evaluated, and why: logged now, listed first in the report."""

    items: list[dict] = field(default_factory=list)

    def add(self, task: str, message: str) -> None:
        log.warning("%s: %s", task, message)
        self.items.append({"task": task, "message": message})


# ----------------------------------------------------------------------------- document model


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    path: str  # relative to the report
    alt: str


@dataclass
class Section:
    title: str
    blocks: list = field(default_factory=list)  # str paragraphs, Tables, Images


def num(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def with_ci(row: dict, digits: int = 3) -> str:
    if row.get("accuracy") is None:
        return "n/a"
    ci = f" [{row['ci_low']:.{digits}f}, {row['ci_high']:.{digits}f}]" if row.get("ci_low") is not None else ""
    return f"{row['accuracy']:.{digits}f}{ci}"


def _header(report: dict) -> Section:
    blocks = [f"Recipe `{report['recipe']}`; tasks: {', '.join(report['tasks'])}; examples from `{report['source']}`."]
    if report["models"]:
        blocks.append(Table(["model", "kind", "location"],
                            [[m["name"], m["kind"], m["location"]] for m in report["models"]]))
    return Section(f"Evaluation: {report['recipe']}", blocks)


def _problems(report: dict) -> list[Section]:
    if not report["problems"]:
        return []
    return [Section("What is missing", [Table(["task", "problem"],
                                              [[p["task"], p["message"]] for p in report["problems"]])])]


def _judge_by_model(report: dict) -> dict:
    return {r["model"]: r for r in (report.get("judge") or {}).get("rows", [])}


def _generation(report: dict) -> list[Section]:
    rows = report.get("generation") or []
    if not rows:
        return []
    setup, judge = report["generation_setup"], _judge_by_model(report)
    headers = ["model", "n", "ROUGE-L", "BERTScore P", "BERTScore R", "BERTScore F1", "judge (0-10)"]

    def line(name: str, n: int, m: dict, judge_mean) -> list[str]:
        return [name, str(n), num(m["rouge_l"]), num(m["bertscore_precision"]), num(m["bertscore_recall"]),
                num(m["bertscore_f1"]), num(judge_mean, 2)]

    def with_rouge_ci(r: dict) -> list[str]:
        low, high = r["rouge_l_ci"]
        return [*line(r["model"], r["n"], r, judge.get(r["model"], {}).get("mean")),
                "n/a" if low is None else f"[{low:.3f}, {high:.3f}]"]

    table = Table([*headers, "ROUGE-L 95% CI"], [with_rouge_ci(r) for r in rows])
    bert = setup["bertscore"]
    blocks = [table, f"ROUGE-L: {setup['rouge']}. "
              + (f"BERTScore: encoder `{bert['encoder']}`, layer {bert['num_layers']} of {bert['total_layers']}, "
                 f"no idf, no baseline rescaling (bert-score {bert['bert_score_version']}); compare BERTScore only "
                 "between rows scored with the same encoder and layer." if bert else "BERTScore: not computed.")
              + " Failed generations are counted as missing (n), not scored 0."]
    if any(r["missing"] for r in rows):
        blocks.append("Missing predictions: " + ", ".join(f"{r['model']} {r['missing']}" for r in rows if r["missing"]))
    abnormal = Table(headers, [line(r["model"], r["abnormal"]["n"], r["abnormal"],
                                    judge.get(r["model"], {}).get("abnormal_mean")) for r in rows])
    share = setup["abnormal"] / setup["examples"] if setup["examples"] else 0
    notes = [f"{setup['abnormal']} of {setup['examples']} references ({share:.0%}) state a finding; the others are "
             "normal studies. A constant answer can score well on ROUGE-L when normal studies dominate, so "
             "compare models on this subset too."]
    constant = next((r for r in rows if r["model"] == CONSTANT_BASELINE), None)
    if constant:
        losers = [r["model"] for r in rows if not r["model"].startswith("baseline:")
                  and r["rouge_l"] is not None and r["rouge_l"] <= constant["rouge_l"]]
        if losers:
            notes.append(f"Warning: not better than the constant answer on ROUGE-L: {', '.join(losers)}.")
    sections = [Section("Impressions (Table 1)", blocks), Section("Impressions: abnormal subset", [abnormal, *notes])]
    if "generation" in report.get("plots", {}):
        sections[0].blocks.append(Image(report["plots"]["generation"], "ROUGE-L, BERTScore F1 and judge/10 by model"))
    return sections


def _judge(report: dict) -> list[Section]:
    judge = report.get("judge")
    if not judge:
        return []
    s, usage = judge["summary"], judge["summary"]["usage"]
    table = Table(["model", "scored", "missing", "mean (0-10) [95% CI]", "abnormal mean"],
                  [[r["model"], str(r["n"]), str(r["missing"]),
                    f"{num(r['mean'], 2)}" + (f" [{r['ci_low']:.2f}, {r['ci_high']:.2f}]" if r["ci_low"] is not None
                                              else ""), num(r["abnormal_mean"], 2)] for r in judge["rows"]])
    price = s["pricing_usd_per_million"]
    return [Section("LLM judge", [
        f"Judge `{s['model']}` at {s['endpoint']}: {s['scored']} of {s['items']} judgments scored, {s['missing']} "
        f"missing{' ' + str(s['missing_reasons']) if s['missing_reasons'] else ''} (a missing judgment is left out "
        "of the mean, never counted as 0).",
        f"This run: {usage['calls']} calls, {usage['retries']} retries, {usage['cache_hits']} answers from the cache, "
        f"{usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion tokens, estimated cost "
        f"${s['cost_usd']:.4f} at ${price['input']}/M input and ${price['output']}/M output tokens.",
        table])]


def _grounding(report: dict) -> list[Section]:
    grounding = report.get("grounding")
    if not grounding:
        return []
    table = Table(["model", "impressions flagged", "rate", "statements flagged", "rate", "abnormal rate"],
                  [[r["model"], f"{r['examples_flagged']}/{r['examples']}", num(r["example_rate"], 3),
                    f"{r['statements_flagged']}/{r['statements']}", num(r["statement_rate"], 3),
                    num(r["abnormal_example_rate"], 3)] for r in grounding["rows"]])
    return [Section("Grounding in the findings", [
        table, "A statement is flagged when one of its clinical terms (stemmed, negations and boilerplate set "
        "aside) appears nowhere in the findings. Lexical only: paraphrases and legitimate syntheses are "
        "flagged too, laterality swaps are not caught; read the rate against the reference impressions' "
        "row, not against zero. Per-example flags and terms are in predictions.jsonl."])]


def _mcq(report: dict) -> list[Section]:
    mcq = report.get("mcq")
    if not mcq:
        return []
    files = Table(["benchmark", "file", "split", "items", "skipped"],
                  [[f["benchmark"], f["path"], f["splits"] or "all", str(f["items"]),
                    ", ".join(f"{k}: {v}" for k, v in f["skipped"].items()) or "0"] for f in mcq["files"]])
    rows = [r for r in mcq["rows"] if r["benchmark"] in {f["benchmark"] for f in mcq["files"]}]
    accuracy = Table(["model", "benchmark", "mode", "n", "accuracy [95% CI]", "missing"],
                     [[r["model"], r["benchmark"], r["mode"], str(r["total"]), with_ci(r), str(r["missing"])]
                      for r in rows])
    subjects = Table(["model", "benchmark", "subject", "mode", "n", "accuracy [95% CI]"],
                     [[r["model"], r["benchmark"], s, r["mode"], str(a["total"]), with_ci(a)]
                      for r in rows for s, a in r["subjects"].items()])
    blocks = [files, "Zero-shot. loglik: the option with the highest summed log-likelihood of its letter after "
              "the listed options (lm-evaluation-harness `acc`); generative: greedy answer, then option letter, "
              "else option text, else the closest option by Levenshtein distance. Wilson 95 % intervals.",
              accuracy]
    if "mcq" in report.get("plots", {}):
        blocks.append(Image(report["plots"]["mcq"], "accuracy per benchmark and model"))
    if subjects.rows:
        blocks += ["Per subject:", subjects]
    return [Section("Multiple-choice benchmarks", blocks)]


def _decontamination(report: dict) -> list[Section]:
    d = report.get("decontamination")
    if not d:
        return []
    blocks = [f"Encoder {d['encoder']}; {d['training_texts']} training texts; an item is flagged when its best "
              f"cosine similarity to any training text exceeds {d['threshold']}.",
              Table(["benchmark", "items", "flagged", "share"],
                    [[b, str(v["items"]), str(v["flagged"]), f"{v['flagged_share']:.1%}"]
                     for b, v in d["benchmarks"].items()])]
    if d["accuracy"]:
        blocks.append(Table(["model", "mode", "benchmark", "accuracy (all)", "accuracy (not flagged)",
                             "items not flagged"],
                            [[r["model"], r["mode"], r["benchmark"], num(r["accuracy"], 3), num(r["accuracy_clean"], 3),
                              str(r["items_clean"])] for r in d["accuracy"]]))
    if d["generation"]:
        blocks.append(Table(["model", "ROUGE-L (all)", "ROUGE-L (not flagged)", "reports not flagged"],
                            [[r["model"], num(r["rouge_l"]), num(r["rouge_l_clean"]), str(r["n_clean"])]
                             for r in d["generation"]]))
    if "decontamination" in report.get("plots", {}):
        blocks.append(Image(report["plots"]["decontamination"], "best similarity to the training data"))
    return [Section("Decontamination", blocks)]


def _forgetting(report: dict) -> list[Section]:
    f = report.get("forgetting")
    if not f:
        return []
    blocks = [f"General knowledge on `{f['benchmark']}`; the change is measured from the first model given "
              f"(`{f['reference_model']}`, taken as the model before tuning).",
              Table(["model", "mode", "n", "accuracy [95% CI]", "change"],
                    [[r["model"], r["mode"], str(r["total"]), with_ci(r),
                      "n/a" if r["delta"] is None else f"{r['delta']:+.3f}"] for r in f["rows"]])]
    if f["checkpoints"]:
        blocks.append(Table(["checkpoint", "mode", "general accuracy", "medical accuracy (pooled)"],
                            [[c["checkpoint"], c["mode"], with_ci(c["general"]),
                              with_ci(c["medical"]) if c["medical"] else "n/a"] for c in f["checkpoints"]]))
    if "forgetting" in report.get("plots", {}):
        blocks.append(Image(report["plots"]["forgetting"], "general accuracy by model or checkpoint"))
    return [Section("Forgetting of general knowledge", blocks)]


def _files(report: dict) -> Section:
    return Section("Files", [", ".join(f"`{name}`" for name in report["files"])])


def build_sections(report: dict) -> list[Section]:
    return [_header(report), *_problems(report), *_generation(report), *_judge(report), *_grounding(report),
            *_mcq(report), *_decontamination(report), *_forgetting(report), _files(report)]


# ----------------------------------------------------------------------------- rendering


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(sections: list[Section]) -> str:
    lines = []
    for depth, section in enumerate(sections):
        lines += [("# " if depth == 0 else "## ") + section.title, ""]
        for block in section.blocks:
            if isinstance(block, Table):
                lines.append("| " + " | ".join(block.headers) + " |")
                lines.append("|" + "---|" * len(block.headers))
                lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            elif isinstance(block, Image):
                lines.append(f"![{block.alt}]({block.path})")
            else:
                lines.append(block)
            lines.append("")
    return "\n".join(lines)


STYLE = ("body{font-family:sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem}"
         "table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.25rem .5rem}"
         "th{background:#f3f3f3}td:not(:first-child){text-align:right}img{max-width:100%}")


def render_html(sections: list[Section]) -> str:
    body = []
    for depth, section in enumerate(sections):
        tag = "h1" if depth == 0 else "h2"
        body.append(f"<{tag}>{html.escape(section.title)}</{tag}>")
        for block in section.blocks:
            if isinstance(block, Table):
                head = "".join(f"<th>{html.escape(h)}</th>" for h in block.headers)
                rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                               for row in block.rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif isinstance(block, Image):
                body.append(f'<p><img src="{html.escape(block.path)}" alt="{html.escape(block.alt)}"></p>')
            else:
                body.append(f"<p>{html.escape(block).replace('`', '')}</p>")
    title = html.escape(sections[0].title)
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title><style>{STYLE}</style>"
            f"</head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(report: dict, out: Path) -> None:
    """Plots first (the documents link them), then report.json, report.md and report.html."""
    from pipelines.eval_plots import draw_plots

    report["plots"] = draw_plots(report, out / "plots")
    report["plots"] = {name: str(Path(path).relative_to(out)) for name, path in report["plots"].items()}
    report["files"] = sorted(["report.json", "report.md", "report.html", *report["files"], *report["plots"].values()])
    (out / "report.json").write_text(json.dumps(report, indent=2))
    sections = build_sections(report)
    (out / "report.md").write_text(render_markdown(sections))
    (out / "report.html").write_text(render_html(sections))
