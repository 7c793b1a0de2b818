"""Settings for every Sluice process, read from the environment when a process is built."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import redis
from gevent import monkey
from redis.backoff import ExponentialBackoff
from redis.connection import DefaultParser
from redis.retry import Retry

PREFIX = "SLUICE_"


@dataclass(frozen=True)
class Settings:
    """Typed settings; units are in the names.

    Every field can be set from the environment as ``SLUICE_<FIELD>`` (upper
    case), plus the standard ``REDIS_URL``, ``OPENAI_BASE_URL`` and
    ``OPENAI_API_KEY``, and ``SLUICE_PROVIDERS`` for ``providers_file``.
    """

    redis_url: str = "redis://127.0.0.1:6379/0"
    #: Celery broker; defaults to ``redis_url``.
    broker_url: str = ""
    openai_base_url: str = "http://127.0.0.1:8001/v1"
    openai_api_key: str = "sk-sluice-dev"
    #: Comma-separated model names clients may ask for; the first is the default.
    models: str = "mock-1"
    max_tokens_limit: int = 4096
    default_max_tokens: int = 256
    max_prompt_chars: int = 200_000
    max_frame_bytes: int = 1_000_000
    #: How long a job's record and event log live after the job ends.
    event_ttl_s: int = 3600
    #: Upper bound of one generation; also the lease's hard stop.
    job_timeout_s: int = 600
    #: A job's lease runs out this long after its worker's last heartbeat (see
    #: the properties below): a killed worker's jobs restart within ~1.2x this.
    lease_ttl_s: int = 3
    #: Redis broker: a message another consumer with kombu's ack emulation took
    #: and has not acked within this is put back on its queue by the reapers.
    #: Sluice's own workers keep no unacked copies (a job whose message their
    #: worker lost waits ``unstarted_grace_s``, see workers/reaper.py).
    visibility_timeout_s: int = 300
    cancel_on_disconnect: bool = False
    worker_concurrency: int = 500
    provider_timeout_s: float = 60.0
    provider_max_retries: int = 2
    #: Celery queue for generation jobs.
    queue: str = "sluice"
    #: Celery queue of bulk and batch items (the same workers consume it after ``queue``).
    bulk_queue: str = "sluice-bulk"
    #: Bulk and batch items started and not yet ended, gateway-wide.  The pump
    #: starts no more, so bulk work never fills the workers or the broker ahead
    #: of interactive jobs (see README, Bulk jobs).
    bulk_max_running: int = 64
    #: Bulk and batch items started per second at most, gateway-wide.  A job's
    #: start costs its worker a few ms of CPU that an interactive job arriving
    #: then waits behind; pacing spreads them (about 10 per worker process).
    bulk_starts_per_s: float = 20.0
    #: Most items in one bulk submission (a ``bulk`` frame).
    bulk_max_items: int = 1000
    #: Most items one API key may have submitted and not yet ended, over all its bulks.
    bulk_max_pending: int = 100_000
    #: How long a bulk's items may wait to start before they expire.
    bulk_max_wait_s: int = 86400
    #: Largest Batch API input file, in bytes and in requests.
    batch_max_file_bytes: int = 50_000_000
    batch_max_items: int = 50_000
    #: How long uploaded files, and finished batches with their results, are kept.
    batch_retention_s: int = 7 * 86400
    #: TOML file of rate-limit tiers; built-in tiers when empty (see tasks/tiers.py).
    tiers_file: str = ""
    #: TOML file of provider deployments and model routes; without one, a single
    #: deployment at ``openai_base_url`` serves ``models`` (see tasks/deployments.py).
    providers_file: str = ""
    #: Seconds between a worker process's announcements of the queues it consumes.
    queue_heartbeat_s: float = 10.0
    #: Admit requests without limits when Redis cannot be reached (default: refuse).
    admission_fail_open: bool = False
    #: Serve clients without an API key, on ``anonymous_tier`` (local demos only).
    allow_anonymous: bool = False
    anonymous_tier: str = "free"
    #: A raw API key to register at start-up (``sluice run`` sets one for the demo).
    demo_key: str = ""
    #: Workers publish Celery task events (what Flower shows tasks from). Off by
    #: default: they cost each job three broker publishes and ~1 ms of worker CPU.
    task_events: bool = False
    #: Accept Celery control commands that change workers (revoke, shutdown, pool
    #: resize…) from Flower or ``celery control``; off keeps Flower read-only.
    remote_control: bool = False
    #: Port of a worker process's Prometheus endpoint; 0 serves none.
    metrics_port: int = 0
    #: Address Sluice's own servers listen on (web in the Procfile, Flower, worker
    #: metrics); loopback unless told otherwise.
    host: str = "127.0.0.1"
    #: Redis connections per process; greenlets beyond it wait for a free one.
    redis_max_connections: int = 64
    #: Seconds a socket opened without a key has to send its ``auth`` frame.
    auth_timeout_s: float = 5.0
    #: Seconds between the pings a front end sends on an open socket; a socket
    #: whose ping is not answered by the next one is closed (1008). 0: no pings.
    ws_ping_interval_s: float = 25.0
    #: Client frames per second one socket may send, and the burst it may save up.
    socket_frames_per_s: float = 20.0
    socket_frame_burst: int = 100
    #: The same for all sockets of one API key together, on every front end.
    key_frames_per_s: float = 500.0
    key_frame_burst: int = 2000
    #: Jobs one socket may follow at once: a bulk of ``bulk_max_items`` and its
    #: own log, plus a hundred interactive jobs.
    max_follows_per_socket: int = 1101
    #: How long a front end goes without Redis before telling its clients to reconnect.
    redis_lost_after_s: float = 2.0
    #: A job sent to the workers and not started by any attempt this long after
    #: is sent again (its message may have died with a worker); each further
    #: copy waits as long as the job has already waited, so a long queue costs
    #: a few copies per job, each of which does nothing once the job runs.
    unstarted_grace_s: float = 5.0
    #: How long a Redis command waits for its reply before it fails (and is retried
    #: on a new connection): a half-open connection must not hang a greenlet.
    #: Pub/sub reads that wait for messages are not bound by it.
    redis_socket_timeout_s: float = 10.0

    @property
    def model_names(self) -> tuple[str, ...]:
        """The configured model names, in order."""
        return tuple(m.strip() for m in self.models.split(",") if m.strip())

    @property
    def job_ttl_s(self) -> int:
        """How long an unfinished job's record, log and reservation may live."""
        return self.job_timeout_s + self.event_ttl_s

    @property
    def heartbeat_period_s(self) -> float:
        """How often a worker process renews the leases of all its running jobs."""
        return self.lease_ttl_s / 3

    @property
    def reaper_period_s(self) -> float:
        """How often each worker process looks for jobs whose lease ran out."""
        return self.lease_ttl_s / 6

    @property
    def claim_grace_s(self) -> float:
        """How long a re-enqueued orphan waits to be claimed again if its re-run never starts."""
        return self.lease_ttl_s * 3

    @property
    def slot_ttl_s(self) -> int:
        """How long a concurrency slot outlives its last renewal if its job never settles."""
        return 2 * self.job_timeout_s

    @property
    def broker(self) -> str:
        """The Celery broker URL."""
        return self.broker_url or self.redis_url

    def redis_client(self) -> redis.Redis:
        """A Redis client whose pool makes greenlets wait for a connection rather than fail."""
        # A short retry: a blip is ridden out, an outage answers 'unavailable' fast.
        pool = redis.BlockingConnectionPool.from_url(
            self.redis_url, max_connections=self.redis_max_connections, timeout=30,
            health_check_interval=30, socket_connect_timeout=5,
            socket_timeout=self.redis_socket_timeout_s,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2), parser_class=Parser)
        return redis.Redis(connection_pool=pool)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from environment variables, then ``overrides``.

        :param env: the environment to read; ``os.environ`` when ``None``.
        :param overrides: field values that win over the environment.
        :return: the settings.
        :raises ValueError: a variable does not parse as its field's type.

        Example::

            settings = Settings.from_env(event_ttl_s=60)
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        standard = {"redis_url": "REDIS_URL", "openai_base_url": "OPENAI_BASE_URL",
                    "openai_api_key": "OPENAI_API_KEY", "providers_file": "SLUICE_PROVIDERS"}
        for f in fields(cls):
            name = PREFIX + f.name.upper()
            raw = env.get(name, env.get(standard.get(f.name, ""), None))
            if raw is None:
                continue
            values[f.name] = _parse(name, raw, type(getattr(cls, f.name)))
        return replace(cls(**values), **overrides)


#: The operating system's poll(), whatever gevent patched.
_os_poll = monkey.get_original("select", "poll")


def readable_now(sock: Any) -> bool:
    """Whether ``sock`` has data (or its peer's close) waiting, without waiting.

    Asks the operating system's ``poll()`` with a zero timeout: gevent's
    patched ``select.poll`` would build and start a watcher and go through
    the hub for an answer that never blocks.  Both Redis and HTTP connection
    pools ask this of every idle connection they hand out.
    """
    poller = _os_poll()
    poller.register(sock, 1)  # POLLIN; POLLHUP and POLLERR are always reported
    return bool(poller.poll(0))


class Parser(DefaultParser):  # type: ignore[misc,valid-type]
    """redis-py's reply parser, with a cheap check that a connection is idle.

    redis-py asks each connection it takes from a pool whether it has unread
    data (``can_read()``, with no wait), by polling its socket: with gevent's
    patched ``select.poll`` that builds and starts a watcher and goes through
    the hub, about 9 % of a worker's and 10 % of a front end's CPU under load
    (py-spy).  A zero-timeout poll never blocks, so the operating system's
    own ``poll()`` answers it, without the hub; anything but "nothing to
    read, no wait" is left to redis-py.
    """

    def can_read(self, timeout: float = 0) -> bool:
        """Whether a reply (or the peer's close) is waiting; see ``redis.connection``."""
        sock = getattr(self, "_sock", None)
        if timeout == 0 and sock is not None and not self._buffered() and not readable_now(sock):
            return False
        return bool(super().can_read(timeout))

    def _buffered(self) -> bool:
        reader = getattr(self, "_reader", None)  # hiredis
        if reader is not None:
            return bool(reader.has_data())
        buffer = getattr(self, "_buffer", None)  # the pure-Python parser
        return buffer is not None and buffer.unread_bytes() > 0


def read_secret(name: str) -> str:
    """The value of environment variable ``name``, '' when unset.

    The one other environment read: the API keys of provider deployments, whose
    variable names the providers file gives (the file never holds a key).
    """
    return os.environ.get(name, "")


def _parse(name: str, raw: str, kind: type) -> Any:
    try:
        if kind is bool:
            if raw.lower() not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
                raise ValueError(raw)
            return raw.lower() in {"1", "true", "yes", "on"}
        return kind(raw)
    except ValueError as e:
        raise ValueError(f"{name}={raw!r} is not a valid {kind.__name__}") from e
