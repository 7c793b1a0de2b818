"""How a bulk item ended, read from its job's event log once the job is over."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from tasks.jobs import Job
from tasks.tokens import count_message_tokens

#: What an item's end counts as in its bulk: ``done``, ``failed`` or ``cancelled``.
OUTCOMES = ("done", "failed", "cancelled")


@dataclass(frozen=True)
class Outcome:
    """An ended item: its answer, or why it has none.

    Example::

        outcome = Outcome.of_log(events.read(job_id), job)
        outcome.status, outcome.text, outcome.completion_tokens
    """

    #: ``done``, ``failed`` or ``cancelled``.
    status: str
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: For ``failed`` and ``cancelled``: the error's stable code and message.
    code: str | None = None
    message: str | None = None
    model: str = ""
    #: When the job was created (s since the epoch), for the response's ``created``.
    created_s: int = 0
    #: The job's id (the response's request id); empty for an item that never became a job.
    job_id: str = ""

    @classmethod
    def of_log(cls, events: list[tuple[int, str]], job: Job | None) -> Outcome:
        """Summarise an ended job's events: the text after its last restart, and its end.

        :param events: the job's whole log, in seq order.
        :param job: the job's record, for the model and the prompt's size.
        """
        pieces: list[str] = []
        model = job.spec.model if job else ""
        created_s = job.created_ms // 1000 if job else 0
        base: dict[str, Any] = {"model": model, "created_s": created_s,
                                "job_id": job.job_id if job else ""}
        for _, frame in events:
            event = json.loads(frame)
            kind = event["type"]
            if kind == "restart":
                pieces.clear()
            elif kind == "token":
                pieces.append(event["text"])
            elif kind == "done":
                usage = event.get("usage") or {}
                prompt = usage.get("prompt_tokens")
                if prompt is None:  # the provider reported none: count as admission did
                    prompt = count_message_tokens(job.spec.messages, model) if job else 0
                return cls("done", "".join(pieces), event.get("finish_reason") or "stop",
                           int(prompt), int(usage.get("completion_tokens") or 0), **base)
            elif kind == "error":
                status = "cancelled" if event.get("code") == "cancelled" else "failed"
                return cls(status, code=event.get("code"), message=event.get("message"),
                           completion_tokens=len(pieces), **base)
        return cls("failed", code="lost", message="the job ended without a final event",
                   **base)

    @classmethod
    def error(cls, status: str, code: str, message: str) -> Outcome:
        """An item that ended without running (refused, cancelled or expired while held)."""
        return cls(status, code=code, message=message)

    def to_json(self) -> str:
        """The outcome as kept in its bulk's results."""
        return json.dumps({k: v for k, v in asdict(self).items() if v not in (None, "", 0)},
                          separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, raw: str | bytes) -> Outcome:
        """Invert :meth:`to_json`."""
        return cls(**json.loads(raw))
