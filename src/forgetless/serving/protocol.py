"""The OpenAI wire format: request bodies (pydantic), errors, and the JSON of replies and stream chunks.

Only what ``forgetless serve`` implements is modelled; other OpenAI fields a client sends (``user``,
``frequency_penalty`` ...) are ignored, as most OpenAI-compatible servers do, except those whose
value would change the reply in a way we cannot honour (``n`` > 1, ``best_of`` > 1): those are a
400 naming the field. Every refusal is an ``ApiError``: an ``InputError`` carrying the HTTP status
and the OpenAI error body, so a client sees ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from forgetless.errors import InputError

ROUTE_HEADER = "x-forgetless-route"
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "server_overloaded",
}


class ApiError(InputError):
    """A request the server refuses: ``status`` (HTTP), ``param`` (the field at fault) and ``code``."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict[str, Any]:
        """The OpenAI error JSON."""
        kind = _ERROR_TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    """Fields shared by both endpoints; unknown fields are ignored (OpenAI clients send many)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 16:
            raise ApiError(f"stop: {len(stops)} stop strings; give at most 16", param="stop")
        return tuple(s for s in stops if s)

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    """``POST /v1/completions``: a raw prompt (text, token ids, or a list of either)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    best_of: int | None = None


class ChatMessage(BaseModel):
    """One chat turn; ``content`` is text or a list of text parts."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None

    def text(self, index: int) -> str:
        """The turn's text; parts other than text are refused (the models served read text only)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        texts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(
                    f"messages[{index}].content: only text parts are served, got type '{part.get('type')}'",
                    param=f"messages.{index}.content",
                )
            texts.append(part["text"])
        return "".join(texts)


class ChatRequest(_Request):
    """``POST /v1/chat/completions``: messages, formatted by the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None

    def turns(self) -> list[dict[str, str]]:
        """``[{"role", "content"}]`` for the chat template (``developer`` is OpenAI's new ``system``)."""
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text(i)}
            for i, m in enumerate(self.messages)
        ]


def parse_request(model: type[_Request], data: Any) -> Any:
    """Validate a decoded JSON body; the first problem becomes a 400 naming the field."""
    if not isinstance(data, dict):
        raise ApiError('the request body must be a JSON object, e.g. {"model": ..., "prompt": ...}')
    try:
        request = model.model_validate(data)
    except ValidationError as error:
        from forgetless.validation import problem

        field, message = problem(error)
        raise ApiError(f"{field or 'body'}: {message}", param=field or "body") from None
    if request.n != 1:
        raise ApiError("n: only n=1 is served (one reply per request); send several requests", param="n")
    if getattr(request, "best_of", None) not in (None, 1):
        raise ApiError("best_of: only best_of=1 is served", param="best_of")
    if request.stream and getattr(request, "echo", False):
        raise ApiError("echo: echo is served without stream; set stream to false", param="echo")
    if isinstance(request, ChatRequest) and request.logprobs:
        raise ApiError(
            "logprobs: chat completions do not return log-probabilities here; use /v1/completions "
            "with logprobs (and echo for the prompt's)",
            param="logprobs",
        )
    return request


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def envelope(request_id: str, kind: str, model: str, route: str, choices: list[dict]) -> dict[str, Any]:
    """The fields every reply and chunk carries, with the route(s) the request took."""
    return {
        "id": request_id,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "forgetless_route": route,
    }


def chat_choice(text: str | None, finish_reason: str | None, *, delta: bool, first: bool = False) -> dict:
    """A chat choice: the whole ``message``, or a stream ``delta`` (the first names the role)."""
    if not delta:
        message = {"role": "assistant", "content": text}
        return {"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}
    part: dict[str, Any] = {"role": "assistant", "content": text or ""} if first else {}
    if text and not first:
        part["content"] = text
    return {"index": 0, "delta": part, "finish_reason": finish_reason, "logprobs": None}


def completion_choice(
    index: int, text: str, finish_reason: str | None, logprobs: dict | None, route: str | None = None
) -> dict[str, Any]:
    choice = {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}
    if route is not None:
        choice["forgetless_route"] = route
    return choice
