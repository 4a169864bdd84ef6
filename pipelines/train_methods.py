"""How each training method builds its model and takes an optimizer step.

Two engines behind one small interface (`train_step`, `lr`, `save_state`, `load_state`,
`export`), so the per-worker loop never asks which method runs:
- `DeepSpeedMethod`: DeepSpeed ZeRO (stage from the recipe, 3 in the studies) for `full` and
  `lora`; bf16/fp16, gradient accumulation and clipping happen inside the engine;
- `DdpMethod`: torch DDP for `lora`, `qlora` (PEFT adapters over a bitsandbytes NF4 base; only the
  adapters' gradients cross the network) and `full` on the ddp strategy.
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from pipelines.config import ModelConfig, OptimizerConfig, ScheduleConfig, StageConfig

TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"


def packed_loss(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Mean token loss over labelled positions; examples stay isolated through position_ids.

    No attention mask and no cache: transformers then reads example boundaries from the
    restarting position ids (NOTES.md: a cache or a mask here would let examples leak).
    The vocabulary projection runs only where a label follows (`logits_to_keep` as a mask): an
    SFT prompt needs no logits, which saves ~10 % of a tiny-model step here and, at Llama-3's
    128k vocabulary, gigabytes of fp32 logits per packed row.
    """
    targets = batch["labels"][:, 1:]
    labelled = targets != -100
    keep = torch.zeros_like(batch["labels"], dtype=torch.bool)
    keep[:, :-1] = labelled  # position p predicts the label at p + 1
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                   logits_to_keep=keep).logits  # (labelled tokens, vocab), row-major like targets[labelled]
    n = int(labelled.sum())
    loss = F.cross_entropy(logits.float(), targets[labelled], reduction="sum")
    return loss / max(n, 1), n


def lr_lambda(schedule: ScheduleConfig, total_steps: int):
    """Linear warm-up (steps, or a ratio of the run) to the peak, then cosine decay to the floor."""
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


def build_optimizer(params, opt: OptimizerConfig, cpu_offload: bool = False) -> torch.optim.Optimizer:
    if opt.name == "adamw" and cpu_offload:
        # ZeRO-Offload steps the optimizer on the CPUs: DeepSpeed's vectorized CPU Adam (compiled on
        # first use), since it refuses a torch AdamW there as too slow.
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=opt.lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay,
                                adamw_mode=True)
    if opt.name == "adafactor":
        from transformers.optimization import Adafactor

        # A fixed learning rate (the schedule drives it), as the continual pre-training study ran it.
        return Adafactor(params, lr=opt.lr, weight_decay=opt.weight_decay, scale_parameter=False,
                         relative_step=False, warmup_init=False)
    return torch.optim.AdamW(params, lr=opt.lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay)


def deepspeed_config(stage: StageConfig, model_cfg: ModelConfig) -> dict:
    t = stage.training
    zero: dict = {"stage": t.zero_stage}
    if t.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        zero["stage3_param_persistence_threshold"] = t.zero3_persistence_threshold
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": stage.optimizer.grad_clip or 0.0,
        "bf16": {"enabled": model_cfg.dtype == "bfloat16"},
        "fp16": {"enabled": model_cfg.dtype == "float16"},
        "zero_optimization": zero,
        # DeepSpeed vets only its own optimizers with ZeRO; a client Adafactor is sound (it sees
        # flat fp32 partitions, so it keeps a full second moment instead of a factored one).
        "zero_allow_untested_optimizer": stage.optimizer.name == "adafactor",
        # DeepSpeed has no CPU Adafactor; offloaded, the client one runs on the CPUs as it is.
        "zero_force_ds_cpu_optimizer": stage.optimizer.name != "adafactor",
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


class DeepSpeedMethod:
    """A DeepSpeed engine: it shards, casts, accumulates and clips; every call here is collective."""

    def __init__(self, base_path: str, stage: StageConfig, model_cfg: ModelConfig, total_steps: int):
        import deepspeed
        from torch.optim.lr_scheduler import LambdaLR
        from transformers.integrations import HfDeepSpeedConfig, unset_hf_deepspeed_config

        if not torch.cuda.is_available():
            # On CPUs DeepSpeed's comm backend compiles its shared-memory all-reduce kernel when it
            # starts (about a minute in every new environment), for inference only: training
            # all-reduces through torch.distributed. DeepSpeed keeps edits to this dict.
            import deepspeed.ops

            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        ds_config = deepspeed_config(stage, model_cfg)
        # Alive during from_pretrained, this partitions a ZeRO-3 model's weights as they load
        # (a 70B model never exists whole on one GPU). Every rank must load: it is collective.
        keep = HfDeepSpeedConfig(ds_config) if stage.training.zero_stage == 3 else None
        model = load_trainable(base_path, stage, model_cfg)
        trainable = [p for p in model.parameters() if p.requires_grad]
        # A torch optimizer passed in spares DeepSpeed's fused-Adam compile (NOTES.md).
        optimizer = build_optimizer(trainable, stage.optimizer, cpu_offload=stage.training.offload_optimizer)
        scheduler = LambdaLR(optimizer, lr_lambda(stage.schedule, total_steps))
        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, optimizer=optimizer,
                                                    lr_scheduler=scheduler, config=ds_config)
        del keep
        unset_hf_deepspeed_config()
        self.model = self.engine  # forward through the engine: ZeRO-3 gathers each layer on the fly
        self.zero3 = stage.training.zero_stage == 3

    def train_step(self, batches: list[dict]) -> tuple[float, float | None]:
        losses = []
        for batch in batches:
            loss, _ = packed_loss(self.engine, batch)
            self.engine.backward(loss)
            self.engine.step()  # applies the update on the accumulation boundary only
            losses.append(loss.item())
        return sum(losses) / len(losses), _to_float(self.engine.get_global_grad_norm())

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def save_state(self, directory: str, rank: int) -> None:
        self.engine.save_checkpoint(directory, tag="state")  # each rank writes its ZeRO shards

    def load_state(self, directory: str) -> None:
        self.engine.load_checkpoint(directory, tag="state")

    def export(self, directory: str, rank: int) -> None:
        """Rank 0 writes a Hugging Face directory: full safetensors weights, or a PEFT adapter."""
        # Collective: gathers the ZeRO-3 shards into one 16-bit state dict on rank 0.
        engine = self.engine
        state_dict = engine._zero3_consolidated_16bit_state_dict() if self.zero3 else engine.module.state_dict()
        if rank == 0:
            self.engine.module.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)


class DdpMethod:
    """Torch DDP (a plain model on one process): the optimizer sees only trainable parameters."""

    def __init__(self, base_path: str, stage: StageConfig, model_cfg: ModelConfig, total_steps: int,
                 device: torch.device):
        from torch.optim.lr_scheduler import LambdaLR

        model = load_trainable(base_path, stage, model_cfg)
        if stage.method != "qlora":  # bitsandbytes already placed the 4-bit model
            model = model.to(device)
        self.module = model
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        self.model = model
        self.trainable = {name: p for name, p in self.module.named_parameters() if p.requires_grad}
        self.optimizer = build_optimizer(list(self.trainable.values()), stage.optimizer)
        self.scheduler = LambdaLR(self.optimizer, lr_lambda(stage.schedule, total_steps))
        self.grad_clip = stage.optimizer.grad_clip or float("inf")
        # fp16 (GPUs without bf16, e.g. V100) needs loss scaling or small gradients underflow to 0;
        # DeepSpeed does it itself, DDP here. A no-op for bf16 and fp32.
        self.scaler = torch.amp.GradScaler(device.type, enabled=model_cfg.dtype == "float16")

    def train_step(self, batches: list[dict]) -> tuple[float, float | None]:
        losses = []
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            # Gradients cross the network once per step, on the last micro-batch.
            with self.model.no_sync() if not last and hasattr(self.model, "no_sync") else nullcontext():
                loss, _ = packed_loss(self.model, batch)
                self.scaler.scale(loss / len(batches)).backward()
            losses.append(loss.item())
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), self.grad_clip)
        self.scaler.step(self.optimizer)  # skipped when fp16 gradients overflowed
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return sum(losses) / len(losses), float(grad_norm)

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def save_state(self, directory: str, rank: int) -> None:
        from safetensors.torch import save_file

        if rank == 0:  # DDP keeps every rank identical: one copy is the state
            save_file({k: v.detach().contiguous() for k, v in self.trainable.items()},
                      os.path.join(directory, TRAINABLE_FILE))
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "scaler": self.scaler.state_dict()},
                       os.path.join(directory, OPTIMIZER_FILE))

    def load_state(self, directory: str) -> None:
        from safetensors.torch import load_file

        weights = load_file(os.path.join(directory, TRAINABLE_FILE))
        with torch.no_grad():
            for name, param in self.trainable.items():
                param.copy_(weights[name])
        saved = torch.load(os.path.join(directory, OPTIMIZER_FILE), weights_only=True)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])

    def export(self, directory: str, rank: int) -> None:
        if rank == 0:
            self.module.save_pretrained(directory, safe_serialization=True)


def build_method(base_path: str, stage: StageConfig, model_cfg: ModelConfig, total_steps: int,
                 device: torch.device) -> DeepSpeedMethod | DdpMethod:
    if stage.training.strategy == "deepspeed":
        return DeepSpeedMethod(base_path, stage, model_cfg, total_steps)
    return DdpMethod(base_path, stage, model_cfg, total_steps, device)


def _to_float(value) -> float | None:
    if value is None:
        return None
    return float(value.item() if hasattr(value, "item") else value)
