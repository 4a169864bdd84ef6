"""Plan a training run before paying for it: tokens, FLOPs, memory per GPU, GPUs, hours, cost.

    python -m pipelines.plan [--recipe R] [--stage finetune|pretrain] [--gpus N] [--gpu-type h100]
                             [--mfu 0.4] [--price-per-gpu-hour X] [--examples N]
                             [--tokens-per-example T] [--set ...]

Estimates from the recipe's model, method and scale, not measurements. FLOPs per token come from
`pipelines.flops` (6N full, about 4N for LoRA, plus attention); time is those FLOPs at the stated
model-FLOPs utilization (MFU), plus the host-side optimizer step when optimizer state is
offloaded to CPU memory. The model's shape is read from its directory when it exists here,
else from a table of known architectures.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from pipelines.cli import UserError, main_wrapper, parse_recipe
from pipelines.config import ModelConfig, Recipe, StageConfig
from pipelines.flops import flops_per_token

GB = 1e9
DEFAULT_TOKENS_PER_EXAMPLE = 300  # a radiology findings -> impression pair with its prompt
# CUDA context, NCCL buffers and allocator fragmentation: a reserve, not a computation.
RUNTIME_RESERVE_BYTES = 4 * GB
# Host memory traffic of one offloaded AdamW update: fp32 weight, m and v read and written
# (24 B), the gradient read (4 B), the 16-bit weight written back for the GPU (2 B).
OFFLOAD_BYTES_PER_PARAM = 30
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Architecture:
    """A Llama-style decoder: grouped-query attention, SwiGLU MLP, untied embeddings."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer in one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        kv = h // self.num_heads * self.num_kv_heads
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params(self) -> int:
        return self.num_layers * sum(a * b for a, b in self.linear_shapes().values())

    @property
    def other_params(self) -> int:
        """Embeddings, output head and RMSNorm weights: never quantized."""
        return 2 * self.vocab_size * self.hidden_size + (2 * self.num_layers + 1) * self.hidden_size

    @property
    def num_params(self) -> int:
        return self.linear_params + self.other_params

    def lora_params(self, r: int, targets: list[str] | str) -> int:
        names = ALL_LINEAR if targets == "all-linear" else targets
        shapes = self.linear_shapes()
        return self.num_layers * sum(r * sum(shapes[n]) for n in names if n in shapes)


# Published configurations (config.json of each checkpoint).
KNOWN_MODELS = {
    "llama-3-70b": Architecture("Llama-3-70B", 80, 8192, 64, 8, 28672, 128256),
    "llama-2-70b": Architecture("Llama-2-70B", 80, 8192, 64, 8, 28672, 32000),
    "llama-2-13b": Architecture("Llama-2-13B", 40, 5120, 40, 40, 13824, 32000),
    "llama-2-7b": Architecture("Llama-2-7B", 32, 4096, 32, 32, 11008, 32000),
}


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: float
    peak_flops: float  # dense 16-bit tensor throughput
    per_node: int
    host_memory_bytes: float  # CPU memory of one node, for offloaded optimizer state
    host_bandwidth: float  # sustained host memory bytes/s of one node (about 60 % of the spec sheet)


GPUS = {
    "h100": Gpu("H100 80GB SXM (p5.48xlarge nodes)", 80 * GB, 989e12, 8, 2048 * GB, 250 * GB),
    "a100": Gpu("A100 80GB SXM (p4de.24xlarge nodes)", 80 * GB, 312e12, 8, 1152 * GB, 170 * GB),
    "v100": Gpu("V100 32GB SXM2 (p3dn.24xlarge nodes)", 32 * GB, 125e12, 8, 768 * GB, 150 * GB),
}


# ----------------------------------------------------------------------------- the model


def architecture(model: ModelConfig) -> Architecture:
    """The recipe's model: its config.json when here, the tiny Llama, or a known architecture."""
    if model.path is None:
        t = model.tiny
        return Architecture("embedded tiny Llama", t.num_hidden_layers, t.hidden_size, t.num_attention_heads,
                            t.num_key_value_heads, t.intermediate_size, t.vocab_size)
    config_file = Path(model.path) / "config.json"
    if config_file.is_file():
        c = json.loads(config_file.read_text())
        return Architecture(Path(model.path).name, c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"],
                            c.get("num_key_value_heads", c["num_attention_heads"]), c["intermediate_size"],
                            c["vocab_size"])
    name = Path(model.path).name.lower()
    for key, arch in KNOWN_MODELS.items():
        if re.search(rf"(^|[^a-z0-9]){re.escape(key)}($|[^a-z0-9.])", name):
            return arch
    raise UserError(f"model.path {model.path}: not a model directory here and not a known architecture "
                    f"({', '.join(a.name for a in KNOWN_MODELS.values())})")


# ----------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU, and the optimizer state each node keeps in CPU memory when offloaded."""

    weights: float
    quantized: float  # the part of `weights` held in 4 bits
    gradients: float
    optimizer: float
    gathered: float  # ZeRO-3: full weights of the layers being computed
    activations: float
    activations_without_checkpointing: float
    host_per_node: float
    checkpointing: bool

    @property
    def total(self) -> float:
        return (self.weights + self.gradients + self.optimizer + self.gathered + self.activations
                + RUNTIME_RESERVE_BYTES)


def activation_bytes(arch: Architecture, tokens: int, seq_len: int, eager: bool) -> tuple[float, float]:
    """(with, without) full activation checkpointing, for `tokens` tokens in flight on one GPU.

    A layer keeps for its backward pass, in 16 bits per value: two norm inputs and two norm
    outputs, Q, K and V, the attention output, and the gate, up, activated gate and product of
    the MLP. Eager attention adds its score and probability matrices (sdpa and flash kernels
    recompute them). Checkpointing keeps only each layer's input and rebuilds one layer at a time.
    The loss keeps the logits three times (16-bit, fp32 copy, fp32 log-probabilities).
    """
    h, i = arch.hidden_size, arch.intermediate_size
    kv = h // arch.num_heads * arch.num_kv_heads
    per_layer = 2 * (6 * h + 2 * kv + 4 * i) + (4 * arch.num_heads * seq_len if eager else 0)
    logits = 10 * arch.vocab_size
    full = tokens * (arch.num_layers * per_layer + logits)
    checkpointed = tokens * (arch.num_layers * 2 * h + per_layer + logits)
    return checkpointed, full


def quantized_bytes_per_param(stage: StageConfig) -> float:
    """NF4/FP4: 4 bits per weight plus one absmax per 64 weights (fp32, or 8-bit with a second
    fp32 level per 256 blocks under double quantization)."""
    absmax = (1 + 4 / 256) / 64 if stage.quantization.double_quant else 4 / 64
    return 0.5 + absmax


def trainable_params(arch: Architecture, stage: StageConfig) -> int:
    return arch.num_params if stage.method == "full" else arch.lora_params(stage.lora.r, stage.lora.target_modules)


def memory_per_gpu(arch: Architecture, recipe: Recipe, stage: StageConfig, gpus: int, gpu: Gpu,
                   offload: bool) -> Memory:
    t = stage.training

    def shards(zero_level: int) -> int:
        """ZeRO stage 1 shards optimizer state, 2 also gradients, 3 also weights."""
        return gpus if t.strategy == "deepspeed" and t.zero_stage >= zero_level else 1

    trainable = trainable_params(arch, stage)
    adam_states = 2 if stage.optimizer.name == "adamw" else 0  # Adafactor's factored moments are negligible
    if stage.method == "full":
        # 16-bit weights and gradients; the optimizer keeps an fp32 master copy and its moments.
        weights, quantized = 2 * arch.num_params, 0.0
        gradients = 2 * arch.num_params
        optimizer = (4 + 4 * adam_states) * arch.num_params
    else:
        # Adapters train in fp32 (no master copy needed). For QLoRA, prepare_model_for_kbit_training
        # turns the base weights it does not quantize (embeddings, head, norms) into fp32 as well.
        quantized = arch.linear_params * quantized_bytes_per_param(stage) if stage.method == "qlora" else 0.0
        base = quantized + 4 * arch.other_params if quantized else 2 * arch.num_params
        weights = base + 4 * trainable
        gradients = 4 * trainable
        optimizer = 4 * adam_states * trainable
    gathered = 0.0
    if shards(3) > 1:
        gathered = 2 * 2 * arch.linear_params / arch.num_layers  # the current and the prefetched layer
    tokens = t.micro_batch_size * recipe.data.pack_length
    with_ckpt, without = activation_bytes(arch, tokens, recipe.data.pack_length,
                                          recipe.model.attn_implementation == "eager")
    checkpointing = recipe.model.gradient_checkpointing
    nodes = math.ceil(gpus / gpu.per_node)
    return Memory(
        weights=weights / shards(3), quantized=quantized / shards(3), gradients=gradients / shards(2),
        optimizer=0.0 if offload else optimizer / shards(1), gathered=gathered,
        activations=with_ckpt if checkpointing else without, activations_without_checkpointing=without,
        host_per_node=optimizer / nodes if offload else 0.0, checkpointing=checkpointing)


def fits(memory: Memory, gpu: Gpu) -> bool:
    return memory.total <= gpu.memory_bytes and memory.host_per_node <= gpu.host_memory_bytes


def minimum_gpus(arch: Architecture, recipe: Recipe, stage: StageConfig, gpu: Gpu, offload: bool,
                 limit: int = 8192) -> int | None:
    """The fewest GPUs whose memory holds the run (None: no count up to `limit` does)."""
    if not fits(memory_per_gpu(arch, recipe, stage, limit, gpu, offload), gpu):
        return None
    low, high = 1, limit
    while low < high:  # per-GPU memory never grows with more GPUs
        mid = (low + high) // 2
        if fits(memory_per_gpu(arch, recipe, stage, mid, gpu, offload), gpu):
            high = mid
        else:
            low = mid + 1
    return low


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Plan:
    recipe: str
    stage: str
    method: str
    arch: Architecture
    gpu: Gpu
    gpus: int
    num_params: int
    trainable_params: int
    offload: bool
    memory: Memory
    min_gpus: int | None  # as the recipe runs
    min_gpus_without_offload: int | None  # DeepSpeed only: both ways of placing optimizer state
    min_gpus_with_offload: int | None
    flops_per_token: float
    tokens: float | None
    tokens_note: str
    steps: int | None
    mfu: float
    compute_hours: float | None
    offload_hours: float | None
    price_per_gpu_hour: float | None

    @property
    def fits(self) -> bool:
        return fits(self.memory, self.gpu)

    @property
    def total_flops(self) -> float | None:
        return None if self.tokens is None else self.tokens * self.flops_per_token

    @property
    def hours(self) -> float | None:
        return None if self.compute_hours is None else self.compute_hours + self.offload_hours

    @property
    def gpu_hours(self) -> float | None:
        return None if self.hours is None else self.hours * self.gpus

    @property
    def cost(self) -> float | None:
        if self.gpu_hours is None or self.price_per_gpu_hour is None:
            return None
        return self.gpu_hours * self.price_per_gpu_hour


def manifest_counts(recipe: Recipe, split_dir: str) -> tuple[int, int] | None:
    """(examples, tokens) of the prepared training shards, when they were prepared here."""
    manifest = Path(recipe.output_dir) / "data" / "manifest.json"
    if not manifest.is_file():
        return None
    packed = json.loads(manifest.read_text()).get("packed", {}).get(f"{split_dir}/train")
    return (packed["examples"], packed["tokens"]) if packed and packed["examples"] else None


def count_examples(recipe: Recipe) -> int | None:
    """What the recipe itself says about its data size."""
    if recipe.data.mixture:
        counts = [s.count for s in recipe.data.mixture]
        return sum(counts) if all(counts) else None
    if not recipe.data.inputs:
        return round(recipe.data.synthetic.num_reports * (1 - recipe.data.splits.eval - recipe.data.splits.test))
    return None


def training_tokens(recipe: Recipe, stage_name: str, stage: StageConfig, batch_tokens: int,
                    examples: int | None, tokens_per_example: float | None) -> tuple[float | None, str]:
    """Tokens the stage trains on, and where that figure comes from."""
    counted = manifest_counts(recipe, "pretrain" if stage_name == "pretrain" else "sft")
    if examples is None and counted:
        examples = counted[0]
        tokens_per_example = tokens_per_example or counted[1] / counted[0]
        source = "prepared data"
    elif examples is None:
        examples = count_examples(recipe)
        source = "recipe"
    else:
        source = "--examples"
    assumed = tokens_per_example is None
    tokens_per_example = tokens_per_example or DEFAULT_TOKENS_PER_EXAMPLE
    t = stage.training
    by_steps = t.max_steps * batch_tokens if t.max_steps else None
    if examples is None:
        if by_steps is None:
            return None, "data size unknown: give --examples N"
        return by_steps, f"training.max_steps={t.max_steps} x {batch_tokens:,} tokens per step"
    by_data = examples * tokens_per_example * t.epochs
    note = (f"{examples:,} examples ({source}) x {tokens_per_example:,.0f} tokens"
            f"{' (assumed; give --tokens-per-example)' if assumed else ''} x {t.epochs:g} epoch(s)")
    if by_steps is not None and by_steps < by_data:
        return by_steps, f"training.max_steps={t.max_steps} x {batch_tokens:,} tokens per step (less than {note})"
    return by_data, note


def make_plan(recipe: Recipe, stage_name: str = "finetune", gpus: int | None = None, gpu_type: str = "h100",
              mfu: float = 0.4, price_per_gpu_hour: float | None = None, examples: int | None = None,
              tokens_per_example: float | None = None) -> Plan:
    if gpu_type not in GPUS:
        raise UserError(f"--gpu-type {gpu_type}: unknown (known: {', '.join(GPUS)})")
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu {mfu:g}: must be in (0, 1], e.g. 0.4")
    for flag, value in (("--gpus", gpus), ("--examples", examples), ("--tokens-per-example", tokens_per_example),
                        ("--price-per-gpu-hour", price_per_gpu_hour)):
        if value is not None and value <= 0:
            raise UserError(f"{flag} {value:g}: must be positive")
    if stage_name == "pretrain":
        if not recipe.pretrain.enabled:
            raise UserError(f"--stage pretrain: recipe {recipe.name} has no pre-training stage (pretrain.enabled)")
        stage: StageConfig = recipe.pretrain
    else:
        stage = recipe.finetune_stage()
    gpu = GPUS[gpu_type]
    gpus = gpus or recipe.scaling.num_workers
    arch = architecture(recipe.model)
    t = stage.training
    can_offload = t.strategy == "deepspeed" and t.zero_stage >= 1  # DeepSpeed offloads ZeRO partitions
    offload = t.offload_optimizer and can_offload
    trainable = trainable_params(arch, stage)
    per_token = flops_per_token(arch.num_params, trainable, stage.method, arch.num_layers, arch.hidden_size,
                                recipe.data.pack_length)
    batch_tokens = gpus * t.micro_batch_size * t.grad_accum * recipe.data.pack_length
    tokens, note = training_tokens(recipe, stage_name, stage, batch_tokens, examples, tokens_per_example)
    steps = compute_hours = offload_hours = None
    if tokens is not None:
        steps = math.ceil(tokens / batch_tokens)
        compute_hours = tokens * per_token / (gpus * gpu.peak_flops * mfu) / 3600
        # Each node updates its share of the optimizer state on its CPUs after every step.
        nodes = math.ceil(gpus / gpu.per_node)
        per_step = trainable * OFFLOAD_BYTES_PER_PARAM / nodes / gpu.host_bandwidth if offload else 0.0
        offload_hours = steps * per_step / 3600
    without, with_ = ((minimum_gpus(arch, recipe, stage, gpu, False), minimum_gpus(arch, recipe, stage, gpu, True))
                      if can_offload else (None, None))
    return Plan(recipe=recipe.name, stage=stage_name, method=stage.method, arch=arch, gpu=gpu, gpus=gpus,
                num_params=arch.num_params, trainable_params=trainable, offload=offload,
                memory=memory_per_gpu(arch, recipe, stage, gpus, gpu, offload),
                min_gpus=minimum_gpus(arch, recipe, stage, gpu, offload), min_gpus_without_offload=without,
                min_gpus_with_offload=with_,
                flops_per_token=per_token, tokens=tokens, tokens_note=note, steps=steps, mfu=mfu,
                compute_hours=compute_hours, offload_hours=offload_hours, price_per_gpu_hour=price_per_gpu_hour)


# ----------------------------------------------------------------------------- report


def _size(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _gpus(n: int | None, gpu: Gpu) -> str:
    if n is None:
        return "none (does not fit at any scale)"
    nodes = math.ceil(n / gpu.per_node)
    return f"{n} ({nodes} node{'s' if nodes > 1 else ''} of {gpu.per_node})"


def gb(n: float) -> str:
    return f"{n / GB:.1f} GB"


def minimum_gpus_text(plan: Plan) -> str:
    if plan.min_gpus_with_offload is None and plan.min_gpus_without_offload is None:
        return _gpus(plan.min_gpus, plan.gpu)
    return (f"{_gpus(plan.min_gpus_without_offload, plan.gpu)} without optimizer offload; "
            f"{_gpus(plan.min_gpus_with_offload, plan.gpu)} with it (recipe: {'on' if plan.offload else 'off'})")


def render(plan: Plan) -> str:
    m, gpu = plan.memory, plan.gpu
    lines = [
        f"plan       {plan.recipe} / {plan.stage}: {plan.method} of {plan.arch.name} on {plan.gpus} x {gpu.name}",
        f"model      {_size(plan.num_params)} parameters ({plan.arch.num_layers} layers, hidden "
        f"{plan.arch.hidden_size}), {_size(plan.trainable_params)} trainable",
        f"memory     weights {gb(m.weights)}" + (f" ({gb(m.quantized)} of it 4-bit)" if m.quantized else "")
        + f" | gradients {gb(m.gradients)} | optimizer {gb(m.optimizer)}"
        + (f" (+{gb(m.host_per_node)} in CPU memory per node)" if plan.offload else "")
        + (f" | gathered layers {gb(m.gathered)}" if m.gathered else "")
        + f" | activations {gb(m.activations)} {'with' if m.checkpointing else 'without'} checkpointing"
        + (f" ({gb(m.activations_without_checkpointing)} without)" if m.checkpointing else "")
        + f" | reserve {gb(RUNTIME_RESERVE_BYTES)}",
        f"per GPU    {gb(m.total)} of {gb(gpu.memory_bytes)}: {'fits' if plan.fits else 'DOES NOT FIT'}",
        f"min GPUs   {minimum_gpus_text(plan)}",
        f"compute    {plan.flops_per_token / 1e9:.1f} GFLOP per token",
    ]
    if plan.tokens is None:
        lines.append(f"tokens     {plan.tokens_note}; time and cost need it")
        return "\n".join(lines)
    lines += [
        f"tokens     {_size(plan.tokens)} = {plan.tokens_note}; {plan.steps:,} optimizer steps",
        f"FLOPs      {plan.total_flops:.2e}",
        f"time       {plan.hours:,.1f} h on {plan.gpus} GPUs = {plan.gpu_hours:,.0f} GPU-hours at MFU {plan.mfu:g}"
        + (f" (of which {plan.offload_hours:,.1f} h of CPU optimizer steps)" if plan.offload else ""),
    ]
    if plan.cost is not None:
        lines.append(f"cost       ${plan.cost:,.0f} at ${plan.price_per_gpu_hour:g} per GPU-hour")
    else:
        lines.append("cost       give --price-per-gpu-hour")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    # Not recipe_parser: a plan neither connects to Ray nor writes output.
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=None, help="shipped recipe name or YAML path (default: 'local')")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field (repeatable)")
    parser.add_argument("--stage", choices=["finetune", "pretrain"], default="finetune")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs, one per worker (default: scaling.num_workers)")
    parser.add_argument("--gpu-type", default="h100", help=f"one of: {', '.join(GPUS)}")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilization to assume (default 0.4)")
    parser.add_argument("--price-per-gpu-hour", type=float, default=None)
    parser.add_argument("--examples", type=int, default=None, help="training examples (default: from the data)")
    parser.add_argument("--tokens-per-example", type=float, default=None,
                        help=f"average tokens per example (default: from the data, else {DEFAULT_TOKENS_PER_EXAMPLE})")
    args = parser.parse_args(argv)
    plan = make_plan(parse_recipe(args), args.stage, args.gpus, args.gpu_type.lower(), args.mfu,
                     args.price_per_gpu_hour, args.examples, args.tokens_per_example)
    print(render(plan))
    return 0


run = main_wrapper(main)

if __name__ == "__main__":
    run()
