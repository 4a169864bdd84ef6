"""PNG plots for the evaluation report (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed); shared with tune/plots.py."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path, dpi: int = 110) -> None:
    """Lay out, write and free a figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def _grouped_bars(ax, groups: list[str], series: dict[str, list[float | None]],
                  errors: dict[str, list[tuple[float, float] | None]] | None = None) -> None:
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(groups))
    for k, (label, values) in enumerate(series.items()):
        heights = [v if v is not None else 0.0 for v in values]
        yerr = None
        if errors and errors.get(label):
            yerr = np.array([[h - e[0], e[1] - h] if e else [0, 0] for h, e in zip(heights, errors[label])]).T
        ax.bar(x + (k - (len(series) - 1) / 2) * width, heights, width, label=label, yerr=yerr, capsize=2)
    ax.set_xticks(x, groups, rotation=20, ha="right", fontsize=8)
    ax.legend(fontsize=7)


def _generation(report: dict, path: Path) -> bool:
    rows = report.get("generation") or []
    if not rows:
        return False
    plt = pyplot()
    judge = {r["model"]: r for r in (report.get("judge") or {}).get("rows", [])}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, subset in zip(axes, ("all", "abnormal")):
        values = [r if subset == "all" else r["abnormal"] for r in rows]
        series = {"ROUGE-L": [v["rouge_l"] for v in values], "BERTScore F1": [v["bertscore_f1"] for v in values]}
        if judge:
            key = "mean" if subset == "all" else "abnormal_mean"
            series["judge / 10"] = [(judge.get(r["model"], {}).get(key) or 0) / 10 for r in rows]
        _grouped_bars(ax, [r["model"] for r in rows], series)
        ax.set_title(f"{subset} references")
        ax.set_ylim(0, 1)
    save_png(fig, path)
    return True


def _preferred_mode(rows: list[dict]) -> str | None:
    modes = {r["mode"] for r in rows if r["accuracy"] is not None}
    return "loglik" if "loglik" in modes else next(iter(modes), None)


def _mcq(report: dict, path: Path) -> bool:
    """Accuracy per benchmark; each model in its log-likelihood mode when it has one (endpoints do not)."""
    mcq = report.get("mcq")
    names = {f["benchmark"] for f in mcq["files"]} if mcq else set()
    rows = [r for r in mcq["rows"] if r["benchmark"] in names] if mcq else []
    models = list(dict.fromkeys(r["model"] for r in rows))
    modes = {m: _preferred_mode([r for r in rows if r["model"] == m]) for m in models}
    cell = {(r["model"], r["benchmark"]): r for r in rows if r["mode"] == modes[r["model"]]}
    if not cell:
        return False
    benchmarks = sorted({b for _, b in cell})
    series = {f"{m} ({modes[m]})": [cell.get((m, b), {}).get("accuracy") for b in benchmarks] for m in models}
    errors = {f"{m} ({modes[m]})": [(cell[(m, b)]["ci_low"], cell[(m, b)]["ci_high"])
                                    if cell.get((m, b), {}).get("accuracy") is not None else None for b in benchmarks]
              for m in models}
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(benchmarks)), 4))
    _grouped_bars(ax, benchmarks, series, errors)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (95% CI)")
    save_png(fig, path)
    return True


def _forgetting(report: dict, path: Path) -> bool:
    f = report.get("forgetting")
    if not f or not (f["rows"] or f["checkpoints"]):
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    if f["checkpoints"]:
        mode = _preferred_mode([{"mode": c["mode"], "accuracy": c["general"]["accuracy"]} for c in f["checkpoints"]])
        points = [c for c in f["checkpoints"] if c["mode"] == mode]
        x = np.arange(len(points))
        ax.plot(x, [c["general"]["accuracy"] for c in points], marker="o", label="general")
        if any(c["medical"] for c in points):
            ax.plot(x, [(c["medical"] or {}).get("accuracy") for c in points], marker="s", label="medical")
        ax.set_xticks(x, [c["checkpoint"] for c in points], rotation=20, ha="right", fontsize=8)
        ax.legend(fontsize=7)
    else:
        mode = _preferred_mode(f["rows"])
        rows = [r for r in f["rows"] if r["mode"] == mode]
        _grouped_bars(ax, [r["model"] for r in rows], {f["benchmark"]: [r["accuracy"] for r in rows]},
                      {f["benchmark"]: [(r["ci_low"], r["ci_high"]) if r["accuracy"] is not None else None
                                        for r in rows]})
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"accuracy ({mode})")
    save_png(fig, path)
    return True


def _decontamination(report: dict, path: Path) -> bool:
    d = report.get("decontamination")
    if not d or not sum(d["similarity_histogram"]["counts"]):
        return False
    edges, counts = np.array(d["similarity_histogram"]["edges"]), d["similarity_histogram"]["counts"]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge")
    ax.axvline(d["threshold"], color="red", linestyle="--", label=f"threshold {d['threshold']}")
    ax.set_xlabel("best cosine similarity to a training text")
    ax.set_ylabel("evaluation items")
    ax.legend(fontsize=7)
    save_png(fig, path)
    return True


def draw_plots(report: dict, folder: Path) -> dict[str, str]:
    """name -> PNG path for every plot the report has data for."""
    folder.mkdir(parents=True, exist_ok=True)
    drawn = {}
    for name, draw in (("generation", _generation), ("mcq", _mcq), ("forgetting", _forgetting),
                       ("decontamination", _decontamination)):
        path = folder / f"{name}.png"
        if draw(report, path):
            drawn[name] = str(path)
    return drawn
