"""The recipe: one YAML file, validated into typed config, that decides everything about a run.

A recipe names the data, the model, the method, the optimizer and schedule, the scale and the
evaluation and serving settings. The embedded default (`local`) is just one recipe among the
shipped ones; no code path asks whether it runs in a test.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_RECIPE = "local"
RECIPES_DIR = Path(__file__).parent / "recipes"


class RecipeError(ValueError):
    """A recipe the user wrote (or overrode) is not valid; the message is one readable line."""


class Strict(BaseModel):
    # Unknown keys are typos in a hand-written YAML file: reject them rather than ignore them.
    model_config = ConfigDict(extra="forbid", frozen=False)


class SyntheticConfig(Strict):
    num_reports: int = Field(2000, gt=0)
    seed: int = 0
    defect_rate: float = Field(0.05, ge=0, le=1)


# The fields of an input record; a recipe's `columns` maps some of them to the input's column names.
RECORD_FIELDS = ("id", "exam_code", "modality", "findings", "impression", "text", "instruction", "input", "output")


def _known_fields(columns: dict[str, str]) -> dict[str, str]:
    unknown = sorted(set(columns) - set(RECORD_FIELDS))
    if unknown:
        raise ValueError(f"unknown canonical field(s) {unknown}; expected some of {sorted(RECORD_FIELDS)}")
    return columns


class MixtureSource(Strict):
    """One source of a dataset mixture, sampled deterministically to a target count or share."""

    name: str
    inputs: list[str]
    task: Literal["impression", "instruct", "pretrain"] = "instruct"
    count: int | None = Field(None, gt=0)  # rows to keep (all of them when the source has fewer)
    ratio: float | None = Field(None, gt=0, le=1)  # share of the whole mixture
    columns: dict[str, str] = {}
    text_column: str | None = None

    _columns = field_validator("columns")(_known_fields)

    @model_validator(mode="after")
    def _one_target(self) -> MixtureSource:
        if (self.count is None) == (self.ratio is None):
            raise ValueError("give exactly one of count or ratio")
        return self


class SplitConfig(Strict):
    eval: float = Field(0.001, ge=0, lt=1)
    test: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _leaves_train(self) -> SplitConfig:
        if self.eval + self.test >= 1:
            raise ValueError("eval + test must leave some data for training")
        return self


class DataConfig(Strict):
    inputs: list[str] = []  # files or globs (CSV, JSON, JSONL, Parquet); empty: synthetic reports
    synthetic: SyntheticConfig = SyntheticConfig()
    columns: dict[str, str] = {}  # canonical field -> column name in the input
    text_column: str | None = None  # a whole free-text report, split into sections
    encoding: str = "utf-8"  # of CSV / JSON input; rows that do not decode are rejected
    max_field_chars: int = Field(1_000_000, gt=0)  # a longer field rejects its row (a dump, not a report)
    task: Literal["impression", "instruct", "pretrain"] = "impression"
    min_findings_words: int = Field(10, ge=0)
    deidentify: bool = True
    deduplicate: bool = True
    splits: SplitConfig = SplitConfig()
    lead_in_probability: float = Field(0.3, ge=0, le=1)
    pack_length: int = Field(2048, ge=16)
    pack_window: int = Field(1000, ge=1)  # examples per best-fit-decreasing window
    overlong: Literal["truncate", "reject"] = "truncate"
    mixture: list[MixtureSource] = []
    cache_dir: str | None = None  # intermediate shards during a run; default: <data output>/cache

    _columns = field_validator("columns")(_known_fields)

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, encoding: str) -> str:
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise ValueError(f"unknown encoding {encoding!r}") from None
        return encoding

    @model_validator(mode="after")
    def _inputs_or_mixture(self) -> DataConfig:
        if self.mixture and self.inputs:
            raise ValueError("give inputs or mixture, not both (a mixture names its own inputs)")
        names = [s.name for s in self.mixture]
        if len(set(names)) != len(names):
            raise ValueError("mixture source names must be unique")
        shares = sum(s.ratio for s in self.mixture if s.ratio is not None)
        has_counts = any(s.count is not None for s in self.mixture)
        if shares > 1 + 1e-9 or (has_counts and shares >= 1):
            raise ValueError("mixture ratios are shares of the whole mixture: they must sum to at most 1, "
                             "and below 1 when some sources have counts")
        return self


class TinyModelConfig(Strict):
    """The embedded tiny Llama. Every linear's output size is a multiple of 32 so that 4-bit
    generation works on the CPU (bitsandbytes repacks weights in blocks of 32)."""

    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 4096
    max_position_embeddings: int = 2048
    seed: int = 0

    @model_validator(mode="after")
    def _quantizable(self) -> TinyModelConfig:
        kv_dim = self.hidden_size // self.num_attention_heads * self.num_key_value_heads
        for name, size in [("hidden_size", self.hidden_size), ("intermediate_size", self.intermediate_size),
                           ("key/value width", kv_dim), ("vocab_size", self.vocab_size)]:
            if size % 32:
                raise ValueError(f"{name}={size} must be a multiple of 32 for 4-bit kernels on CPU")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        return self


class ModelConfig(Strict):
    path: str | None = None  # local HF directory or hub id; None builds the embedded tiny Llama
    tiny: TinyModelConfig = TinyModelConfig()
    chat_format: Literal["llama3", "med42", "alpaca"] = "llama3"
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    gradient_checkpointing: bool = False


class LoraConfig(Strict):
    r: int = Field(8, gt=0)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class QuantizationConfig(Strict):
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


class OptimizerConfig(Strict):
    name: Literal["adamw", "adafactor"] = "adamw"
    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)


class ScheduleConfig(Strict):
    """Cosine decay after a linear warm-up, down to min_lr_ratio x the peak."""

    warmup_steps: int | None = Field(None, ge=0)
    warmup_ratio: float | None = Field(None, ge=0, le=1)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)

    @model_validator(mode="after")
    def _one_warmup(self) -> ScheduleConfig:
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError("give warmup_steps or warmup_ratio, not both")
        return self


class TrainingConfig(Strict):
    epochs: float = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0)  # optimizer steps; overrides epochs when set
    micro_batch_size: int = Field(8, gt=0)  # packed rows per worker per forward
    grad_accum: int = Field(1, gt=0)
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: Literal[0, 1, 2, 3] = 3
    offload_optimizer: bool = False
    # ZeRO-3 keeps parameters smaller than this whole on every rank instead of gathering them
    # layer by layer (DeepSpeed's default is 1e5 elements).
    zero3_persistence_threshold: int = Field(100_000, ge=0)
    eval_every: int = Field(50, gt=0)
    checkpoint_every: int = Field(50, gt=0)
    log_every: int = Field(10, gt=0)
    eval_batches: int = Field(8, gt=0)
    seed: int = 0
    peak_tflops_per_device: float = Field(1.0, gt=0)  # for MFU: 989 for an H100 (bf16 dense)


class StageConfig(Strict):
    """One training stage: continual pre-training or fine-tuning."""

    method: Literal["full", "lora", "qlora"] = "lora"
    lora: LoraConfig = LoraConfig()
    quantization: QuantizationConfig = QuantizationConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    training: TrainingConfig = TrainingConfig()

    @model_validator(mode="after")
    def _method_fits_strategy(self) -> StageConfig:
        if self.method == "qlora" and self.training.strategy == "deepspeed":
            raise ValueError("qlora runs on the ddp strategy (4-bit weights are frozen; only adapters sync)")
        return self


class PretrainConfig(StageConfig):
    enabled: bool = False
    method: Literal["full", "lora", "qlora"] = "full"


class ScalingConfig(Strict):
    num_workers: int = Field(2, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    backend: Literal["gloo", "nccl"] = "gloo"
    max_failures: int = Field(0, ge=-1)
    # Torch threads per worker; None: the node's CPUs shared among the workers on it (Ray alone
    # would give a worker floor(cpus_per_worker), i.e. one thread for a half-CPU worker).
    threads_per_worker: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _backend_fits_device(self) -> ScalingConfig:
        if self.backend == "nccl" and not self.use_gpu:
            raise ValueError("backend nccl needs use_gpu: true (use gloo on CPU)")
        return self


class JudgeConfig(Strict):
    base_url: str | None = None  # any OpenAI-compatible API; the key comes from OPENAI_API_KEY
    model: str = "gpt-4o"
    concurrency: int = Field(16, gt=0)
    max_retries: int = Field(4, ge=0)  # per request, on 429 / 5xx / timeouts, with backoff
    timeout_s: float = Field(60, gt=0)
    price_per_million_input: float = 2.5  # USD, for the cost estimate (0 for a self-hosted judge)
    price_per_million_output: float = 10.0
    include_baselines: bool = True  # judge the no-model baselines too (honest, but costs calls)
    cache: str | None = None  # JSON Lines of answered prompts; default: <eval output>/judge_cache.jsonl


class EvaluationConfig(Strict):
    tasks: list[Literal["generation", "judge", "mcq", "decontamination", "forgetting", "grounding"]] = [
        "generation", "grounding"]
    max_examples: int | None = Field(None, gt=0)
    max_new_tokens: int = Field(64, gt=0)
    batch_size: int = Field(16, gt=0)
    # Local models run as Ray Data actors: keep CPUs free for the rest of the pipeline.
    num_actors: int = Field(1, gt=0)
    cpus_per_actor: float = Field(1, gt=0)
    gpus_per_actor: float = Field(0, ge=0)
    endpoint_concurrency: int = Field(8, gt=0)  # parallel requests to a model served over HTTP
    bertscore_model: str | None = None  # None: the offline MiniLM encoder
    bertscore_layer: int | None = Field(None, gt=0)  # None: the encoder's last layer
    judge: JudgeConfig = JudgeConfig()
    # PATH[#SPLIT] per benchmark file; empty: the public benchmarks in ../shared/data/mcqa if present
    mcq_files: list[str] = []
    mcq_limit: int | None = Field(None, gt=0)  # items per benchmark file, a stable sample by id
    mcq_modes: list[Literal["loglik", "generative"]] = ["loglik", "generative"]
    mcq_max_new_tokens: int = Field(256, gt=0)
    mcq_exact_match: bool = False  # for models tuned to answer with the letter only
    forgetting_file: str | None = None  # general benchmark; default: the non-medical MMLU subset
    forgetting_checkpoints: list[str] = []  # model or adapter directories (globs), in training order
    decontamination_threshold: float = Field(0.8, gt=0, le=1)
    decontamination_encoder: str | None = None  # sentence-transformers directory; None: MiniLM


class ServeConfig(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, gt=0, lt=65536)
    model_id: str = "medray-base"
    adapters: dict[str, str] = {}  # model id -> PEFT adapter directory
    models: dict[str, str] = {}  # model id -> fully fine-tuned model directory (replicas of its own)
    max_adapters_per_replica: int = Field(4, gt=0)
    max_batch_size: int = Field(8, gt=0)
    batch_wait_timeout_s: float = Field(0.02, ge=0)
    max_new_tokens_limit: int = Field(512, gt=0)
    load_in_4bit: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] | None = None  # None: model.dtype (CPUs lacking bf16: float32)
    api_key_env: str | None = None  # name of the env var holding the Bearer key, if any
    num_replicas: int = Field(1, gt=0)
    max_replicas: int | None = Field(None, gt=0)  # above num_replicas: autoscale between the two
    target_ongoing_requests: float | None = Field(None, gt=0)  # per replica when autoscaling; None: max_batch_size
    cpus_per_replica: float = Field(1, gt=0)
    gpus_per_replica: float = Field(0, ge=0)
    ingress_cpus: float = Field(0.25, ge=0)  # the HTTP ingress replicas only parse and route
    graceful_shutdown_timeout_s: float = Field(60, gt=0)  # a stopping replica finishes its answers first

    @model_validator(mode="after")
    def _replica_range(self) -> ServeConfig:
        if self.max_replicas is not None and self.max_replicas < self.num_replicas:
            raise ValueError("max_replicas must be at least num_replicas")
        return self


class SearchSpace(Strict):
    """What a sweep varies: LoRA rank, alpha as a multiple of the rank, the peak learning rate
    (log-uniform), and optionally the method. Prepared shards are packed at one length, so the
    packing length is not part of the space."""

    r: list[int] = [4, 8, 16, 32]
    alpha_multiple: list[float] = [1, 2]  # alpha = multiple x r
    lr: tuple[float, float] = (1e-5, 1e-3)  # log-uniform between the two
    method: list[Literal["lora", "qlora"]] = []  # empty: the recipe's method

    @field_validator("r", "alpha_multiple")
    @classmethod
    def _positive_choices(cls, choices: list) -> list:
        if not choices:
            raise ValueError("give at least one choice")
        if any(c <= 0 for c in choices):
            raise ValueError("choices must be positive")
        if len(set(choices)) != len(choices):
            raise ValueError("choices must be unique")
        return choices

    @field_validator("lr")
    @classmethod
    def _log_range(cls, lr: tuple[float, float]) -> tuple[float, float]:
        if not 0 < lr[0] < lr[1]:
            raise ValueError("expected [low, high] with 0 < low < high")
        return lr


class TrialBudget(Strict):
    """What one trial trains: cheaper than the final run if the recipe says so."""

    max_steps: int | None = Field(None, gt=0)  # None: the recipe's training.max_steps (or epochs)
    eval_every: int | None = Field(None, gt=0)  # None: the recipe's training.eval_every
    data_fraction: float = Field(1.0, gt=0, le=1)  # of the packed training rows
    num_workers: int = Field(1, gt=0)  # per trial; the global batch stays the recipe's (gradient accumulation)


class TuneConfig(Strict):
    """A Ray Tune sweep over the fine-tuning stage (see tune/)."""

    space: SearchSpace = SearchSpace()
    num_samples: int = Field(8, gt=0)
    metric: Literal["eval_loss", "rouge_l"] = "eval_loss"
    mode: Literal["min", "max"] | None = None  # None: min for eval_loss, max for rouge_l
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(10, gt=0)  # ASHA: steps every trial runs before it can be stopped
    reduction_factor: float = Field(2, gt=1)
    search_alg: Literal["optuna", "random"] = "optuna"
    max_concurrent_trials: int | None = Field(None, gt=0)  # None: as many as the cluster's CPUs/GPUs hold
    rouge_examples: int = Field(16, gt=0)  # held-out reports each trial generates for rouge_l
    trial: TrialBudget = TrialBudget()
    seed: int = 0

    @model_validator(mode="after")
    def _metric_fits_scheduler(self) -> TuneConfig:
        if self.metric == "rouge_l" and self.scheduler == "asha":
            raise ValueError("rouge_l is measured once a trial ends, so ASHA cannot stop on it: "
                             "use scheduler: fifo, or metric: eval_loss")
        return self

    @property
    def resolved_mode(self) -> str:
        return self.mode or ("min" if self.metric == "eval_loss" else "max")


class Recipe(Strict):
    name: str
    output_dir: str = "runs/default"  # local path or shared storage URI prefix
    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    pretrain: PretrainConfig = PretrainConfig()
    method: Literal["full", "lora", "qlora"] = "lora"
    lora: LoraConfig = LoraConfig()
    quantization: QuantizationConfig = QuantizationConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    training: TrainingConfig = TrainingConfig()
    scaling: ScalingConfig = ScalingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    serve: ServeConfig = ServeConfig()
    tune: TuneConfig = TuneConfig()

    @model_validator(mode="after")
    def _method_fits_strategy(self) -> Recipe:
        self.finetune_stage()  # validates the fine-tuning stage's combination of settings
        return self

    def finetune_stage(self) -> StageConfig:
        return StageConfig(method=self.method, lora=self.lora, quantization=self.quantization,
                           optimizer=self.optimizer, schedule=self.schedule, training=self.training)


# ----------------------------------------------------------------------------- loading


def shipped_recipes() -> dict[str, Path]:
    return {p.stem: p for p in RECIPES_DIR.glob("*.yaml")}


def _parse_value(text: str) -> Any:
    # `--set a.b=1e-4` means the number, `--set x=[4, 8]` the list: YAML's own scalar rules.
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(tree: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise RecipeError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set training.max_steps=100")
    key, _, value = assignment.partition("=")
    parts = key.strip().split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"--set {key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = _parse_value(value)


def format_validation_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"recipe {source}: {field}: {msg}{more}"


def load_recipe(recipe: str | Path | None = None, overrides: list[str] = ()) -> Recipe:
    """Load a recipe by shipped name or path, apply `a.b=value` overrides, and validate it."""
    recipe = recipe or DEFAULT_RECIPE
    shipped = shipped_recipes()
    path = shipped.get(str(recipe), Path(recipe))
    if not path.is_file():
        raise RecipeError(f"recipe {recipe}: no such file, and not a shipped recipe ({', '.join(sorted(shipped))})")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise RecipeError(f"recipe {path}:{where} is not valid YAML") from None
    if not isinstance(tree, dict):
        raise RecipeError(f"recipe {path}: the top level must be a mapping of sections")
    tree.setdefault("name", path.stem)
    for assignment in overrides:
        apply_override(tree, assignment)
    try:
        return Recipe.model_validate(tree)
    except ValidationError as err:
        raise RecipeError(format_validation_error(str(path), err)) from None


def dump_recipe(recipe: Recipe, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
