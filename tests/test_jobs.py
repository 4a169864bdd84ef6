"""Ray Jobs for real: a private multi-node Ray cluster started with `ray start`, the data and
training steps submitted to it as jobs, and training spread over two nodes.

The cluster is this module's own: its own temp dir and free ports on loopback, stopped by process
(never `ray stop`, which would stop every Ray on the machine). Two raylets on one machine stand in
for two machines; the output directory stands in for the shared storage a real cluster mounts.

"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}

# Two workers of 1.6 CPUs cannot share the 3-CPU head, so the second one must go to another node;
# the head keeps 1.4 CPUs for the Ray Data reads that feed the workers.
HEAD_CPUS, NODE_CPUS, CPUS_PER_WORKER = 3, 2, 1.6
CHECKPOINT_EVERY = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env() -> dict[str, str]:
    """Ray's processes (and the jobs they run) use this venv's python, without token auth."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    return env


def wait_until(check: Callable[[], object], timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class PrivateCluster:
    temp_dir: Path
    gcs_address: str
    dashboard: str
    nodes: dict[str, subprocess.Popen] = field(default_factory=dict)
    node_cpus: dict[str, int] = field(default_factory=dict)

    @classmethod
    def start_head(cls, temp_dir: Path, num_cpus: int) -> PrivateCluster:
        # Every port chosen here: Ray's fixed defaults would collide with other Rays on this machine.
        port, dashboard_port = free_port(), free_port()
        started = subprocess.run(
            [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
             f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
             f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
            env=ray_env(), capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stderr[-3000:]
        return cls(temp_dir, f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}")

    def add_node(self, name: str, num_cpus: int) -> None:
        """Another raylet joined to the head, in the foreground so that we own its processes."""
        with open(self.temp_dir / f"{name}.log", "a") as log:
            self.nodes[name] = subprocess.Popen(
                [str(BIN / "ray"), "start", "--block", f"--address={self.gcs_address}",
                 "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}", f"--resources={json.dumps({name: 1})}",
                 f"--dashboard-agent-listen-port={free_port()}"],
                env=ray_env(), stdout=log, stderr=subprocess.STDOUT)
        self.node_cpus[name] = num_cpus

    def alive_nodes(self) -> dict[str, str]:
        """Node name ("head" or the name given to add_node) -> node id, for the alive nodes."""
        from ray.util.state import list_nodes

        names = {}
        for node in list_nodes(address=self.dashboard):
            if node.state != "ALIVE":
                continue
            named = [r for r in node.resources_total if r in self.nodes]
            names["head" if node.is_head_node else named[0] if named else node.node_id] = node.node_id
        return names

    def wait_for_nodes(self, *names: str, timeout: float = 120) -> dict[str, str]:
        restarted: set[str] = set()

        def joined() -> dict[str, str] | None:
            for name in set(names) & set(self.nodes):
                if self.nodes[name].poll() is None:
                    continue
                # A loaded machine can make a raylet miss its start-up deadline: one more try.
                log = (self.temp_dir / f"{name}.log").read_text()[-3000:]
                assert name not in restarted, f"node {name} exited with {self.nodes[name].returncode}:\n{log}"
                restarted.add(name)
                self.add_node(name, self.node_cpus[name])
            alive = self.alive_nodes()
            return alive if set(names) <= set(alive) else None

        return wait_until(joined, timeout, f"nodes {names} to join")

    def kill_raylet(self, name: str) -> None:
        """SIGKILL the node's raylet, as a crashed machine; `ray start --block` then ends the rest."""
        raylet = [p for p in psutil.Process(self.nodes[name].pid).children() if p.name() == "raylet"]
        assert raylet, f"node {name} has no raylet"
        raylet[0].kill()
        self.nodes[name].wait(timeout=60)

    def stop(self) -> None:
        """End every process of this cluster and nothing else: those naming our temp dir, the nodes
        we started, and all their descendants (workers rename themselves, so cmdlines miss them)."""
        me = os.getpid()
        roots = [p for p in psutil.process_iter(["cmdline"])
                 if p.pid != me and str(self.temp_dir) in " ".join(p.info["cmdline"] or [])]
        roots += [psutil.Process(p.pid) for p in self.nodes.values() if p.poll() is None]
        procs: dict[int, psutil.Process] = {}
        for root in roots:
            try:
                procs.update({p.pid: p for p in [root, *root.children(recursive=True)]})
            except psutil.NoSuchProcess:
                continue
        for proc in procs.values():
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(list(procs.values()), timeout=5)
        for proc in alive:
            proc.kill()
        for popen in self.nodes.values():
            popen.wait(timeout=30)


@pytest.fixture(scope="module")
def cluster():
    # A short private temp dir: Ray's socket paths inside it must stay under 108 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="medray-jobs-"))
    cluster = None
    try:
        cluster = PrivateCluster.start_head(temp_dir, HEAD_CPUS)
        cluster.add_node("node_b", NODE_CPUS)
        yield cluster
    finally:
        if cluster:
            cluster.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def client(cluster):
    return wait_until(lambda: _try_client(cluster.dashboard), 60, "the dashboard")


def _try_client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except ConnectionError:
        return None


def runtime_env() -> dict:
    """The shipped runtime env, with the checkout as working_dir (as `--working-dir .` does)."""
    env = yaml.safe_load((ROOT / "platform" / "runtime_env.yaml").read_text())
    return {**env, "working_dir": str(ROOT)}


def job_status(client, job_id: str) -> str:
    return str(client.get_job_status(job_id).value)


def wait_for_job(client, job_id: str, timeout: float) -> tuple[str, str]:
    """Follow a job to its end; its status and logs (a job still running after `timeout` fails)."""
    try:
        status = wait_until(lambda: (s := job_status(client, job_id)) in TERMINAL and s, timeout,
                            f"job {job_id}", interval=1)
    except TimeoutError as exc:
        pytest.fail(f"{exc}; its logs end with:\n{client.get_job_logs(job_id)[-4000:]}")
    return status, client.get_job_logs(job_id)


@pytest.fixture(scope="module")
def prepared(cluster, client, tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("job") / "data"
    job = client.submit_job(
        entrypoint=f"python -m pipelines.prepare --output {data} --set data.synthetic.num_reports=300 "
                   "--set pretrain.enabled=false",
        runtime_env=runtime_env())
    status, logs = wait_for_job(client, job, timeout=420)
    assert status == "SUCCEEDED", logs[-4000:]
    return data


def test_prepare_job_writes_a_reconciled_manifest(prepared):
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["rows_read"] == 300 == manifest["rows_kept"] + manifest["rows_rejected"]
    assert manifest["packed"]["sft/train"]["rows"] > 0
    assert (prepared / "base_model" / "config.json").is_file()


def latest_checkpoint_step(results: Path) -> int | None:
    """The step of the newest checkpoint Ray Train has registered (its snapshot), if any."""
    for snapshot in results.glob("*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
        except json.JSONDecodeError:  # being rewritten right now
            return None
        if latest:
            return latest["metrics"]["step"]
    return None


def train_worker_nodes(cluster: PrivateCluster, client, job: str, state: str | None = None) -> list[str]:
    """Node ids of the job's Ray Train workers (dead ones included unless `state` is given)."""
    from ray.util.state import list_actors

    job_id = client.get_job_info(job).job_id
    workers = list_actors(address=cluster.dashboard, filters=[("class_name", "=", "RayTrainWorker")], detail=True)
    return [a.node_id for a in workers if a.job_id == job_id and state in (None, a.state)]


def submit_training(client, data: Path, out: Path, max_steps: int, max_failures: int = 0) -> str:
    return client.submit_job(
        entrypoint=f"python -m pipelines.train --data {data} --output {out} --set pretrain.enabled=false "
                   f"--set training.max_steps={max_steps} --set training.checkpoint_every={CHECKPOINT_EVERY} "
                   f"--set training.log_every=1 --set scaling.num_workers=2 "
                   f"--set scaling.cpus_per_worker={CPUS_PER_WORKER} --set scaling.max_failures={max_failures}",
        runtime_env=runtime_env())


def assert_valid_adapter(out: Path, steps: int) -> None:
    metrics = [json.loads(line) for line in (out / "finetune" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == steps
    adapter = out / "finetune" / "model"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0


def test_training_spans_two_nodes_and_resumes_after_losing_one(cluster, client, prepared):
    """Two workers that cannot share a node train on head + node_b. After the first checkpoint
    node_b's raylet is killed: its worker dies, the survivor is stopped, and Ray Train restarts
    the group (FailureConfig max_failures=1) once a replacement node joins, as an autoscaler would
    provide one. The run resumes from that checkpoint and finishes with a valid adapter."""
    out, max_steps = prepared.parent / "train-node-loss", 4 * CHECKPOINT_EVERY
    job = submit_training(client, prepared, out, max_steps=max_steps, max_failures=1)
    nodes = cluster.wait_for_nodes("head", "node_b")

    def checkpointed() -> int | None:
        if (status := job_status(client, job)) in TERMINAL:
            pytest.fail(f"job {status} before its first checkpoint:\n{client.get_job_logs(job)[-4000:]}")
        return latest_checkpoint_step(out / "ray_results")

    checkpoint_step = wait_until(checkpointed, 420, "the first checkpoint", interval=0.25)
    assert sorted(train_worker_nodes(cluster, client, job, "ALIVE")) == sorted([nodes["head"], nodes["node_b"]])
    cluster.kill_raylet("node_b")
    cluster.add_node("node_c", NODE_CPUS)
    node_c = cluster.wait_for_nodes("node_c")["node_c"]

    status, logs = wait_for_job(client, job, timeout=420)
    assert status == "SUCCEEDED", logs[-4000:]
    resumed = re.search(r"resumed at step (\d+)", logs)
    assert resumed, logs[-4000:]
    assert checkpoint_step <= int(resumed.group(1)) < max_steps and int(resumed.group(1)) % CHECKPOINT_EVERY == 0
    assert set(train_worker_nodes(cluster, client, job)) == {nodes["head"], nodes["node_b"], node_c}
    assert_valid_adapter(out, max_steps)
