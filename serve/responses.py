"""Answers in the OpenAI wire format: whole responses, server-sent event chunks, errors."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from fastapi.responses import JSONResponse

DONE = "data: [DONE]\n\n"


def error_response(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(status, message, kind))


def error_body(status: int, message: str, kind: str) -> dict:
    return {"error": {"message": message, "type": kind, "code": status}}


def event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass
class Reply:
    """One answer to a chat (`chat=True`) or text completion request."""

    chat: bool
    model: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def whole(self, text: str, finish_reason: str, counts: dict) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return self._envelope(self._object, [choice]) | {"usage": counts}

    def chunk(self, text: str, finish_reason: str | None = None, first: bool = False) -> str:
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return event(self._envelope(self._chunk_object, [choice]))

    def usage_chunk(self, counts: dict) -> str:
        return event(self._envelope(self._chunk_object, []) | {"usage": counts})

    @property
    def _object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _envelope(self, kind: str, choices: list) -> dict:
        prefix = "chatcmpl-" if self.chat else "cmpl-"
        return {"id": prefix + self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices}
