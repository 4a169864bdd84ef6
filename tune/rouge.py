"""ROUGE-L of a trial's model on a few held-out reports (the eval split, never the test split):
the optional sweep metric for what the model writes rather than how well it predicts tokens."""

from __future__ import annotations

from pathlib import Path

from pipelines.cli import UserError
from pipelines.config import Recipe


def held_out_examples(data_dir: Path, limit: int) -> list[dict]:
    """The first `limit` eval-split records by id (findings, exam code, reference impression)."""
    import pyarrow.dataset as pads

    folder = Path(data_dir) / "records" / "split=eval"
    if not folder.is_dir():
        raise UserError(f"tune.metric=rouge_l: no trial would report it, {data_dir} has no held-out records "
                        "(records/split=eval); prepare with data.splits.eval > 0")
    rows = pads.dataset(str(folder), format="parquet").to_table(
        columns=["id", "findings", "exam_code", "impression"]).to_pylist()
    if not rows:
        raise UserError(f"tune.metric=rouge_l: the eval split of {data_dir} is empty")
    return sorted(rows, key=lambda r: str(r["id"]))[:limit]


def trial_rouge_l(recipe: Recipe, data_dir: Path, model_dir: Path) -> float:
    """Mean ROUGE-L F1 of greedy impressions written by the trial's model (or adapter)."""
    from statistics import mean

    from pipelines.generation import Sampling, generate
    from pipelines.metrics import rouge_l
    from pipelines.models import adapter_base_path, load_for_inference, load_tokenizer
    from pipelines.prompts import impression_messages, prompt_ids, stop_token_ids

    rows = held_out_examples(data_dir, recipe.tune.rouge_examples)
    adapter = (model_dir / "adapter_config.json").is_file()
    base = adapter_base_path(model_dir) if adapter else model_dir
    tokenizer = load_tokenizer(model_dir, recipe.model.chat_format)
    model = load_for_inference(base, recipe.model, adapter_path=model_dir if adapter else None,
                               quantization=recipe.quantization if recipe.method == "qlora" else None)
    prompts = [prompt_ids(tokenizer, impression_messages(r["findings"], r["exam_code"])) for r in rows]
    settings = [Sampling(max_new_tokens=recipe.evaluation.max_new_tokens,
                         stop_token_ids=stop_token_ids(tokenizer, recipe.model.chat_format))] * len(prompts)
    predictions = [g.text for g in generate(model, tokenizer, prompts, settings)]
    return mean(rouge_l(predictions, [r["impression"] for r in rows]))
