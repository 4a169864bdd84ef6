"""PNG plots of a sweep (matplotlib, Agg backend): the metric against the learning rate and the
LoRA rank, and every trial's eval loss during training. Trials stopped early are hollow."""

from __future__ import annotations

from pathlib import Path

from pipelines.eval_plots import pyplot, save_png


def _scatter(plt, rows: list[dict], best: dict | None, metric: str, x: str, path: Path, log_base: int) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    ranks = sorted({row["r"] for row in rows})
    colors = dict(zip(ranks, plt.cm.viridis([i / max(len(ranks) - 1, 1) for i in range(len(ranks))])))
    for row in rows:
        full = row["status"] == "completed"
        ax.scatter(row[x], row[metric], s=60 if row is best else 36, edgecolors=colors[row["r"]],
                   facecolors=colors[row["r"]] if full else "none", marker="*" if row is best else "o")
    for r in ranks:
        ax.scatter([], [], color=colors[r], label=f"r={r}")
    ax.set_xscale("log", base=log_base)
    ax.set_xlabel({"lr": "learning rate", "r": "LoRA rank"}[x])
    ax.set_ylabel(metric)
    ax.legend(fontsize=7, title="hollow: stopped early", title_fontsize=7)
    save_png(fig, path, dpi=100)


def _curves(plt, rows: list[dict], best: dict | None, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        steps, losses = zip(*row["curve"])
        ax.plot(steps, losses, marker=".", linewidth=2.5 if row is best else 1,
                label=f"{row['trial']} r={row['r']} lr={row['lr']:.2g}" + (" (best)" if row is best else ""))
    ax.set_xlabel("step")
    ax.set_ylabel("eval loss")
    ax.legend(fontsize=6)
    save_png(fig, path, dpi=100)


def draw_plots(rows: list[dict], best: dict | None, metric: str, out: Path) -> dict[str, Path]:
    """name -> PNG path, for the plots the trials have data for."""
    scored = [row for row in rows if row[metric] is not None]
    curved = [row for row in rows if row["curve"]]
    if not scored and not curved:
        return {}
    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    if scored:
        paths["metric_vs_lr"] = out / "metric_vs_lr.png"
        _scatter(plt, scored, best, metric, "lr", paths["metric_vs_lr"], 10)
        paths["metric_vs_rank"] = out / "metric_vs_rank.png"
        _scatter(plt, scored, best, metric, "r", paths["metric_vs_rank"], 2)
    if curved:
        paths["learning_curves"] = out / "learning_curves.png"
        _curves(plt, curved, best, paths["learning_curves"])
    return paths
