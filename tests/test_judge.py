"""The judge against a real local HTTP server that speaks OpenAI chat-completions JSON."""

import json
import logging
import re
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipelines.judge import (
    JudgeItem, Pricing, build_messages, judge_all_sync, parse_judgment, public_endpoint,
    resolve_api_key,
)

SECRET_KEY = "sk-test-DO-NOT-LEAK-0123456789"
MODEL = "judge-model"


def completion(content: str, prompt_tokens: int = 100, completion_tokens: int = 20) -> bytes:
    return json.dumps({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": MODEL,
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }).encode()


GOOD = "Score: 8\nExplanation: Captures the effusion, misses the granuloma."


def scripted(case: str, attempt: int, auth: str):
    """(status, headers, body, delay) for the `attempt`-th request of a case."""
    ok = (200, {}, completion(GOOD), 0.0)
    if case == "good":
        return ok
    if case == "markdown":
        return 200, {}, completion("**Score:** 7/10\n**Explanation:** Fine."), 0.0
    if case == "garbage":
        return 200, {}, completion("I am not able to grade this."), 0.0
    if case == "out-of-range":
        return 200, {}, completion("Score: 12\nExplanation: Superb."), 0.0
    if case == "truncated":
        return 200, {}, completion(GOOD)[:60], 0.0
    if case == "rate-limited":
        return (429, {"Retry-After": "1"}, b'{"error": {"message": "slow down"}}', 0.0) if attempt == 1 else ok
    if case == "flaky":
        return (500, {}, b'{"error": {"message": "boom"}}', 0.0) if attempt == 1 else ok
    if case == "broken":
        return 500, {}, b'{"error": {"message": "boom"}}', 0.0
    if case == "slow":
        return (200, {}, completion(GOOD), 4.0) if attempt == 1 else ok
    if case == "unauthorized":  # some servers echo the key they were given
        return 401, {}, json.dumps({"error": {"message": f"bad key {auth}"}}).encode(), 0.0
    if case == "busy":
        return 200, {}, completion(GOOD), 0.2
    raise AssertionError(case)


class FakeOpenAIServer:
    def __init__(self):
        self.attempts: Counter[str] = Counter()
        self.auth_headers: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                assert self.path == "/v1/chat/completions"
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                case = re.search(r"\[\[(.+?)\]\]", body["messages"][-1]["content"]).group(1)
                auth = self.headers.get("Authorization", "")
                with server._lock:
                    server.attempts[case] += 1
                    server.auth_headers.append(auth)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    attempt = server.attempts[case]
                try:
                    status, headers, payload, delay = scripted(case, attempt, auth)
                    time.sleep(delay)
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on a slow answer
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 64  # the default backlog of 5 drops bursts of connects

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def item(case: str, n: int = 0) -> JudgeItem:
    return JudgeItem(id=f"{case}-{n}", expected="Small right pleural effusion. Calcified granuloma.",
                     generated=f"Right pleural effusion. [[{case}]] #{n}")


CASES = ["good", "markdown", "garbage", "out-of-range", "truncated", "rate-limited", "flaky",
         "broken", "slow", "unauthorized"]


@pytest.fixture(scope="module")
def scripted_run(tmp_path_factory):
    cache = tmp_path_factory.mktemp("judge") / "cache.jsonl"
    mp = pytest.MonkeyPatch()
    mp.setenv("OPENAI_API_KEY", SECRET_KEY)
    with FakeOpenAIServer() as server:
        started = time.perf_counter()
        result = judge_all_sync(
            [item(c) for c in CASES], base_url=server.base_url, model=MODEL, concurrency=16,
            cache_path=cache, pricing=Pricing(input_per_1m=2.5, output_per_1m=10.0),
            max_retries=2, timeout=2.0,
        )
        elapsed = time.perf_counter() - started
        yield server, result, cache, elapsed
    mp.undo()


def by_id(result):
    return {j.id: j for j in result.judgments}


def test_good_and_markdown_answers_are_scored(scripted_run):
    _, result, _, _ = scripted_run
    j = by_id(result)
    assert j["good-0"].score == 8.0 and j["good-0"].explanation.startswith("Captures")
    assert j["markdown-0"].score == 7.0 and j["markdown-0"].explanation == "Fine."


def test_bad_answers_are_missing_never_zero(scripted_run):
    _, result, _, _ = scripted_run
    assert result.missing == {
        "garbage-0": "no score in answer",
        "out-of-range-0": "score outside 0-10",
        "truncated-0": "malformed response",
        "broken-0": "HTTP 500",
        "unauthorized-0": "HTTP 401",
    }
    assert all(result.scores[i] is None for i, c in enumerate(CASES) if f"{c}-0" in result.missing)
    assert 0.0 not in result.scores


def test_retries_honour_retry_after_and_backoff(scripted_run):
    server, result, _, elapsed = scripted_run
    j = by_id(result)
    assert j["rate-limited-0"].score == 8.0 and server.attempts["rate-limited"] == 2
    assert j["flaky-0"].score == 8.0 and server.attempts["flaky"] == 2
    assert j["slow-0"].score == 8.0 and server.attempts["slow"] == 2  # timed out once
    assert server.attempts["broken"] == 3  # first try + max_retries
    assert server.attempts["unauthorized"] == 1  # 4xx other than 429 is not retried
    assert result.usage.retries == 3
    assert elapsed >= 1.0  # waited out Retry-After: 1 (the client's own backoff starts at 0.5 s)


def test_usage_and_cost(scripted_run):
    _, result, _, _ = scripted_run
    answered = 7  # good, markdown, garbage, out-of-range, rate-limited, flaky, slow
    assert result.usage.calls == answered
    assert result.usage.prompt_tokens == 100 * answered
    assert result.usage.completion_tokens == 20 * answered
    assert result.cost_usd == pytest.approx((700 * 2.5 + 140 * 10.0) / 1e6)
    summary = result.summary()
    assert summary["missing"] == 5 and summary["scored"] == 5
    assert summary["missing_reasons"]["HTTP 500"] == 1


def test_rerun_hits_cache_without_calls(scripted_run, monkeypatch):
    server, first, cache, _ = scripted_run
    monkeypatch.setenv("OPENAI_API_KEY", SECRET_KEY)
    answered = [c for c in CASES if c not in ("truncated", "broken", "unauthorized")]
    before = sum(server.attempts.values())
    again = judge_all_sync([item(c) for c in answered], base_url=server.base_url, model=MODEL,
                           cache_path=cache, max_retries=0)
    assert sum(server.attempts.values()) == before
    assert again.usage.calls == 0 and again.cost_usd == 0.0
    assert again.usage.cache_hits == len(answered)
    assert again.scores == [by_id(first)[f"{c}-0"].score for c in answered]
    # same prompt, other judge model: not a hit
    other = judge_all_sync([item("good")], base_url=server.base_url, model="other-judge",
                           cache_path=cache, max_retries=0)
    assert other.usage.calls == 1 and other.usage.cache_hits == 0


def test_key_never_leaves_the_request(scripted_run, caplog):
    server, result, cache, _ = scripted_run
    assert f"Bearer {SECRET_KEY}" in server.auth_headers  # it was sent...
    assert SECRET_KEY not in cache.read_text()  # ...but never stored
    assert SECRET_KEY not in json.dumps(result.summary())
    assert SECRET_KEY not in repr(result)
    with caplog.at_level(logging.DEBUG):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("OPENAI_API_KEY", SECRET_KEY)
            judge_all_sync([item("unauthorized", 1)], base_url=server.base_url, model=MODEL,
                           max_retries=0)
    assert SECRET_KEY not in caplog.text
    assert "Right pleural effusion" not in caplog.text  # nor report text


def test_concurrency_is_bounded():
    with FakeOpenAIServer() as server:
        result = judge_all_sync([item("busy", n) for n in range(9)], base_url=server.base_url,
                                model=MODEL, concurrency=3, max_retries=0)
    assert result.usage.calls == 9
    assert server.max_in_flight == 3


def test_server_down_marks_all_missing(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = judge_all_sync([item("good", n) for n in range(3)],
                            base_url=f"http://127.0.0.1:{port}/v1", model=MODEL, max_retries=1)
    assert result.scores == [None, None, None]
    assert set(result.missing.values()) == {"connection error"}
    assert result.usage.calls == 0


def test_identical_prompts_are_sent_once():
    twins = [JudgeItem("a", "Normal.", "Normal. [[good]]"), JudgeItem("b", "Normal.", "Normal. [[good]]")]
    with FakeOpenAIServer() as server:
        result = judge_all_sync(twins, base_url=server.base_url, model=MODEL, max_retries=0)
    assert server.attempts["good"] == 1 and result.scores == [8.0, 8.0]
    with pytest.raises(ValueError):
        judge_all_sync([twins[0], twins[0]], base_url=server.base_url, model=MODEL)


@pytest.mark.parametrize("text, score", [
    ("Score: 7\nExplanation: ok", 7.0),
    ("score: 7.5\nexplanation: ok", 7.5),
    ("**Score:** 8\n**Explanation:** ok", 8.0),
    ("Score: 7/10\nExplanation: ok", 7.0),
    ("Score: **6** out of 10", 6.0),
    ("7.5", 7.5),
    ("## Score: 10\nExplanation: identical", 10.0),
    ("Score: 0\nExplanation: unrelated", 0.0),
    ("Score = 9.", 9.0),
])
def test_parse_judgment_accepts(text, score):
    assert parse_judgment(text).score == score


@pytest.mark.parametrize("text, reason", [
    ("Score: 11", "score outside 0-10"),
    ("Score: -1", "score outside 0-10"),
    ("Score: 4/5", "score not on a 0-10 scale"),
    ("Score: N/A\nExplanation: cannot judge", "no score in answer"),
    ("The candidate is decent.", "no score in answer"),
    ("", "empty answer"),
    (None, "empty answer"),
])
def test_parse_judgment_rejects(text, reason):
    parsed = parse_judgment(text)
    assert parsed.score is None and parsed.missing_reason == reason


def test_prompt_and_endpoint_helpers(monkeypatch):
    user = build_messages(JudgeItem("x", "REF TEXT", "GEN TEXT"))[1]["content"]
    assert "REF TEXT" in user and "GEN TEXT" in user and "Score: <integer from 0 to 10>" in user
    assert public_endpoint("https://user:pw@api.example.com:8443/v1?key=abc") == "https://api.example.com:8443/v1"
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert resolve_api_key("http://localhost:8000/v1") == "not-needed"
    with pytest.raises(RuntimeError):
        resolve_api_key("https://api.openai.com/v1")


def test_cache_survives_a_line_cut_short(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cache = tmp_path / "cache.jsonl"
    cache.write_text('{"model": "judge-model", "prompt_sha256": "ab')  # interrupted write
    with FakeOpenAIServer() as server:
        judge_all_sync([item("good")], base_url=server.base_url, model=MODEL, cache_path=cache)
        again = judge_all_sync([item("good")], base_url=server.base_url, model=MODEL, cache_path=cache)
    assert server.attempts["good"] == 1 and again.usage.cache_hits == 1 and again.scores == [8.0]
