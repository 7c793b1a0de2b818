"""What the generation task needs from the process that runs it, as typed interfaces.

:mod:`tasks.generate` is written against these; :mod:`workers` provides them
(the Celery app's runtime, the OpenAI-compatible provider client, Prometheus
metrics).  The provider's result types live here too, so the core never
imports the edge.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from tasks.budget import Bill, Budget
from tasks.config import Settings
from tasks.events import Appended, Ending
from tasks.jobs import JobStore
from tasks.queue import Dispatcher
from tasks.routing import Router

if TYPE_CHECKING:
    from tasks.generate import Attempt


@dataclass(frozen=True)
class Usage:
    """Token usage the provider reported for one completion."""

    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Finish:
    """The end of a completion stream."""

    reason: str
    usage: Usage | None
    #: The provider's ``x-ratelimit-remaining-tokens`` and reset (s), when it sent them.
    remaining_tokens: int | None = None
    reset_s: float | None = None


class ProviderError(Exception):
    """The provider failed; ``code`` is stable for clients, ``message`` says why.

    ``failover``: another deployment may succeed (a connect error, a timeout,
    a 5xx or 429, a broken stream); ``retry_after_s``: the provider's
    ``Retry-After``.
    """

    def __init__(self, code: str, message: str, *, failover: bool = False,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.failover = failover
        self.retry_after_s = retry_after_s


class Providers(Protocol):
    """The model deployments, each streaming chat completions."""

    def stream(self, deployment: str, model: str, messages: list[dict[str, Any]],
               max_tokens: int, *, temperature: float | None = None, seed: int | None = None
               ) -> AbstractContextManager[Iterator[str | Finish]]:
        """Start a streaming completion on ``deployment``: text pieces, then one :class:`Finish`.

        :raises ProviderError: the request failed (before or while streaming).
        """


class Appender(Protocol):
    """Appends events to job logs (see :meth:`tasks.events.EventLog.append`)."""

    def append(self, job_id: str, kind: str, body: dict[str, Any], *,
               lease_token: str = "", status: str = "", expect_seq: int | None = None,
               bill: Bill | None = None, end: Ending | None = None) -> Appended:
        """Append one event; raises what :meth:`tasks.events.EventLog.append` raises."""


@dataclass
class Report:
    """How one attempt at a job ended, for the process's metrics.

    ``outcome`` is ``done``, ``error``, ``cancelled`` or ``lost`` (another
    attempt took the job over).  Durations are in seconds.
    """

    outcome: str
    #: The deployment that served (or last failed) the job; '' when none was tried.
    deployment: str
    error_code: str | None = None
    queue_wait_s: float | None = None
    e2e_s: float | None = None
    provider_ttft_s: float | None = None
    tpot_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    #: Deployments that failed and were failed over from, with the error code, in order.
    failovers: list[tuple[str, str]] = field(default_factory=list)


class Runtime(Protocol):
    """Everything a worker process shares between the jobs it runs."""

    settings: Settings
    jobs: JobStore
    budget: Budget
    appender: Appender
    providers: Providers
    router: Router
    dispatcher: Dispatcher
    #: The attempts running in this process, by job id (for cancels).
    attempts: dict[str, Attempt]

    def record(self, report: Report) -> None:
        """Count an attempt's outcome in the process's metrics."""
