"""Decontamination cost at Med42 scale: 100k training texts x 10k evaluation items.

Two parts, measured separately:
1. Embedding throughput of the bundled all-MiniLM-L6-v2 on a sample of real texts
   (../shared/data: Alpaca instructions as training-like texts, MCQ questions + options as
   evaluation-like texts; synthetic sentences when that folder is absent), extrapolated to
   the full sizes.
2. The similarity search itself at full size: the sample's embeddings are tiled and perturbed
   (Gaussian noise, renormalised) to 100k x 10k unit vectors, then the chunked max/argmax runs
   over all 1e9 pairs. Copies of training rows planted among the eval rows check the result.

    .venv/bin/python benchmarks/bench_decontam.py [--train 100000 --eval 10000 --sample 256]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipelines.decontam import embed, load_encoder, nearest_training_example  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def sample_texts(n: int, seed: int = 0) -> tuple[list[str], list[str], str]:
    rng = random.Random(seed)
    alpaca, mcqa = DATA / "instruct" / "alpaca_5000.jsonl", DATA / "mcqa" / "medqa_usmle_4opt_test.jsonl"
    if alpaca.is_file() and mcqa.is_file():
        train = [json.loads(line) for line in alpaca.open()]
        evals = [json.loads(line) for line in mcqa.open()]
        train_texts = [" ".join(filter(None, (r["instruction"], r["input"], r["output"]))) for r in train]
        eval_texts = [r["question"] + "\n" + "\n".join(r["options"].values()) for r in evals]
        return rng.sample(train_texts, n), rng.sample(eval_texts, min(n, len(eval_texts))), "../shared/data"
    words = "patient chest pain fever cough heart lung liver kidney dose drug acute chronic normal".split()
    synth = [" ".join(rng.choices(words, k=rng.randint(20, 120))) for _ in range(2 * n)]
    return synth[:n], synth[n:], "synthetic sentences (../shared/data absent)"


def tile(base: torch.Tensor, n: int, noise: float, generator: torch.Generator) -> torch.Tensor:
    reps = base.repeat((n + len(base) - 1) // len(base), 1)[:n]
    return torch.nn.functional.normalize(reps + noise * torch.randn(reps.shape, generator=generator), dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=100_000)
    parser.add_argument("--eval", type=int, default=10_000)
    parser.add_argument("--sample", type=int, default=256, help="texts actually embedded per side")
    parser.add_argument("--train-chunk", type=int, default=8192)
    parser.add_argument("--eval-chunk", type=int, default=2048)
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")

    train_texts, eval_texts, source = sample_texts(args.sample)
    encoder = load_encoder(device="cpu")
    embed(encoder, train_texts[:16])  # warm-up
    rates = {}
    for name, texts in (("train-like", train_texts), ("eval-like", eval_texts)):
        started = time.perf_counter()
        vectors = embed(encoder, texts)
        rates[name] = len(texts) / (time.perf_counter() - started)
        mean_words = sum(len(t.split()) for t in texts) / len(texts)
        print(f"embedding {name}: {len(texts)} texts from {source}, mean {mean_words:.0f} words, "
              f"{rates[name]:.0f} texts/s")
        if name == "train-like":
            train_base = vectors
        else:
            eval_base = vectors
    projected = args.train / rates["train-like"] + args.eval / rates["eval-like"]
    print(f"projected embedding time for {args.train:,} + {args.eval:,} texts: {projected / 60:.1f} min")

    generator = torch.Generator().manual_seed(0)
    train = tile(train_base, args.train, noise=0.05, generator=generator)
    evals = tile(eval_base, args.eval, noise=0.05, generator=generator)
    planted = torch.randint(0, args.train, (10,), generator=generator)
    evals[:10] = train[planted]
    started = time.perf_counter()
    best, index = nearest_training_example(evals, train, args.train_chunk, args.eval_chunk)
    elapsed = time.perf_counter() - started
    assert torch.equal(index[:10], planted) and bool((best[:10] > 0.999).all())
    block_mb = args.train_chunk * args.eval_chunk * 4 / 2**20
    print(f"similarity search {args.eval:,} x {args.train:,} = {args.eval * args.train:.1e} pairs "
          f"(dim {train.shape[1]}, tiled+perturbed embeddings): {elapsed:.1f} s, "
          f"{args.eval * args.train / elapsed:.2e} pairs/s, largest block {block_mb:.0f} MiB; "
          f"flagged > 0.8: {int((best > 0.8).sum())}")


if __name__ == "__main__":
    main()
