"""Serving: dynamic batching vs none, cold starts, a malformed-traffic load test, a replica kill.

Everything runs on a private Ray (2 CPUs) over HTTP on 127.0.0.1, against the embedded tiny
Llama of the `local` recipe served in float32 (random weights, so every answer runs to
max_tokens) and one LoRA adapter. In one run:

1. the app with batching (`serve.max_batch_size=16`) and the same app with batching off
   (`max_batch_size=1`, no wait), side by side; for each, the cold start of `serve.run` and of
   the adapter's first request, then throughput (generated tokens/s, requests/s) and p50/p99
   latency with 1, 4 and 16 concurrent openai clients, the two apps measured in turns (target:
   batching >= 4x at 16);
2. 1,000 requests from 16 clients, 10 % of them malformed: no 5xx, and a 4xx with a message for
   every malformed one;
3. the model replica is killed while 16 clients keep asking: Serve replaces it, and the service
   answers again.

The machine is shared: figures move with its load (printed first).

    .venv/bin/python benchmarks/bench_serve.py [--requests-per-client 4] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402
import openai  # noqa: E402

from pipelines.config import load_recipe  # noqa: E402
from pipelines.prompts import impression_messages  # noqa: E402
from pipelines.synthetic import make_report  # noqa: E402
from provenance import git_commit  # noqa: E402

# This CPU has no bfloat16 arithmetic (no AVX512-BF16/AMX): float32 serves faster here. Three
# quarters of a CPU per model replica lets both apps and their ingresses fit on 2 CPUs.
COMMON = ["serve.dtype=float32", "serve.cpus_per_replica=0.75"]
MODES = {"on": [*COMMON, "serve.max_batch_size=16"],
         "off": [*COMMON, "serve.max_batch_size=1", "serve.batch_wait_timeout_s=0"]}
ADAPTER = "impressions"
BASE = "medray-base"
# Every kind of request the API must refuse with a clear 4xx.
MALFORMED = [
    (b'{"model": "medray-base", "messages": [', "Invalid JSON"),
    (json.dumps({"model": BASE, "messages": []}).encode(), "messages"),
    (json.dumps({"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}).encode(), "does not exist"),
    (json.dumps({"model": BASE, "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6}).encode(),
     "max_tokens"),
    (json.dumps({"model": BASE, "messages": [{"role": "user", "content": "nodule " * 2000}]}).encode(),
     "context length"),
]


def findings(n: int) -> list[str]:
    """The findings of the first n synthetic reports that have some (a few are defective)."""
    out, i = [], 0
    while len(out) < n:
        text = make_report(i).findings
        if text:
            out.append(text)
        i += 1
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_models(root: Path) -> tuple[Path, Path]:
    """The local recipe's tiny Llama and tokenizer, and a LoRA adapter on it."""
    import torch
    from peft import LoraConfig, get_peft_model

    from pipelines.models import build_embedded_base, build_tiny_model, load_tokenizer

    recipe = load_recipe("local")
    corpus = [make_report(i).text for i in range(400)]
    base = build_embedded_base(recipe.model, corpus, root / "base")
    torch.manual_seed(1)
    model = build_tiny_model(recipe.model.tiny, load_tokenizer(base, recipe.model.chat_format))
    get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM",
                                     init_lora_weights=False)).save_pretrained(root / ADAPTER)
    return base, root / ADAPTER


def deploy(base: Path, adapter: Path, name: str, overrides: list[str]) -> float:
    """Deploy the app as /<name>; returns the seconds `serve.run` took (all replicas up)."""
    from ray import serve

    from serve.app import app

    recipe = load_recipe("local", overrides)
    start = time.perf_counter()
    serve.run(app({"recipe": recipe.model_dump(mode="json"), "model": str(base), "adapters": {ADAPTER: str(adapter)}}),
              name=name, route_prefix=f"/{name}")
    return time.perf_counter() - start


def ask(client: openai.OpenAI, model: str, findings: str, max_tokens: int) -> tuple[float, int]:
    start = time.perf_counter()
    reply = client.chat.completions.create(model=model, messages=impression_messages(findings), max_tokens=max_tokens,
                                           temperature=0)
    return time.perf_counter() - start, reply.usage.completion_tokens


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def throughput(client: openai.OpenAI, clients: int, per_client: int, max_tokens: int) -> dict:
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda f: ask(client, BASE, f, max_tokens), findings(clients * per_client)))
    wall = time.perf_counter() - start
    latencies = [r[0] for r in results]
    return {"clients": clients, "requests": len(results), "tokens_per_s": sum(r[1] for r in results) / wall,
            "requests_per_s": len(results) / wall, "p50_s": statistics.median(latencies),
            "p99_s": percentile(latencies, 0.99)}


def compare_batching(base: Path, adapter: Path, url: str, args) -> None:
    """Both apps deployed side by side, measured in turns: load from other users of the machine
    then falls on both alike. Each figure is the better of `--rounds` runs."""
    clients = {}
    for name, overrides in MODES.items():
        cold = deploy(base, adapter, name, overrides)
        clients[name] = openai.OpenAI(base_url=f"{url}/{name}/v1", api_key="unused", max_retries=0, timeout=600)
        first, *warm = findings(4)
        cold_adapter, _ = ask(clients[name], ADAPTER, first, 4)
        warm_adapter = statistics.median(ask(clients[name], ADAPTER, text, 4)[0] for text in warm)
        print(f"[{name}] serve.run cold start {cold:.1f} s; adapter's first request {cold_adapter:.2f} s "
              f"(then {warm_adapter:.2f} s)")
    best: dict[tuple[str, int], dict] = {}
    for _ in range(args.rounds):
        for n in (1, 4, 16):
            for name, client in clients.items():
                row = throughput(client, n, args.requests_per_client, args.max_tokens)
                if (name, n) not in best or row["tokens_per_s"] > best[name, n]["tokens_per_s"]:
                    best[name, n] = row
    print(f"\n{'app':>4} {'clients':>7} {'requests':>8} {'tok/s':>8} {'req/s':>7} {'p50 s':>7} {'p99 s':>7}")
    for (name, n), r in sorted(best.items()):
        print(f"{name:>4} {n:>7} {r['requests']:>8} {r['tokens_per_s']:>8.1f} {r['requests_per_s']:>7.2f} "
              f"{r['p50_s']:>7.2f} {r['p99_s']:>7.2f}")
    print("batching speed-up (tokens/s): " + ", ".join(
        f"{n} clients {best['on', n]['tokens_per_s'] / best['off', n]['tokens_per_s']:.1f}x" for n in (1, 4, 16)))


def post_one(http: httpx.Client, body: bytes) -> tuple[int, str]:
    try:
        r = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    except httpx.HTTPError as exc:
        return 0, type(exc).__name__
    if r.status_code < 400:
        return r.status_code, ""
    try:
        return r.status_code, r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return r.status_code, ""


def bodies(n: int, malformed_share: float, max_tokens: int) -> list[tuple[bytes, str | None]]:
    """n request bodies; every 1/share-th is malformed, with the words its error must contain."""
    every = round(1 / malformed_share)
    out = []
    for i, text in enumerate(findings(n)):
        if i % every == every - 1:
            out.append(MALFORMED[(i // every) % len(MALFORMED)])
        else:
            # Short questions: this measures the API's behaviour under load, not decoding speed.
            question = text.split(". ")[0]
            out.append((json.dumps({"model": ADAPTER if i % 3 else BASE, "max_tokens": max_tokens, "temperature": 0,
                                    "messages": [{"role": "user", "content": question}]}).encode(), None))
    return out


def load_test(url: str, n: int, clients: int, max_tokens: int) -> dict:
    work = bodies(n, 0.1, max_tokens)
    with httpx.Client(base_url=url, timeout=300) as http, ThreadPoolExecutor(clients) as pool:
        start = time.perf_counter()
        answers = list(pool.map(lambda item: post_one(http, item[0]), work))
        wall = time.perf_counter() - start
    statuses = Counter(status for status, _ in answers)
    malformed = [(answer, words) for answer, (_, words) in zip(answers, work) if words]
    clear = sum(400 <= status < 500 and words in message for (status, message), words in malformed)
    return {"requests": n, "seconds": wall, "statuses": dict(statuses), "malformed": len(malformed),
            "malformed_with_clear_4xx": clear, "5xx": sum(v for k, v in statuses.items() if k >= 500 or k == 0)}


def kill_during_load(url: str, app: str, clients: int, seconds: float, max_tokens: int) -> dict:
    """`clients` keep asking; after `seconds` the app's model replica is killed; the clients go on
    until a request sent after the kill is answered (at most 5 minutes), then `seconds` more."""
    import ray

    stop, log, lock = threading.Event(), [], threading.Lock()
    questions = [text.split(". ")[0] for text in findings(100)]

    def client_loop(k: int) -> None:
        with httpx.Client(base_url=url, timeout=300) as http:
            i = 0
            while not stop.is_set():
                body = json.dumps({"model": BASE, "max_tokens": max_tokens, "temperature": 0, "messages": [
                    {"role": "user", "content": questions[(k * 7 + i) % len(questions)]}]}).encode()
                sent = time.perf_counter()
                status, _ = post_one(http, body)
                with lock:
                    log.append((sent, time.perf_counter(), status))
                i += 1

    def engine_replicas() -> list[dict]:
        return [a for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith(f"SERVE_REPLICA::{app}#Engine#")]

    threads = [threading.Thread(target=client_loop, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    victim = engine_replicas()[0]
    killed_at = time.perf_counter()
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    recovered = None
    while recovered is None and time.perf_counter() - killed_at < 300:
        time.sleep(1)
        with lock:
            recovered = next((end - killed_at for sent, end, status in log if sent > killed_at and status == 200), None)
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(timeout=300)
    after = Counter(status for sent, end, status in log if end > killed_at)
    return {"requests": len(log), "statuses": dict(Counter(status for _, _, status in log)),
            "statuses_after_kill": dict(after), "recovered_s": recovered,
            "replaced": victim["name"] not in {a["name"] for a in engine_replicas()} and bool(engine_replicas())}



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=48, help="per answer (the evaluation job's default)")
    parser.add_argument("--load-requests", type=int, default=1000)
    parser.add_argument("--kill-seconds", type=float, default=20, help="load before the kill and after recovery")
    parser.add_argument("--rounds", type=int, default=2, help="throughput runs per setting; the best counts")
    args = parser.parse_args()

    import ray
    from ray import serve

    print(f"commit {git_commit()}, {platform.platform()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d %H:%M')}")
    temp = tempfile.mkdtemp(prefix="medray-bench-serve-")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20, _temp_dir=temp,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}}, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    try:
        base, adapter = build_models(Path(temp) / "models")
        compare_batching(base, adapter, url, args)
        serve.delete("off")  # the rest runs against the batching app alone

        load = load_test(f"{url}/on", args.load_requests, 16, 8)
        print(f"\nload test: {load['requests']} requests from 16 clients in {load['seconds']:.1f} s, statuses "
              f"{load['statuses']}; malformed {load['malformed']}, answered with a clear 4xx "
              f"{load['malformed_with_clear_4xx']}; 5xx or connection errors {load['5xx']}")
        kill = kill_during_load(f"{url}/on", "on", 16, args.kill_seconds, 8)
        recovered = "never" if kill["recovered_s"] is None else f"{kill['recovered_s']:.1f} s"
        print(f"replica kill: {kill['requests']} requests, statuses {kill['statuses']} (answered after the kill: "
              f"{kill['statuses_after_kill']}); a request sent after the kill answered {recovered} after it; "
              f"replica replaced: {kill['replaced']}")
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
