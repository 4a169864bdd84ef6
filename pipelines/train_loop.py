"""What one Ray Train worker runs: set up the method, stream packed batches, step, checkpoint.

The same function runs the tiny Llama on two CPU processes (gloo) and Llama-3-70B on H100
nodes (NCCL); only the recipe differs. Methods:
- full: DeepSpeed ZeRO (stage from the recipe, 3 in the studies), bf16, optional gradient
  checkpointing, gradient accumulation and clipping done by the engine;
- lora / qlora: PEFT adapters (qlora over a bitsandbytes NF4 base), trained data-parallel
  with torch DDP; only the adapters' gradients cross the network.
"""

from __future__ import annotations

import json
import math
import os
import resource
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pipelines.config import ModelConfig, StageConfig
from pipelines.flops import flops_per_token

STATE_FILE = "train_state.json"


# ------------------------------------------------------------------ set-up


def lr_lambda(schedule, total_steps: int):
    """Linear warm-up to the peak, then cosine decay to `min_lr_ratio` x peak."""
    if schedule.warmup_steps is not None:
        warmup = schedule.warmup_steps
    else:
        warmup = int(round((schedule.warmup_ratio or 0.0) * total_steps))
    floor = schedule.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_optimizer(params, opt):
    if opt.name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=opt.lr, weight_decay=opt.weight_decay, scale_parameter=False,
                         relative_step=False, warmup_init=False)
    return torch.optim.AdamW(params, lr=opt.lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay)


def deepspeed_config(stage: StageConfig, model_cfg: ModelConfig) -> dict:
    t = stage.training
    zero: dict = {"stage": t.zero_stage}
    if t.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": stage.optimizer.grad_clip or 0.0,
        "bf16": {"enabled": model_cfg.dtype == "bfloat16"},
        "fp16": {"enabled": model_cfg.dtype == "float16"},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def load_trainable(base_path: str, stage: StageConfig, model_cfg: ModelConfig):
    """The model the method trains: a full model, or a PEFT model over a (4-bit) frozen base."""
    from pipelines.models import load_model

    if stage.method == "full":
        model = load_model(base_path, model_cfg)
    else:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        quant = stage.quantization if stage.method == "qlora" else None
        model = load_model(base_path, model_cfg, quantization=quant)
        if quant is not None:
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=model_cfg.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False})
        lora = stage.lora
        model = get_peft_model(model, LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type="CAUSAL_LM",
            target_modules=lora.target_modules))
    if model_cfg.gradient_checkpointing and stage.method != "qlora":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def packed_loss(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Mean token loss over labelled positions; examples stay isolated through position_ids.

    No attention mask and no cache: transformers then reads example boundaries from the
    restarting position ids (NOTES.md: a cache or a mask here would let examples leak).
    """
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    labels = batch["labels"][:, 1:]
    logits = logits[:, :-1].float()
    n = int((labels != -100).sum())
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100,
                           reduction="sum")
    return loss / max(n, 1), n


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------ the loop


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    stage = StageConfig.model_validate(config["stage"])
    model_cfg = ModelConfig.model_validate(config["model"])
    t = stage.training
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(t.seed)
    device = ray.train.torch.get_device()
    total_steps = config["total_steps"]
    steps_per_epoch = config["steps_per_epoch"]

    engine, model, optimizer, scheduler = setup_method(config["base_path"], stage, model_cfg, total_steps, device)
    state = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "examples_seen": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            state = load_state(ckpt_dir, stage, engine, model, optimizer, scheduler)
        if rank == 0:
            print(f"[{config['stage_name']}] resumed at step {state['step']} (epoch {state['epoch']}, "
                  f"batch {state['batches_in_epoch']})", flush=True)

    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval")
    per_token = flops_per_token(config["num_params"], config["trainable_params"], stage.method,
                                config["num_layers"], config["hidden_size"], config["seq_len"])
    metrics_path = Path(config["metrics_path"])
    window_tokens, window_start = 0, time.time()
    micro = 0
    while state["step"] < total_steps:
        skip = state["batches_in_epoch"]  # exact resume: the batches this epoch already consumed
        for i, batch in enumerate(train_shard.iter_torch_batches(
                batch_size=t.micro_batch_size, dtypes=torch.long, device=device,
                local_shuffle_buffer_size=None, drop_last=True)):
            if i < skip:
                continue
            loss, _ = packed_loss(model if engine is None else engine, batch)
            micro += 1
            boundary = micro % t.grad_accum == 0
            if engine is not None:
                engine.backward(loss)
                engine.step()
                grad_norm = engine.get_global_grad_norm() if boundary else None
            else:
                (loss / t.grad_accum).backward()
                grad_norm = None
                if boundary:
                    params = [p for p in model.parameters() if p.requires_grad]
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, stage.optimizer.grad_clip or float("inf"))
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            state["batches_in_epoch"] += 1
            state["examples_seen"] += int((batch["position_ids"] == 0).sum())
            window_tokens += int(batch["input_ids"].numel())
            if not boundary:
                continue
            state["step"] += 1
            step = state["step"]
            metrics = {"stage": config["stage_name"], "step": step, "loss": float(loss)}
            if step % t.log_every == 0 or step == total_steps:
                elapsed = time.time() - window_start
                tps = window_tokens / elapsed if elapsed else 0.0
                metrics.update({
                    "lr": current_lr(engine, scheduler), "grad_norm": _to_float(grad_norm),
                    "tokens_per_s_per_worker": round(tps, 1),
                    "mfu": tps * per_token / (t.peak_tflops_per_device * 1e12),
                    "peak_rss_mb": round(peak_rss_mb(), 1), "epoch": state["epoch"],
                    "examples_seen": state["examples_seen"],
                })
                window_tokens, window_start = 0, time.time()
            if step % t.eval_every == 0 or step == total_steps:
                metrics["eval_loss"] = evaluate(model if engine is None else engine, eval_shard, t, device)
            if rank == 0 and "lr" in metrics:
                with open(metrics_path, "a") as fh:
                    fh.write(json.dumps(metrics) + "\n")
                shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                 for k, v in metrics.items() if k != "stage")
                print(f"[{config['stage_name']}] {shown}", flush=True)
            if step % t.checkpoint_every == 0 and step < total_steps:
                report_checkpoint(metrics, state, stage, engine, model, optimizer, scheduler, rank)
            elif "eval_loss" in metrics or step == total_steps:
                ray.train.report(metrics)
            if step >= total_steps:
                break
        else:
            state["epoch"] += 1
            state["batches_in_epoch"] = 0
            if steps_per_epoch == 0:
                raise RuntimeError("the training shard is smaller than one batch per worker")
    save_final(config["final_dir"], stage, engine, model, rank, state, metrics)


def _to_float(value) -> float | None:
    if value is None:
        return None
    return float(value.item() if hasattr(value, "item") else value)


def current_lr(engine, scheduler) -> float:
    if engine is not None:
        return float(engine.get_lr()[0])
    return float(scheduler.get_last_lr()[0])


def setup_method(base_path: str, stage: StageConfig, model_cfg: ModelConfig, total_steps: int, device):
    from torch.optim.lr_scheduler import LambdaLR

    if stage.method == "full" and stage.training.strategy == "deepspeed":
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig, unset_hf_deepspeed_config

        ds_config = deepspeed_config(stage, model_cfg)
        # Alive during from_pretrained, this partitions a ZeRO-3 model's weights as they load
        # (a 70B model never exists whole on one GPU). Every rank must load: it is collective.
        keep = HfDeepSpeedConfig(ds_config) if stage.training.zero_stage == 3 else None
        model = load_trainable(base_path, stage, model_cfg)
        optimizer = build_optimizer(model.parameters(), stage.optimizer)
        scheduler = LambdaLR(optimizer, lr_lambda(stage.schedule, total_steps))
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        del keep
        unset_hf_deepspeed_config()
        return engine, engine.module, optimizer, scheduler
    import ray.train.torch

    model = load_trainable(base_path, stage, model_cfg)
    if stage.method != "qlora":
        model = model.to(device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, stage.optimizer)
    scheduler = LambdaLR(optimizer, lr_lambda(stage.schedule, total_steps))
    return None, model, optimizer, scheduler


@torch.no_grad()
def evaluate(model, eval_shard, t, device) -> float | None:
    """Token-weighted eval loss over at most `eval_batches` batches, summed across workers."""
    if eval_shard is None:
        return None
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for i, batch in enumerate(eval_shard.iter_torch_batches(batch_size=t.micro_batch_size, dtypes=torch.long,
                                                            device=device)):
        if i >= t.eval_batches:
            break
        loss, n = packed_loss(model, batch)
        total += torch.tensor([float(loss) * n, n], dtype=torch.float64)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    if was_training:
        model.train()
    return float(total[0] / total[1]) if total[1] else None


def unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


# ------------------------------------------------------------------ checkpoints


def report_checkpoint(metrics, state, stage, engine, model, optimizer, scheduler, rank) -> None:
    """Every rank saves what it owns, then reports; Ray merges the ranks' files into one checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        if engine is not None:
            engine.save_checkpoint(tmp, tag="state")  # collective: each rank writes its ZeRO shards
        elif rank == 0:
            unwrap(model).save_pretrained(os.path.join(tmp, "adapter"))
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                       os.path.join(tmp, "optimizer.pt"))
        if rank == 0:
            Path(tmp, STATE_FILE).write_text(json.dumps(state))
        has_files = any(Path(tmp).iterdir())
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if has_files else None)


def load_state(ckpt_dir: str, stage, engine, model, optimizer, scheduler) -> dict:
    if engine is not None:
        engine.load_checkpoint(ckpt_dir, tag="state")
    else:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = load_file(os.path.join(ckpt_dir, "adapter", "adapter_model.safetensors"))
        set_peft_model_state_dict(unwrap(model), weights)
        saved = torch.load(os.path.join(ckpt_dir, "optimizer.pt"), weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
    return json.loads(Path(ckpt_dir, STATE_FILE).read_text())


def save_final(final_dir: str, stage, engine, model, rank: int, state: dict, metrics: dict) -> None:
    """The result as a Hugging Face directory: full safetensors weights, or a PEFT adapter."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        if engine is not None:
            # Collective: gathers the ZeRO-3 shards into one 16-bit state dict on rank 0.
            state_dict = engine._zero3_consolidated_16bit_state_dict() if stage.training.zero_stage == 3 \
                else engine.module.state_dict()
            if rank == 0:
                engine.module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        elif rank == 0:
            unwrap(model).save_pretrained(tmp, safe_serialization=True)
        if rank == 0:
            Path(tmp, STATE_FILE).write_text(json.dumps(state))
        has_files = any(Path(tmp).iterdir())
        ray.train.report({**metrics, "final": True},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp) if has_files else None)
