"""What one Ray Train worker runs: build the method, resume, stream packed batches, step, report.

The same function runs the tiny Llama on two CPU processes (gloo) and Llama-3-70B on H100
nodes (NCCL); only the recipe differs. The method (DeepSpeed ZeRO or DDP, see
`pipelines.train_methods`) hides how a step is taken; `pipelines.train_data` keeps the data
position exact across restarts; `pipelines.train_checkpoint` saves and restores both.
"""

from __future__ import annotations

import torch

from pipelines.config import ModelConfig, StageConfig
from pipelines.train_checkpoint import TrainState, report_checkpoint, report_final, restore
from pipelines.train_data import micro_batches
from pipelines.train_methods import build_method, packed_loss
from pipelines.train_metrics import RunLog, say


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    stage = StageConfig.model_validate(config["stage"])
    model_cfg = ModelConfig.model_validate(config["model"])
    t = stage.training
    total_steps = config["total_steps"]
    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(worker_threads(config["threads_per_worker"]))
    torch.manual_seed(t.seed)
    device = ray.train.torch.get_device()

    method = build_method(config["base_path"], stage, model_cfg, total_steps, device)
    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = restore(directory, method, rank)
        if rank == 0:
            say(f"[{config['stage_name']}] resumed at step {state.step} (epoch {state.position.epoch}, "
                f"micro-batch {state.position.batches_in_epoch})")
    log = RunLog(config["metrics_path"], config["stage_name"], total_steps, rank, config["flops_per_token"],
                 t.peak_tflops_per_device * 1e12)
    log.rewind(state.step, state.position)
    batches = micro_batches(ray.train.get_dataset_shard("train"), state.position, t.micro_batch_size, device)
    eval_batches = EvalBatches(ray.train.get_dataset_shard("eval"), t.micro_batch_size, t.eval_batches, device) \
        if config["has_eval"] else None

    metrics: dict = {}
    while state.step < total_steps:
        loss, grad_norm = method.train_step([next(batches) for _ in range(t.grad_accum)])
        state.step += 1
        last = state.step == total_steps
        logged = state.step % t.log_every == 0 or last
        evaluated = eval_batches is not None and (state.step % t.eval_every == 0 or last)
        metrics = log.measure(state.step, loss, grad_norm, method.lr(), state.position) if logged \
            else {"step": state.step, "loss": loss}
        with log.paused():
            if evaluated:
                metrics["eval_loss"] = evaluate(method.model, eval_batches(), device)
            if logged or evaluated:
                log.write(metrics)
            if state.step % t.checkpoint_every == 0 and not last:
                report_checkpoint(metrics, state, method, rank)
            elif evaluated:
                ray.train.report(metrics)
    report_final(metrics, method, rank)


def worker_threads(threads_per_worker: int | None) -> int:
    """Torch threads: the recipe's number, else this node's CPUs shared by its workers."""
    if threads_per_worker:
        return threads_per_worker
    import ray
    import ray.train

    node_id = ray.get_runtime_context().get_node_id()
    cpus = next(n["Resources"].get("CPU", 1) for n in ray.nodes() if n["NodeID"] == node_id)
    return max(1, int(cpus) // ray.train.get_context().get_local_world_size())


class EvalBatches:
    """The first `count` micro-batches of this worker's eval shard, read once and kept: the eval
    set does not change, and every pass over a Ray Data shard restarts its pipeline."""

    def __init__(self, shard, batch_size: int, count: int, device: torch.device):
        self.shard, self.batch_size, self.count, self.device = shard, batch_size, count, device
        self.batches: list[dict] | None = None

    def __call__(self) -> list[dict]:
        if self.batches is None:
            self.batches = []
            for batch in self.shard.iter_torch_batches(batch_size=self.batch_size, dtypes=torch.long,
                                                       device=self.device):
                if len(self.batches) == self.count:
                    break
                self.batches.append(batch)
        return self.batches


@torch.no_grad()
def evaluate(model, batches: list[dict], device: torch.device) -> float | None:
    """Token-weighted loss over this worker's eval micro-batches, summed over all workers."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in batches:
        loss, n = packed_loss(model, batch)
        total += torch.tensor([float(loss) * n, n], dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    if was_training:
        model.train()
    return float(total[0] / total[1]) if total[1] else None
