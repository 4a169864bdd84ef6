"""The pieces of a training step, in-process and without workers: schedule, optimizers, step counts,
FLOPs, the data position a resumed worker replays, and a method's checkpoint round trip."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest
import torch

from pipelines.config import ModelConfig, OptimizerConfig, ScheduleConfig, StageConfig, TinyModelConfig, load_recipe
from pipelines.flops import flops_per_token
from pipelines.models import build_tiny_model, train_tokenizer
from pipelines.packing import pack_examples
from pipelines.train import total_steps
from pipelines.train_checkpoint import TrainState, restore, save
from pipelines.train_data import DataOrderChanged, Position, micro_batches
from pipelines.train_methods import DdpMethod, build_optimizer, deepspeed_config, lr_lambda


def test_warmup_in_steps_or_as_a_ratio_then_cosine_to_the_floor():
    by_steps = lr_lambda(ScheduleConfig(warmup_steps=10, min_lr_ratio=0.1), total_steps=100)
    assert [by_steps(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert by_steps(55) == pytest.approx(0.55) and by_steps(100) == pytest.approx(0.1)
    by_ratio = lr_lambda(ScheduleConfig(warmup_ratio=0.03, min_lr_ratio=0.1), total_steps=1000)
    assert by_ratio(29) == pytest.approx(1.0) and by_ratio(14) == pytest.approx(0.5)
    assert by_ratio(1000) == pytest.approx(0.1)


def test_epochs_or_max_steps():
    recipe = load_recipe(None, ["scaling.num_workers=2", "training.micro_batch_size=4", "training.grad_accum=2",
                                "training.max_steps=null"])
    stage = recipe.finetune_stage()
    assert total_steps(recipe, stage, rows=1000) == 62  # 500 rows a worker, 125 micro-batches, 2 per step
    stage.training.epochs = 2.5
    assert total_steps(recipe, stage, rows=1000) == 156
    stage.training.max_steps = 7
    assert total_steps(recipe, stage, rows=1000) == 7


def test_adafactor_option_and_its_deepspeed_config():
    params = [torch.nn.Parameter(torch.ones(4, 4))]
    opt = build_optimizer(params, OptimizerConfig(name="adafactor", lr=1e-3, weight_decay=0.0))
    params[0].grad = torch.ones(4, 4)
    opt.step()
    assert type(opt).__name__ == "Adafactor" and params[0].data.lt(1).all()
    stage = StageConfig(method="full", optimizer=OptimizerConfig(name="adafactor"),
                        training={"strategy": "deepspeed", "zero_stage": 3})
    config = deepspeed_config(stage, ModelConfig(dtype="float16"))
    assert config["zero_allow_untested_optimizer"] and config["fp16"]["enabled"] and not config["bf16"]["enabled"]
    zero = config["zero_optimization"]
    assert zero["stage3_param_persistence_threshold"] == stage.training.zero3_persistence_threshold
    assert not deepspeed_config(StageConfig(method="full"), ModelConfig())["zero_allow_untested_optimizer"]



def test_offloaded_optimizer_is_one_deepspeed_accepts():
    """ZeRO-Offload refuses a torch AdamW: AdamW becomes DeepSpeed's CPU Adam (a real step here),
    and Adafactor, which DeepSpeed has no CPU version of, is let through as it is."""
    params = [torch.nn.Parameter(torch.ones(4, 4))]
    opt = build_optimizer(params, OptimizerConfig(lr=0.1, weight_decay=0.0), cpu_offload=True)
    params[0].grad = torch.ones(4, 4)
    opt.step()
    assert type(opt).__name__ == "DeepSpeedCPUAdam" and params[0].data.lt(1).all()
    for name, forced in (("adamw", True), ("adafactor", False)):
        stage = StageConfig(method="full", optimizer=OptimizerConfig(name=name),
                            training={"strategy": "deepspeed", "zero_stage": 3, "offload_optimizer": True})
        config = deepspeed_config(stage, ModelConfig())
        assert config["zero_force_ds_cpu_optimizer"] is forced
        assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"

def test_flops_per_token():
    full = flops_per_token(1000, 1000, "full", num_layers=2, hidden_size=8, seq_len=16)
    lora = flops_per_token(1000, 10, "lora", num_layers=2, hidden_size=8, seq_len=16)
    assert full == 6 * 1000 + 12 * 2 * 8 * 16 and lora == 4 * 1000 + 2 * 10 + 12 * 2 * 8 * 16


# ------------------------------------------------------------------ data position


def packed_table(rows: int, length: int = 16) -> pa.Table:
    rng = random.Random(0)
    examples = [[rng.randrange(3, 500) for _ in range(length)] for _ in range(rows)]
    return pa.table(pack_examples(examples, examples, length, pad_id=0))


def take(shard, position: Position, n: int) -> list[torch.Tensor]:
    batches = micro_batches(shard, position, batch_size=2, device=torch.device("cpu"))
    return [next(batches)["input_ids"] for _ in range(n)]


def test_a_resumed_position_replays_exactly_the_batches_that_follow(ray_session):
    import ray.data

    shard = ray.data.from_arrow(packed_table(10)).iterator()  # 5 micro-batches an epoch
    start = Position()
    uninterrupted = take(shard, start, 8)
    assert (start.epoch, start.batches_in_epoch, start.examples, start.tokens) == (1, 3, 16, 256)
    at_step_4 = Position()
    take(shard, at_step_4, 4)
    saved = Position(**at_step_4.to_dict())
    resumed = take(shard, saved, 4)
    assert all(a.equal(b) for a, b in zip(resumed, uninterrupted[4:]))
    assert saved.digest == start.digest and saved.examples == start.examples

    other = ray.data.from_arrow(packed_table(10).slice(2)).iterator()  # the data moved under the run
    with pytest.raises(DataOrderChanged, match="differ from the ones trained"):
        take(other, Position(**at_step_4.to_dict()), 1)


# ------------------------------------------------------------------ checkpoint round trip


def lora_method(base: str, dtype: str) -> DdpMethod:
    torch.manual_seed(0)
    stage = StageConfig(method="lora", lora={"r": 4, "alpha": 8, "dropout": 0.1},
                        optimizer={"lr": 1e-2}, schedule={"warmup_steps": 2})
    return DdpMethod(base, stage, ModelConfig(dtype=dtype), total_steps=8, device=torch.device("cpu"))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_restored_method_takes_the_same_steps(tmp_path, dtype):
    """Adapter weights, AdamW moments, schedule and the dropout RNG all survive the checkpoint, in
    fp32 and in fp16 (with loss scaling)."""
    tokenizer = train_tokenizer(["no acute findings", "small left effusion"] * 20, 300, "llama3")
    base = tmp_path / "base"
    build_tiny_model(TinyModelConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                     num_key_value_heads=1, vocab_size=512), tokenizer).save_pretrained(base)
    table = packed_table(8)
    batch = {k: torch.tensor(table.column(k).to_pylist()) for k in ("input_ids", "labels", "position_ids")}
    method = lora_method(str(base), dtype)
    for _ in range(3):
        method.train_step([batch, batch])
    (tmp_path / "ckpt").mkdir()
    save(str(tmp_path / "ckpt"), TrainState(step=3), method, rank=0)
    expected = [method.train_step([batch, batch]) for _ in range(3)]

    fresh = lora_method(str(base), dtype)
    assert restore(str(tmp_path / "ckpt"), fresh, rank=0).step == 3
    assert [fresh.train_step([batch, batch]) for _ in range(3)] == expected
    assert fresh.lr() == method.lr()
    assert fresh.scaler.is_enabled() == (dtype == "float16")
    if dtype == "float16":  # loss scaling on: gradients did not underflow or overflow
        assert fresh.scaler.get_scale() == method.scaler.get_scale() > 1
        assert all(abs(loss) < float("inf") for loss, _ in expected)
