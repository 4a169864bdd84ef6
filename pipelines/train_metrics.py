"""What a run reports while it trains: metrics.jsonl and a compact line on the terminal.

Figures are gathered from every rank at a logged step (one small collective), so the loss is
the mean over workers, throughput is per worker and in total, and `data_digest` fingerprints
every micro-batch consumed by every rank so far: two runs that trained on the same examples in
the same order log the same digests.
"""

from __future__ import annotations

import hashlib
import json
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from pipelines.train_data import Position


def peak_memory_mb() -> dict[str, float]:
    figures = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        figures["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return figures


def say(line: str) -> None:
    """One line to the driver's terminal. Not print(): Ray Train patches it into a logger that also
    echoes to stdout, and the driver would show every line twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def gather(value: dict) -> list[dict]:
    if not torch.distributed.is_initialized():
        return [value]
    values: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


class RunLog:
    def __init__(self, path: str | Path, stage_name: str, total_steps: int, rank: int, flops_per_token: float,
                 peak_flops_per_device: float):
        self.path, self.stage_name, self.total_steps, self.rank = Path(path), stage_name, total_steps, rank
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops_per_device
        self._since, self._tokens = time.perf_counter(), 0

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent in here (evaluation, checkpoints) does not count against throughput."""
        start = time.perf_counter()
        yield
        self._since += time.perf_counter() - start

    def rewind(self, step: int, position: Position) -> None:
        """After a resume: forget the lines of the steps about to be redone, restart the clock."""
        self._since, self._tokens = time.perf_counter(), position.tokens
        if self.rank != 0 or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def measure(self, step: int, loss: float, grad_norm: float | None, lr: float, position: Position) -> dict:
        """Collective: this step's figures over every rank, throughput since the last call."""
        now = time.perf_counter()
        local = {"loss": loss, "tokens_per_s": (position.tokens - self._tokens) / max(now - self._since, 1e-9),
                 "examples": position.examples, "digest": position.digest, **peak_memory_mb()}
        self._since, self._tokens = now, position.tokens
        ranks = gather(local)
        per_worker = sum(r["tokens_per_s"] for r in ranks) / len(ranks)
        metrics = {
            "step": step, "loss": sum(r["loss"] for r in ranks) / len(ranks), "lr": lr, "grad_norm": grad_norm,
            "tokens_per_s_per_worker": round(per_worker, 1), "tokens_per_s": round(per_worker * len(ranks), 1),
            "mfu": per_worker * self.flops_per_token / self.peak_flops, "epoch": position.epoch,
            "examples_seen": sum(r["examples"] for r in ranks),
            "data_digest": hashlib.blake2b("".join(r["digest"] for r in ranks).encode(), digest_size=8).hexdigest(),
        }
        for key in local.keys() & {"peak_rss_mb", "peak_gpu_mb"}:
            metrics[key] = max(r[key] for r in ranks)
        return metrics

    def write(self, metrics: dict) -> None:
        if self.rank != 0:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"stage": self.stage_name, **metrics}) + "\n")
        say(self.line(metrics))

    def line(self, m: dict) -> str:
        parts = [f"[{self.stage_name}] step {m['step']}/{self.total_steps}", f"loss {m['loss']:.4f}"]
        if "lr" in m:
            parts += [f"lr {m['lr']:.2e}", f"grad norm {m['grad_norm'] or float('nan'):.3f}",
                      f"{m['tokens_per_s_per_worker']:.0f} tok/s/worker", f"MFU {100 * m['mfu']:.2f}%",
                      f"RSS {m['peak_rss_mb']:.0f} MB"]
        if m.get("eval_loss") is not None:
            parts.append(f"eval loss {m['eval_loss']:.4f}")
        return "  ".join(parts)
