"""One job rendered as OpenAI's objects: ``chat.completion`` and ``text_completion``, and chunks.

A token's chunk is the prefix and suffix this object renders once, around the
token's text as its stored frame already holds it in JSON: no JSON work per
token.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from tasks.jobs import JobSpec
from tasks.tokens import count_message_tokens

_COMPACT = (",", ":")
#: Where a token frame's text starts (``tasks.events.frame_parts`` renders
#: ``{"text": …}`` last, after the 58 characters of type and job id).
_TEXT, _TEXT_FROM = ',"text":', 58


def token_json(frame: str) -> str:
    """The JSON string literal of a stored ``token`` frame's text, cut out unparsed."""
    return frame[frame.index(_TEXT, _TEXT_FROM) + len(_TEXT):-1]


def error_body(code: str, message: str, kind: str = "server_error",
               param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: ``{"error": {message, type, param, code}}``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class Completion:
    """The response objects of one job, as a chat or a text (legacy) completion.

    Example::

        completion = Completion(True, job_id, spec, int(time.time()), include_usage=True)
        completion.content('" Hello"')        # b'data: {"id":"chatcmpl-…",…}\\n\\n'
    """

    def __init__(self, chat: bool, job_id: str, spec: JobSpec, created: int,
                 include_usage: bool = False) -> None:
        self.chat = chat
        self.spec = spec
        self.include_usage = include_usage
        self.id = ("chatcmpl-" if chat else "cmpl-") + job_id
        self._head = {"id": self.id,
                      "object": "chat.completion.chunk" if chat else "text_completion",
                      "created": created, "model": spec.model}
        opening = json.dumps(self._head, separators=_COMPACT)[:-1] + ',"choices":[{"index":0,'
        self._prefix = ("data: " + opening + ('"delta":{"content":' if chat else '"text":'))
        self._suffix = (("}" if chat else "") + ',"logprobs":null,"finish_reason":null}]'
                        + (',"usage":null' if include_usage else "") + "}\n\n")

    def content(self, text_json: str) -> bytes:
        """The chunk carrying one token's text, given as a JSON string literal."""
        return (self._prefix + text_json + self._suffix).encode()

    def opening(self) -> bytes:
        """The first chunk (chat: the assistant role), sent before any token; empty for text."""
        if not self.chat:
            return b""
        return self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None}])

    def ending(self, done: dict[str, Any]) -> Iterator[bytes]:
        """The chunk with the ``finish_reason``, then the usage chunk if it was asked for."""
        empty: dict[str, Any] = {"delta": {}} if self.chat else {"text": ""}
        yield self._chunk([{"index": 0, **empty, "logprobs": None,
                            "finish_reason": done.get("finish_reason") or "stop"}])
        if self.include_usage:
            yield self._chunk([], self.usage(done))

    def error(self, code: str, message: str) -> bytes:
        """The chunk ending a stream that failed (OpenAI's error object as the data)."""
        return _sse(error_body(code, message))

    def body(self, text: str, done: dict[str, Any]) -> dict[str, Any]:
        """The whole ``chat.completion`` or ``text_completion`` object."""
        reason = done.get("finish_reason") or "stop"
        choice: dict[str, Any] = (
            {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
             "logprobs": None, "finish_reason": reason} if self.chat else
            {"index": 0, "text": text, "logprobs": None, "finish_reason": reason})
        return {**self._head, "object": "chat.completion" if self.chat else "text_completion",
                "choices": [choice], "usage": self.usage(done)}

    def usage(self, done: dict[str, Any]) -> dict[str, int]:
        """OpenAI's usage object from a ``done`` event's usage."""
        usage = done.get("usage") or {}
        completion = int(usage.get("completion_tokens") or 0)
        prompt = usage.get("prompt_tokens")
        if prompt is None:  # a provider that reports no usage: count as admission did
            prompt = count_message_tokens(self.spec.messages, self.spec.model)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def _chunk(self, choices: list[dict[str, Any]],
               usage: dict[str, int] | None = None) -> bytes:
        chunk: dict[str, Any] = {**self._head, "choices": choices}
        if self.include_usage:
            chunk["usage"] = usage
        return _sse(chunk)


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=_COMPACT).encode() + b"\n\n"
