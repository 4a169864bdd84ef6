"""Where a ZeRO-3 step goes on two CPU processes, and which DeepSpeed settings help the tiny model.

Runs the project's own methods (`DeepSpeedMethod`, `DdpMethod`: what a Ray Train worker runs) in
two plain processes on gloo, without Ray, on the embedded tiny Llama with micro-batches of
4 x 512 packed rows: wall time of a step (best and median), CPU time (what a loaded machine
distorts least), and the collectives a step issues with the CPU time they take (torch profiler,
self time of the c10d ops). Every collective is a point where both processes wait for the slower:
on a busy machine their number, more than their cost, decides the wall time.

    .venv/bin/python benchmarks/bench_train_zero3.py [--steps 12] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
import torch.multiprocessing as mp

from pipelines.config import ModelConfig, StageConfig, TinyModelConfig, load_recipe
from pipelines.models import build_tiny_model, train_tokenizer
from provenance import git_commit

BATCH, LENGTH, WORLD, PROFILED = 4, 512, 2, 2
VARIANTS = {  # name -> (strategy, zero stage, stage-3 persistence threshold)
    "ddp (torch)": ("ddp", 0, 0),
    "zero-3, default threshold 1e5": ("deepspeed", 3, 100_000),
    "zero-3, threshold 1e6": ("deepspeed", 3, 1_000_000),
    "zero-2": ("deepspeed", 2, 0),
}


def build_base(directory: Path) -> Path:
    words = "lung clear effusion nodule right left lobe opacity stable heart normal fracture".split()
    tokenizer = train_tokenizer([" ".join(words[i:] + words[:i]) for i in range(len(words))] * 20, 2048, "llama3")
    tiny = load_recipe("local").model.tiny
    build_tiny_model(TinyModelConfig(**tiny.model_dump()), tokenizer).save_pretrained(directory)
    return directory


def packed_batch(vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """Random tokens in rows of ~100-token examples: a step costs the same whatever the text."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (BATCH, LENGTH), generator=g)
    positions = torch.arange(LENGTH).remainder(100).expand(BATCH, LENGTH).contiguous()
    labels = ids.clone()
    labels[positions == 0] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def worker(rank: int, base: str, variant: str, steps: int, threads: int, port: int, results) -> None:
    from pipelines.train_methods import build_method

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(threads)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    strategy, zero_stage, threshold = VARIANTS[variant]
    stage = StageConfig(method="full", training={"strategy": strategy, "zero_stage": zero_stage,
                                                 "zero3_persistence_threshold": threshold, "micro_batch_size": BATCH})
    method = build_method(base, stage, ModelConfig(), total_steps=steps, device=torch.device("cpu"))
    batch = packed_batch(2048, seed=rank)
    times, cpu_times = [], []
    for _ in range(steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        method.train_step([batch])
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(PROFILED):
            method.train_step([batch])
    comm = [e for e in prof.key_averages() if e.key.startswith("c10d::")]  # torch.distributed's ops
    if rank == 0:
        results[variant] = {"best": min(times[2:]), "median": statistics.median(times[2:]),
                            "cpu": statistics.median(cpu_times[2:]),
                            "collectives": sum(e.count for e in comm) / PROFILED,
                            "comm_cpu": sum(e.self_cpu_time_total for e in comm) / PROFILED / 1e6}
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args()
    commit = git_commit()
    print(f"# bench_train_zero3  {date.today()}  commit {commit}  Python {platform.python_version()}  "
          f"torch {torch.__version__}  {os.cpu_count()} CPUs  load {os.getloadavg()[0]:.1f}")
    print(f"2 processes (gloo) x {args.threads} thread(s), full fine-tuning, bf16, {BATCH} x {LENGTH} tokens a "
          f"process a step, {args.steps - 2} steps after 2 of warm-up")
    base = str(build_base(Path(tempfile.mkdtemp(prefix="bench-zero3-"))))
    print(f"  {'':32} wall s/step    CPU s  tokens/s  collectives a step")
    print(f"  {'variant':32}  best  median  median  (best)    calls  CPU s")
    with mp.Manager() as manager:
        results = manager.dict()
        for variant in VARIANTS:
            mp.spawn(worker, args=(base, variant, args.steps, args.threads, free_port(), results), nprocs=WORLD)
            r = results[variant]
            print(f"  {variant:32} {r['best']:6.3f} {r['median']:7.3f} {r['cpu']:7.3f}   "
                  f"{BATCH * LENGTH / r['best']:6.0f}   {r['collectives']:7.0f} {r['comm_cpu']:8.3f}", flush=True)


if __name__ == "__main__":
    main()
