"""Training on Ray Train: bad input stops in one line before any worker starts, and a worker killed
mid-run costs nothing: the run resumes from its last checkpoint at the exact data position.

The data is built here, small (a tiny Llama, its tokenizer, 128-token packed rows), in the layout
`pipelines.prepare` writes, so no test pays for a whole preparation run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import one_line_error

from pipelines.config import TinyModelConfig, load_recipe
from pipelines.models import build_tiny_model, tokenizer_fingerprint, train_tokenizer
from pipelines.packing import pack_examples

PACK = 128
WORDS = ("lung clear effusion nodule right left upper lower lobe opacity consolidation no acute "
         "cardiopulmonary process mild stable heart size normal fracture degenerative change").split()
# A small run: 2 workers x micro-batch 2 x accumulation 2 = 8 rows a step, 5 steps an epoch.
RUN = ["scaling.num_workers=2", "scaling.cpus_per_worker=0.5", "pretrain.training.micro_batch_size=2",
       "pretrain.training.grad_accum=2", "pretrain.training.log_every=1", "pretrain.training.eval_every=4",
       "pretrain.training.eval_batches=2", "pretrain.training.checkpoint_every=3",
       "pretrain.schedule.warmup_steps=2"]


def write_shards(folder: Path, examples: list[tuple[list[int], list[int]]]) -> None:
    rows = pack_examples([ids for ids, _ in examples], [labels for _, labels in examples], PACK, pad_id=0)
    folder.mkdir(parents=True)
    pq.write_table(pa.table(rows), folder / "part-00000.parquet")


def build_base(root: Path, texts: list[str], vocab: int) -> Path:
    """A tiny Llama and a tokenizer trained on `texts`, saved as a Hugging Face directory."""
    tokenizer = train_tokenizer(texts, vocab, "llama3")
    build_tiny_model(TinyModelConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, vocab_size=vocab),
                     tokenizer).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def build_data(root: Path) -> Path:
    """A tiny base model and its prepared data: pretrain/ and sft/ shards and a manifest."""
    from transformers import AutoTokenizer

    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(8, 40))) for _ in range(400)]
    base = build_base(root / "base_model", texts, 512)
    tokenizer = AutoTokenizer.from_pretrained(base)
    encoded = [tokenizer(t)["input_ids"][:PACK] for t in texts]
    data = root / "data"
    prompt_masked = lambda ids: [-100] * (len(ids) // 2) + ids[len(ids) // 2:]  # noqa: E731
    for kind, labelled in (("pretrain", lambda ids: ids), ("sft", prompt_masked)):
        write_shards(data / kind / "train", [(ids, labelled(ids)) for ids in encoded[:340]])
        write_shards(data / kind / "eval", [(ids, labelled(ids)) for ids in encoded[340:]])
    (data / "manifest.json").write_text(json.dumps({"base_model": str(base), "tokenizer": tokenizer_fingerprint(base),
                                                    "pack_length": PACK}))
    return data


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return build_data(tmp_path_factory.mktemp("train"))


# ------------------------------------------------------------------ bad input: one line, exit 2


def run_cli(capsys, *argv: str) -> str:
    from pipelines.train import run

    return one_line_error(capsys, run, list(argv))


def test_missing_or_empty_data_dir(capsys, tmp_path):
    assert "no such directory" in run_cli(capsys, "--data", str(tmp_path / "nope"), "--output", str(tmp_path))
    (tmp_path / "empty").mkdir()
    assert "no manifest.json" in run_cli(capsys, "--data", str(tmp_path / "empty"), "--output", str(tmp_path))


def test_shards_from_another_tokenizer(capsys, data, tmp_path):
    other = build_base(tmp_path / "other", WORDS * 3, 384)
    err = run_cli(capsys, "--data", str(data), "--output", str(tmp_path), "--set", f"model.path={other}")
    assert "was tokenized with another tokenizer" in err
    # Shards without a tokenizer fingerprint: their token ids give the mismatch away.
    unsigned = tmp_path / "unsigned"
    unsigned.mkdir()
    (unsigned / "manifest.json").write_text(json.dumps({"base_model": str(other)}))
    os.symlink(data / "pretrain", unsigned / "pretrain")
    os.symlink(data / "sft", unsigned / "sft")
    err = run_cli(capsys, "--data", str(unsigned), "--output", str(tmp_path))
    assert "but the model at" in err and "has a vocabulary of 384" in err


def test_a_base_model_that_does_not_exist(capsys, data, tmp_path):
    err = run_cli(capsys, "--data", str(data), "--output", str(tmp_path), "--set", f"model.path={tmp_path}/missing")
    assert f"base model {tmp_path}/missing: no such directory" in err


def test_a_lora_target_matching_no_module(capsys, data, tmp_path):
    err = run_cli(capsys, "--data", str(data), "--output", str(tmp_path), "--set", "lora.target_modules=[q_proj, qkv]")
    assert "lora.target_modules ['qkv'] match no linear layer" in err


def test_gpus_asked_on_a_cluster_without_them(capsys, ray_session, data, tmp_path):
    err = run_cli(capsys, "--data", str(data), "--output", str(tmp_path), "--set", "scaling.use_gpu=true",
                  "--set", "scaling.backend=nccl", "--set", "scaling.gpus_per_worker=1")
    assert "asks for 2 GPU worker(s) but the Ray cluster has 0 GPU(s)" in err


# ------------------------------------------------------------------ exact resume after a worker dies

STEPS = 10  # two epochs: a worker's shard holds 32 rows, 8 micro-batches of 2 per epoch, 4 steps of 2


def train_pretrain(data: Path, out: Path, *overrides: str, resume: bool = False) -> Path:
    from pipelines.train import train

    recipe = load_recipe(None, [*RUN, f"pretrain.training.max_steps={STEPS}", "scaling.max_failures=1", *overrides])
    return train(recipe, data, out, resume=resume, stages="pretrain")["pretrain"]


def logged_steps(out: Path) -> dict[int, dict]:
    lines = (out / "pretrain" / "metrics.jsonl").read_text().splitlines()
    return {row["step"]: row for row in map(json.loads, lines)}


def train_workers(state: str | None = None) -> dict[int, str]:
    """pid -> state of this session's Ray Train worker actors (dead ones included)."""
    from ray._private.state import actors

    return {a["Pid"]: a["State"] for a in actors().values()
            if a["ActorClassName"] == "RayTrainWorker" and state in (None, a["State"])}


class WorkerKiller(threading.Thread):
    """SIGKILLs one training worker, as a crash would, once the run has logged `step`."""

    def __init__(self, metrics: Path, step: int):
        super().__init__(daemon=True)
        self.metrics, self.step, self.killed_at = metrics, step, None

    def run(self) -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            lines = self.metrics.read_text().splitlines() if self.metrics.is_file() else []
            if lines and json.loads(lines[-1])["step"] >= self.step:
                os.kill(max(train_workers("ALIVE")), signal.SIGKILL)
                self.killed_at = json.loads(lines[-1])["step"]
                return
            time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(ray_session, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    train_pretrain(data, out)
    return out


def test_a_run_logs_evaluates_and_checkpoints(uninterrupted, data):
    steps = logged_steps(uninterrupted)
    assert sorted(steps) == list(range(1, STEPS + 1))
    assert {"loss", "lr", "grad_norm", "tokens_per_s_per_worker", "mfu", "peak_rss_mb", "data_digest"} <= set(steps[1])
    assert [s for s, row in steps.items() if "eval_loss" in row] == [4, 8, 10]
    assert steps[STEPS]["loss"] < steps[1]["loss"] and steps[STEPS]["epoch"] == 1
    assert steps[2]["lr"] == pytest.approx(2e-3) and steps[STEPS]["lr"] == pytest.approx(2e-4)  # warm-up, floor
    checkpoints = sorted((uninterrupted / "ray_results").glob("*/checkpoint_*"))
    assert any((c / "train_state.rank1.json").is_file() for c in checkpoints)
    assert (uninterrupted / "pretrain" / "model" / "model.safetensors").is_file()
    # --resume of a finished stage hands back its model without starting workers.
    started = time.monotonic()
    assert train_pretrain(data, uninterrupted, resume=True) == uninterrupted / "pretrain" / "model"
    assert time.monotonic() - started < 10


def test_a_worker_killed_mid_run_resumes_at_the_exact_example(uninterrupted, data, tmp_path):
    from safetensors.torch import load_file

    before = set(train_workers())
    killer = WorkerKiller(tmp_path / "pretrain" / "metrics.jsonl", step=5)
    killer.start()
    model = train_pretrain(data, tmp_path)
    assert killer.killed_at is not None and killer.killed_at < STEPS
    assert len(set(train_workers()) - before) == 4, "the worker group was not replaced"

    reference, resumed = logged_steps(uninterrupted), logged_steps(tmp_path)
    assert sorted(resumed) == sorted(reference)
    for step, row in reference.items():
        # The same examples in the same order on every rank, and (CPU, fixed seeds) the same numbers.
        for key in ("data_digest", "examples_seen", "epoch", "loss", "lr", "grad_norm", "eval_loss"):
            assert resumed[step].get(key) == row.get(key), (step, key)
    final = load_file(model / "model.safetensors")
    expected = load_file(uninterrupted / "pretrain" / "model" / "model.safetensors")
    assert all(final[k].equal(expected[k]) for k in expected)
