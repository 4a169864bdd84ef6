"""Judge throughput: sequential vs concurrent calls against a local OpenAI-compatible server.

The server answers every chat completion after a fixed 0.2 s, like a remote judge whose latency
dominates. 64 items are judged with concurrency 1 and then 16 (no cache); the ratio of
throughputs is what bounded concurrency buys (target >= 8x).

    .venv/bin/python benchmarks/bench_judge.py
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from pipelines.judge import JudgeItem, judge_all_sync

ANSWER = json.dumps({
    "id": "bench", "object": "chat.completion", "created": 0, "model": "bench-judge",
    "choices": [{"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "Score: 7\nExplanation: close."}}],
    "usage": {"prompt_tokens": 400, "completion_tokens": 15, "total_tokens": 415},
}).encode()


def serve(latency: float) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as a real API server
        disable_nagle_algorithm = True  # headers and body go out as separate writes

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(latency)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(ANSWER)))
            self.end_headers()
            self.wfile.write(ANSWER)

        def log_message(self, *args):
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 128  # the default backlog of 5 drops bursts of 16 connects

    httpd = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()

    httpd = serve(args.latency)
    base_url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    items = [JudgeItem(f"i{n}", "No acute cardiopulmonary process.", f"No acute disease ({n}).")
             for n in range(args.items)]
    throughput = {}
    for concurrency in (1, args.concurrency):
        started = time.perf_counter()
        result = judge_all_sync(items, base_url=base_url, model="bench-judge",
                                concurrency=concurrency, max_retries=0)
        elapsed = time.perf_counter() - started
        assert result.usage.calls == args.items and not result.missing
        throughput[concurrency] = args.items / elapsed
        print(f"concurrency {concurrency:>2}: {args.items} items in {elapsed:6.2f} s "
              f"= {throughput[concurrency]:6.1f} items/s")
    httpd.shutdown()
    ratio = throughput[args.concurrency] / throughput[1]
    print(f"speed-up x{ratio:.1f} (target >= 8; ideal {args.concurrency} at "
          f"{args.latency:.1f} s server latency)")


if __name__ == "__main__":
    main()
