"""Checkpoints of a run in progress: the method's state, and where each rank stands.

Every rank writes its own files into the checkpoint it reports (Ray merges them into one
directory): the method's state (DeepSpeed's ZeRO shards, or the trainable weights and the
optimizer), plus `train_state.rank<R>.json` (step and data position) and `rng.rank<R>.pt` (the
random generators, so dropout after a resume draws what it would have drawn).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipelines.train_data import Position


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    position: Position = field(default_factory=Position)


def _state_file(directory: str, rank: int) -> Path:
    return Path(directory, f"train_state.rank{rank}.json")


def _rng_file(directory: str, rank: int) -> Path:
    return Path(directory, f"rng.rank{rank}.pt")


def save(directory: str, state: TrainState, method, rank: int) -> None:
    method.save_state(directory, rank)
    _state_file(directory, rank).write_text(json.dumps({"step": state.step, "position": state.position.to_dict()}))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, _rng_file(directory, rank))


def restore(directory: str, method, rank: int) -> TrainState:
    path = _state_file(directory, rank)
    if not path.is_file():
        raise RuntimeError(f"checkpoint {directory} holds no training state for rank {rank}: resume with the "
                           "number of workers that wrote it")
    method.load_state(directory)
    saved = json.loads(path.read_text())
    rng = torch.load(_rng_file(directory, rank), weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])
    return TrainState(step=saved["step"], position=Position(**saved["position"]))


def report_checkpoint(metrics: dict, state: TrainState, method, rank: int) -> None:
    """Collective: every rank saves what it owns, then reports; Ray keeps the merged directory."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        save(tmp, state, method, rank)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def report_final(metrics: dict, method, rank: int) -> None:
    """Collective: the trained model as a Hugging Face directory, written by rank 0."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        method.export(tmp, rank)
        has_files = any(Path(tmp).iterdir())
        ray.train.report({**metrics, "final": True},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp) if has_files else None)
