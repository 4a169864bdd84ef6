"""Data-preparation benchmark: end-to-end throughput against the raw tokenizer, scale, memory.

1. Ratio: `pipelines.prepare` on N synthetic reports read from a JSON Lines file (the radiology
   study's data settings: impression task, de-identification, filters, de-duplication, split,
   templating, tokenization, packing at 2,048), against the same tokenizer encoding the same
   report texts as one batch on the same cores (rayon threads), measured before and after the
   pipeline in the same run. Both use a fixed tokenizer (model.path), as production recipes do.
   N defaults to 100,000: the pipeline is meant for millions of reports, and its fixed costs
   (starting each Ray Data pass and its workers' tasks, the selection between the passes,
   packing, the manifest: several seconds on 2 cores) are a quarter or more of a 20,000-report
   run and would understate the rate a real corpus gets. The tokenizer still encodes exactly
   the texts the pipeline reads.
2. Where the time goes: CPU milliseconds per row of each stage in one process, without Ray.
3. Scale: rows/s, CPU per row and peak memory of the whole run (driver + Ray processes, summed
   RSS, and the driver alone) at each --scale size of synthetic reports generated in the pipeline.

On a shared machine wall times follow the neighbours' load; the CPU seconds of the driver and
every Ray process are reported beside them.

    .venv/bin/python benchmarks/bench_prepare.py [--rows 100000] [--scale 100000 1000000] [--cpus 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import psutil

from provenance import git_commit

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


class TreeMonitor:
    """Peak summed RSS of this process and its descendants (the local Ray), peak RSS of this
    process, and the CPU seconds the tree used: on a shared machine, CPU time is what stays
    comparable when wall time depends on the neighbours' load."""

    def __init__(self, every: float = 0.5):
        self.peak_tree = self.peak_driver = 0
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self._stop = threading.Event()
        self._sample()
        self.first = dict(self.last)
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                with proc.oneshot():
                    total += proc.memory_info().rss
                    times = proc.cpu_times()
                    self.last[proc.pid] = times.user + times.system
            except psutil.Error:
                pass
        self.peak_tree = max(self.peak_tree, total)
        self.peak_driver = max(self.peak_driver, me.memory_info().rss)

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            self._sample()

    def stop(self) -> tuple[float, float, float]:
        """(peak tree RSS GiB, peak driver RSS GiB, CPU seconds used since the start)."""
        self._stop.set()
        self._thread.join()
        self._sample()
        cpu = sum(t - self.first.get(pid, 0.0) for pid, t in self.last.items())
        return self.peak_tree / 2**30, self.peak_driver / 2**30, cpu


def tokenizer_rate(tokenizer, texts: list[str]) -> tuple[float, float]:
    """(rows/s, CPU ms per row) of the tokenizer's batch encoding over `texts` (best of 2)."""
    best, cpu = float("inf"), float("inf")
    for _ in range(2):
        start, start_cpu = time.perf_counter(), time.process_time()
        for i in range(0, len(texts), 2000):
            tokenizer(texts[i:i + 2000], add_special_tokens=False)
        best = min(best, time.perf_counter() - start)
        cpu = min(cpu, time.process_time() - start_cpu)
    return len(texts) / best, 1e3 * cpu / len(texts)


def stage_profile(path: Path, base: Path, rows: int) -> dict[str, float]:
    """CPU ms per row of each stage on the first `rows` rows, one process, no Ray."""
    import numpy as np
    import pyarrow as pa

    from pipelines import data_stages
    from pipelines.deid import Deidentifier
    from pipelines.models import load_tokenizer
    from pipelines.sections import extract_sections

    lines = path.read_text().splitlines()[:rows]
    sample = path.with_name("sample.jsonl")
    sample.write_text("\n".join(lines) + "\n")
    texts = [json.loads(line)["text"] for line in lines]

    def cpu(fn):
        start = time.process_time()
        result = fn()
        return result, 1e3 * (time.process_time() - start) / len(lines)

    tok = load_tokenizer(base, "llama3")
    _, tokenizer = cpu(lambda: tok(texts, add_special_tokens=False))
    spec = {"s": {"task": "impression", "columns": {}, "text_column": None}}
    raw, read = cpu(lambda: pa.concat_tables(list(data_stages.read_files_batch(
        pa.table({"id": [0]}), [(str(sample), "s")], spec, "utf-8", 10**6, 1024))))
    cleaned, clean = cpu(lambda: data_stages.clean_batch(raw, True, 10, 0.001, 0.0005))
    deid = Deidentifier()
    redacted, deid_ms = cpu(lambda: [deid.redact(t)[0] for t in texts])
    _, sections = cpu(lambda: [extract_sections(t) for t in redacted])
    selected = data_stages.select_batch(cleaned, np.array([], np.uint64), {})
    _, encode = cpu(lambda: data_stages.encode_batch(selected, str(base), "llama3", 0.3, 2048, "truncate", True, []))
    return {"tokenizer alone": tokenizer, "read": read, "clean": clean, "  of which deid": deid_ms,
            "  of which sections": sections, "encode": encode}


def build_base(folder: Path, texts: list[str]) -> Path:
    from pipelines.config import ModelConfig
    from pipelines.models import build_embedded_base

    return build_embedded_base(ModelConfig(), iter(texts), folder / "base")


def warm_workers(base: Path, count: int) -> None:
    """Start `count` Ray workers side by side and load what the stages load (transformers, the
    tokenizer, the de-identifier's patterns): a long run pays this once per worker, so the
    timed runs should not. A cold start costs each worker several CPU seconds."""
    import ray

    @ray.remote(num_cpus=1)
    def warm(path: str) -> int:
        from pipelines import data_stages

        data_stages._tokenizer(path, "llama3")
        data_stages._deidentifier()
        time.sleep(2)  # keep this worker busy so that the next call starts another
        return os.getpid()

    ray.get([warm.remote(str(base)) for _ in range(count)])


def run_prepare(overrides: list[str], out: Path) -> tuple[dict, float, tuple[float, float, float]]:
    from pipelines.config import load_recipe
    from pipelines.prepare import prepare

    recipe = load_recipe("local", overrides)
    watch = TreeMonitor()
    start = time.perf_counter()
    manifest = prepare(recipe, output=out)
    wall = time.perf_counter() - start
    return manifest, wall, watch.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="reports for the ratio run")
    parser.add_argument("--scale", type=int, nargs="*", default=[100_000, 1_000_000],
                        help="synthetic report counts for the scale runs (none: skip)")
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()

    import ray

    from pipelines.models import load_tokenizer
    from pipelines.synthetic import write_reports

    commit = git_commit()
    print(f"# bench_prepare  {date.today()}  commit {commit}  Python {platform.python_version()}  "
          f"{args.cpus} CPUs for Ray, {os.cpu_count()} on the machine, load average "
          f"{os.getloadavg()[0]:.1f} at start")
    work = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    reports = work / "reports.jsonl"
    write_reports(reports, args.rows, seed=0)
    texts = [json.loads(line)["text"] for line in reports.open()]
    base = build_base(work, texts[:5000])
    # Study settings (radiology recipe's data section) on the tiny model's tokenizer.
    study = ["pretrain.enabled=false", f"model.path={base}", "data.pack_length=2048", "data.pack_window=2000",
             "data.splits={eval: 0.001, test: 0.0005}", "data.lead_in_probability=0.5"]
    megabytes = sum(len(t.encode()) for t in texts) / 1e6

    print(f"\n## 1. End to end vs the raw tokenizer: {args.rows} reports, {megabytes:.1f} MB of report text")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    tok = load_tokenizer(base, "llama3")
    before, before_cpu = tokenizer_rate(tok, texts)
    ray.init(num_cpus=args.cpus, include_dashboard=False, object_store_memory=512 * 2**20,
             _temp_dir=tempfile.mkdtemp(prefix="medray-ray-"),
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    warm_workers(base, args.cpus)
    run_prepare([*study, "data.synthetic.num_reports=2000"], work / "warm-up")  # Ray Data's own actors
    manifest, wall, (_, _, cpu) = run_prepare([*study, f"data.inputs=[{reports}]"], work / "ratio")
    after, after_cpu = tokenizer_rate(tok, texts)
    tokenizer, tokenizer_cpu = (before + after) / 2, (before_cpu + after_cpu) / 2
    rows = manifest["rows_read"]
    pipeline, pipeline_cpu = rows / wall, 1e3 * cpu / rows
    print(f"raw tokenizer, batch of the report texts : {tokenizer:9.0f} rows/s  ({before:.0f} before, "
          f"{after:.0f} after the pipeline); {tokenizer_cpu:.3f} CPU ms/row")
    print(f"prepare, end to end                      : {pipeline:9.0f} rows/s  ({wall:.1f} s; stages "
          f"{manifest['stage_seconds']}); {pipeline_cpu:.3f} CPU ms/row (driver + every Ray process)")
    print(f"ratio prepare / tokenizer, wall          : {pipeline / tokenizer:9.3f}   (target >= 0.5)")
    print(f"ratio prepare / tokenizer, CPU time      : {tokenizer_cpu / pipeline_cpu:9.3f}   (what the wall ratio "
          "would be on an otherwise idle machine)")
    print(f"kept {manifest['rows_kept']} of {manifest['rows_read']}: {manifest['rejects_by_reason']}; "
          f"sft/train efficiency {manifest['packed']['sft/train']['efficiency']}")

    print("\n## 2. Where the time goes: CPU ms per row, one process, no Ray (first 2000 reports)")
    profile = stage_profile(reports, base, 2000)
    for name, ms in profile.items():
        print(f"  {name:22} {ms:7.3f}")
    work_ms = profile["read"] + profile["clean"] + profile["encode"]
    print(f"  ratio with no overhead at all: tokenizer / (read + clean + encode) = "
          f"{profile['tokenizer alone'] / work_ms:.3f}")

    if args.scale:
        print("\n## 3. Scale: synthetic reports generated in the pipeline (same settings)")
        print(f"{'reports':>10} {'wall s':>9} {'rows/s':>9} {'CPU ms/row':>11} {'peak RSS, driver + Ray':>24} "
              f"{'driver':>8}")
        for n in args.scale:
            manifest, wall, (tree, driver, cpu) = run_prepare([*study, f"data.synthetic.num_reports={n}"],
                                                              work / f"scale-{n}")
            print(f"{n:>10} {wall:9.1f} {n / wall:9.0f} {1e3 * cpu / n:11.3f} {tree:21.2f} GiB {driver:6.2f} GiB   "
                  f"stages {manifest['stage_seconds']}", flush=True)
            shutil.rmtree(work / f"scale-{n}")
    ray.shutdown()
    shutil.rmtree(work)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
