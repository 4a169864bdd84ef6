"""LLM-as-judge for generated radiology impressions, over any OpenAI-compatible endpoint.

A strong model, prompted as a radiologist, grades each generated impression against the
reference impression on 0-10 and answers `Score: <n>` / `Explanation: <text>`.

- Bounded concurrency with an asyncio.Semaphore.
- Retries (429, 408/409, 5xx, timeouts, connection errors) are the openai client's own: it backs
  off exponentially (0.5 s doubling, capped at 8 s, with jitter) and honours `Retry-After` /
  `retry-after-ms` up to 120 s. `max_retries` is always passed explicitly.
- A judgment that fails or cannot be parsed is MISSING (score None plus a reason), never 0.
- Completions are cached in a JSON Lines file keyed by (judge model, sha256 of the prompt):
  a rerun makes no call for a prompt already answered; the cache stores the raw answer, so
  parsing is redone on load. Failed calls are not cached, so a rerun retries them.
- The API key comes from OPENAI_API_KEY (a placeholder for a loopback server that needs none)
  and is never logged, cached or reported. Logs carry counts only: prompts hold report text,
  and error reasons are built from status codes, not server messages (a 401 body can echo the
  key). Explanations may quote report text: keep the cache and per-item results with the data.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import openai
from openai import AsyncOpenAI

log = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "You are an experienced, board-certified radiologist. You review impressions written by an "
    "automated reporting system and grade each one against the impression the reading "
    "radiologist wrote for the same study."
)

USER_TEMPLATE = """Grade the CANDIDATE impression against the REFERENCE impression on a scale from 0 to 10.

Weigh these criteria together:
1. Medical accuracy: the candidate states the same diagnoses and conclusions as the reference and nothing that contradicts it.
2. Clinically significant findings: how many of the reference's important findings the candidate reports. Findings or conclusions the reference does not support count against the candidate.
3. Stylistic concordance: it reads like the reference (concise impression style, most important finding first).
4. Clarity: a referring clinician could act on it without ambiguity.
5. Medical precision: correct terminology, laterality, anatomical location, severity and measurements.

Rules:
- The reference is the ground truth. Judge the candidate only against it, not against what you would have written.
- The order in which the texts are shown carries no information; do not favour either because of its position.
- Length must not sway the grade: a short candidate with the key findings beats a long one that pads or invents.
- 10 means clinically equivalent to the reference; 0 means wrong or unrelated.

REFERENCE impression:
<<<
{expected}
>>>

CANDIDATE impression:
<<<
{generated}
>>>

Reply with exactly two lines and nothing else:
Score: <integer from 0 to 10>
Explanation: <one or two sentences naming missed, added or wrong findings>"""

LOCAL_KEY_PLACEHOLDER = "not-needed"
_LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1"}


@dataclass(frozen=True)
class JudgeItem:
    id: str
    expected: str  # reference impression
    generated: str  # model output


@dataclass(frozen=True)
class Judgment:
    id: str
    score: float | None
    explanation: str | None
    missing_reason: str | None  # set exactly when score is None
    cached: bool


@dataclass(frozen=True)
class Pricing:
    """USD per 1M tokens; zero for a self-hosted judge."""

    input_per_1m: float = 0.0
    output_per_1m: float = 0.0

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_1m + completion_tokens * self.output_per_1m) / 1e6


@dataclass
class Usage:
    """Counts for THIS run; cache hits cost nothing and are counted apart."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0  # prompts that got a completion back
    retries: int = 0  # retries the client took for those (failed prompts are not counted)
    cache_hits: int = 0


@dataclass
class JudgeResult:
    judgments: list[Judgment]
    usage: Usage
    cost_usd: float
    model: str
    endpoint: str  # base URL without credentials or query

    @property
    def scores(self) -> list[float | None]:
        return [j.score for j in self.judgments]

    @property
    def missing(self) -> dict[str, str]:
        return {j.id: j.missing_reason for j in self.judgments if j.missing_reason is not None}

    def summary(self) -> dict[str, Any]:
        """JSON-safe run summary for reports: counts, usage, cost; no texts, no key."""
        return {
            "model": self.model,
            "endpoint": self.endpoint,
            "items": len(self.judgments),
            "scored": len(self.judgments) - len(self.missing),
            "missing": len(self.missing),
            "missing_reasons": dict(Counter(self.missing.values())),
            "usage": asdict(self.usage),
            "cost_usd": round(self.cost_usd, 6),
        }


def build_messages(item: JudgeItem) -> list[dict[str, str]]:
    user = USER_TEMPLATE.format(expected=item.expected.strip(), generated=item.generated.strip())
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def prompt_sha256(messages: list[dict[str, str]]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()


# --- parsing -----------------------------------------------------------------------------------

_MARKUP = re.compile(r"[*_`#>]")
_NUMBER = r"(-?\d+(?:\.\d+)?)(?:\s*(?:/|out\s+of)\s*(\d+(?:\.\d+)?))?"
_LABELLED_SCORE = re.compile(r"\bscore\b\s*(?:\(\s*0\s*-\s*10\s*\))?\s*[:=\-]?\s*" + _NUMBER, re.I)
_BARE_SCORE = re.compile(r"^\s*" + _NUMBER + r"\s*$")
_EXPLANATION = re.compile(r"\bexplanation\b\s*[:\-]\s*(.*)", re.I | re.S)


@dataclass(frozen=True)
class ParsedAnswer:
    score: float | None
    explanation: str | None
    missing_reason: str | None


def parse_judgment(text: str | None) -> ParsedAnswer:
    """Read `Score: <n>` (tolerating markdown, "7/10", "out of 10", a bare number, any case).

    Scores outside 0-10 or on another scale are rejected (missing), not clipped.
    """
    if not text or not text.strip():
        return ParsedAnswer(None, None, "empty answer")
    plain = _MARKUP.sub("", text).strip()
    match = _LABELLED_SCORE.search(plain)
    if match is None:
        first_line = plain.splitlines()[0]
        match = _BARE_SCORE.match(first_line)
    explanation_match = _EXPLANATION.search(plain)
    explanation = explanation_match.group(1).strip() if explanation_match else None
    if match is None:
        return ParsedAnswer(None, explanation, "no score in answer")
    value, scale = float(match.group(1)), match.group(2)
    if scale is not None and float(scale) != 10:
        return ParsedAnswer(None, explanation, "score not on a 0-10 scale")
    if not 0 <= value <= 10:
        return ParsedAnswer(None, explanation, "score outside 0-10")
    return ParsedAnswer(value, explanation, None)


# --- cache -------------------------------------------------------------------------------------


class JudgeCache:
    """Append-only JSON Lines: one answered prompt per line, so a crash loses at most one line."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self._entries: dict[tuple[str, str], dict[str, Any]] = {}
        if self.path and self.path.exists():
            text = self.path.read_text()
            for line in text.splitlines():
                try:
                    entry = json.loads(line)
                    self._entries[(entry["model"], entry["prompt_sha256"])] = entry
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut short by an interrupted run
            if text and not text.endswith("\n"):
                with self.path.open("a") as f:
                    f.write("\n")  # so the next entry does not extend the cut line

    def get(self, model: str, key: str) -> dict[str, Any] | None:
        return self._entries.get((model, key))

    def put(self, model: str, key: str, content: str, prompt_tokens: int, completion_tokens: int) -> None:
        entry = {"model": model, "prompt_sha256": key, "content": content,
                 "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
        self._entries[(model, key)] = entry
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(entry) + "\n")


# --- calling -----------------------------------------------------------------------------------


def resolve_api_key(base_url: str) -> str:
    key = os.environ.get("OPENAI_API_KEY")
    if key:
        return key
    if urlsplit(base_url).hostname in _LOOPBACK_HOSTS:
        return LOCAL_KEY_PLACEHOLDER  # local OpenAI-compatible servers ignore it
    raise RuntimeError("OPENAI_API_KEY is not set; it is required for a non-local judge endpoint")


def public_endpoint(base_url: str) -> str:
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def failure_reason(error: Exception) -> str:
    # Deliberately ignores error messages: they can quote the key or the prompt.
    if isinstance(error, openai.APIStatusError):
        return f"HTTP {error.status_code}"
    if isinstance(error, openai.APITimeoutError):
        return "timeout"
    if isinstance(error, openai.APIConnectionError):
        return "connection error"
    return "malformed response"


@dataclass
class _Call:
    content: str | None = None  # None when the call failed
    failure: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0


async def _call_judge(client: AsyncOpenAI, model: str, messages: list[dict[str, str]],
                      temperature: float, max_tokens: int) -> _Call:
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model=model, messages=messages, temperature=temperature, max_tokens=max_tokens,
        )
        completion = raw.parse()
    except (openai.OpenAIError, ValueError) as error:  # ValueError: body is not valid JSON
        return _Call(failure=failure_reason(error))
    usage = completion.usage
    # An answered call with no text (e.g. a refusal) is cached like any answer; parsing marks it.
    content = completion.choices[0].message.content if completion.choices else None
    return _Call(
        content=content or "",
        prompt_tokens=usage.prompt_tokens if usage else 0,
        completion_tokens=usage.completion_tokens if usage else 0,
        retries=raw.retries_taken,
    )


async def judge_all(
    items: list[JudgeItem],
    *,
    base_url: str,
    model: str,
    concurrency: int = 16,
    cache_path: str | Path | None = None,
    pricing: Pricing = Pricing(),
    max_retries: int = 4,
    timeout: float = 60.0,
    temperature: float = 0.0,
    max_tokens: int = 256,
) -> JudgeResult:
    """Judge every item; identical prompts are sent once and cached prompts not at all."""
    if len({item.id for item in items}) != len(items):
        raise ValueError("judge items need unique ids")
    cache = JudgeCache(cache_path)
    messages = {item.id: build_messages(item) for item in items}
    keys = {item_id: prompt_sha256(m) for item_id, m in messages.items()}
    to_call = {key: messages[item_id] for item_id, key in keys.items() if cache.get(model, key) is None}
    log.info("judge %s: %d items, %d prompts to send", model, len(items), len(to_call))

    usage = Usage()
    failures: dict[str, str] = {}
    semaphore = asyncio.Semaphore(concurrency)

    async def run_one(client: AsyncOpenAI, key: str, prompt: list[dict[str, str]]) -> None:
        async with semaphore:
            call = await _call_judge(client, model, prompt, temperature, max_tokens)
        if call.content is None:
            failures[key] = call.failure or "malformed response"
            return
        usage.calls += 1
        usage.retries += call.retries
        usage.prompt_tokens += call.prompt_tokens
        usage.completion_tokens += call.completion_tokens
        cache.put(model, key, call.content, call.prompt_tokens, call.completion_tokens)

    if to_call:
        async with AsyncOpenAI(base_url=base_url, api_key=resolve_api_key(base_url),
                               max_retries=max_retries, timeout=timeout) as client:
            await asyncio.gather(*(run_one(client, k, m) for k, m in to_call.items()))

    judgments = []
    for item in items:
        key = keys[item.id]
        entry = cache.get(model, key)
        if entry is None:
            judgments.append(Judgment(item.id, None, None, failures[key], cached=False))
            continue
        parsed = parse_judgment(entry["content"])
        judgments.append(Judgment(item.id, parsed.score, parsed.explanation, parsed.missing_reason,
                                  cached=key not in to_call))
    usage.cache_hits = sum(j.cached for j in judgments)
    result = JudgeResult(judgments, usage, pricing.cost(usage.prompt_tokens, usage.completion_tokens),
                         model, public_endpoint(base_url))
    log.info("judge %s: %d scored, %d missing, %d calls, %d retries, %d cache hits",
             model, len(items) - len(result.missing), len(result.missing), usage.calls,
             usage.retries, usage.cache_hits)
    return result


def judge_all_sync(items: list[JudgeItem], **kwargs: Any) -> JudgeResult:
    """`judge_all` for callers without an event loop."""
    return asyncio.run(judge_all(items, **kwargs))
