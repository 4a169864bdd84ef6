"""The whole chain on one recipe (the embedded default unless told otherwise).

    python -m pipelines.demo [--recipe R] [--output DIR] [--set ...]

synthetic reports -> Ray Data preparation -> continual pre-training (Ray Train, DeepSpeed
ZeRO-3) -> QLoRA instruction tuning (Ray Train) -> generation on held-out reports and ROUGE-L,
tuned vs untuned -> a Ray Serve deployment answering the official openai client -> report.md
and report.json in the output directory, and a summary on the terminal.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import psutil

from pipelines.cli import main_wrapper, parse_recipe, recipe_parser
from pipelines.config import Recipe
from pipelines.raycluster import init_ray

ADAPTER_ID = "impressions"


class MemoryWatch:
    """Peak memory in use on the machine above what was in use when the run started."""

    def __init__(self, every: float = 0.5):
        self.baseline = psutil.virtual_memory().used
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            self.peak = max(self.peak, psutil.virtual_memory().used)

    def stop(self) -> float:
        self._stop.set()
        return (self.peak - self.baseline) / 2**30


def ask_server(recipe: Recipe, base: Path, adapter: Path, example: dict) -> dict:
    """Deploy the Serve app, ask it for one impression through the openai client, shut it down."""
    from openai import OpenAI
    from ray import serve

    from pipelines.prompts import impression_messages
    from serve.app import app

    s = recipe.serve
    serve.start(http_options={"host": s.host, "port": s.port})
    start = time.time()
    serve.run(app({"recipe": recipe.model_dump(mode="json"), "model": str(base),
                   "adapters": {ADAPTER_ID: str(adapter)}}), name="medray", route_prefix="/")
    cold = time.time() - start
    try:
        client = OpenAI(base_url=f"http://{s.host}:{s.port}/v1", api_key="unused")
        reply = client.chat.completions.create(
            model=ADAPTER_ID, messages=impression_messages(example["findings"], example["exam_code"]),
            max_tokens=recipe.evaluation.max_new_tokens, temperature=0.0)
        models = [m.id for m in client.models.list().data]
    finally:
        serve.shutdown()
    return {"cold_start_s": round(cold, 1), "models": models, "request_id": example["id"],
            "answer": reply.choices[0].message.content, "finish_reason": reply.choices[0].finish_reason,
            "completion_tokens": reply.usage.completion_tokens, "reference": example["impression"]}


def final_metrics(stage_dir: Path) -> dict:
    path = stage_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    evals = [r["eval_loss"] for r in rows if r.get("eval_loss") is not None]
    return {"steps": rows[-1]["step"], "final_loss": rows[-1]["loss"], "first_loss": rows[0]["loss"],
            "eval_loss": evals[-1] if evals else None,
            "tokens_per_s_per_worker": rows[-1].get("tokens_per_s_per_worker")}


def run_demo(recipe: Recipe, output: str | Path | None = None) -> dict:
    from pipelines.evaluate import evaluate, load_test_records
    from pipelines.prepare import prepare
    from pipelines.train import train

    out = Path(output or recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    watch = MemoryWatch()
    timings: dict[str, float] = {}
    t0 = time.time()
    init_ray()

    def timed(name, fn, *args, **kwargs):
        start = time.time()
        value = fn(*args, **kwargs)
        timings[name] = round(time.time() - start, 1)
        print(f"== {name} done in {timings[name]:.0f} s", flush=True)
        return value

    manifest = timed("prepare", prepare, recipe, output=out / "data")
    models = timed("train", train, recipe, out / "data", out / "train")
    untuned = models.get("pretrain") or Path(manifest["base_model"])
    tuned = models["finetune"]
    report = timed("evaluate", evaluate, recipe, [f"untuned={untuned}", f"tuned={tuned}"], out / "data", out / "eval")
    example = load_test_records(out / "data", 1)[0]
    served = timed("serve", ask_server, recipe, untuned, tuned, example)
    timings["total"] = round(time.time() - t0, 1)
    rows = {r["model"]: r for r in report["generation"]}
    summary = {
        "recipe": recipe.name,
        "data": {k: manifest[k] for k in ("rows_read", "rows_kept", "rows_rejected", "rejects_by_reason",
                                          "splits", "phi_replacements", "packed")},
        "training": {stage: final_metrics(out / "train" / stage) for stage in models},
        "rouge_l": {name: round(row["rouge_l"], 4) for name, row in rows.items()},
        "rouge_l_margin": round(rows["tuned"]["rouge_l"] - rows["untuned"]["rouge_l"], 4),
        "serve": served,
        "seconds": timings,
        "peak_memory_gib": round(watch.stop(), 2),
    }
    (out / "report.json").write_text(json.dumps(summary, indent=2))
    (out / "report.md").write_text(render(summary))
    return summary


def render(s: dict) -> str:
    d = s["data"]
    lines = [f"# MedRay demo: recipe `{s['recipe']}`", "",
             "## Data", f"- rows read {d['rows_read']}, kept {d['rows_kept']}, rejected {d['rows_rejected']} "
             f"{d['rejects_by_reason']}", f"- splits {d['splits']}", f"- PHI replaced {d['phi_replacements']}"]
    for name, p in d["packed"].items():
        lines.append(f"- {name}: {p['examples']} examples in {p['rows']} rows, packing efficiency {p['efficiency']}")
    lines += ["", "## Training", "| stage | steps | first loss | final loss | eval loss | tokens/s/worker |",
              "|---|---|---|---|---|---|"]
    for stage, m in s["training"].items():
        lines.append(f"| {stage} | {m.get('steps')} | {m.get('first_loss', 0):.3f} | {m.get('final_loss', 0):.3f} "
                     f"| {m.get('eval_loss') or float('nan'):.3f} | {m.get('tokens_per_s_per_worker')} |")
    lines += ["", "## Held-out impressions (ROUGE-L)", "| model | ROUGE-L |", "|---|---|"]
    lines += [f"| {name} | {value:.4f} |" for name, value in s["rouge_l"].items()]
    lines += ["", f"Tuned minus untuned: **{s['rouge_l_margin']:+.4f}**", "",
              "## Serving", f"- Ray Serve cold start {s['serve']['cold_start_s']} s; models {s['serve']['models']}",
              f"- answer to `{s['serve']['request_id']}`: {s['serve']['answer']!r}",
              f"- reference: {s['serve']['reference']!r}", "",
              "## Cost", f"- wall time per step (s): {s['seconds']}", f"- peak memory above idle: "
              f"{s['peak_memory_gib']} GiB"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = recipe_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    recipe = parse_recipe(args)
    init_ray(args.address)
    summary = run_demo(recipe, args.output)
    out = Path(args.output or recipe.output_dir)
    print()
    print(render(summary))
    print(f"report: {out / 'report.md'}")
    return 0


run = main_wrapper(main)

if __name__ == "__main__":
    run()
