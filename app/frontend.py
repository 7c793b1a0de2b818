"""The parts one front-end process shares between all its sockets and requests."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis
from celery import Celery

from app.admission import Admission
from app.apikeys import Authenticator, KeyStore
from app.intake import Intake
from app.relay import Relay
from app.sockets import Sockets
from tasks.config import Settings
from tasks.events import EventLog
from tasks.frames import FrameBudget
from tasks.jobs import JobStore
from tasks.queue import Dispatcher, TaskMessages, make_celery
from tasks.warmup import load_encodings, load_scripts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FrontEnd:
    """One set per process, built by :func:`app.create_app`; views take the parts they need.

    Example::

        front = FrontEnd.build(Settings.from_env())
        submitted = front.intake.submit(key, spec)
    """

    settings: Settings
    redis: redis.Redis
    jobs: JobStore
    events: EventLog
    relay: Relay
    auth: Authenticator
    admission: Admission
    intake: Intake
    celery: Celery
    #: The API keys' client-frame budgets.
    frames: FrameBudget
    #: This process's open sockets.
    sockets: Sockets

    @classmethod
    def build(cls, settings: Settings) -> FrontEnd:
        """Build the parts; nothing connects until first used."""
        client = settings.redis_client()
        jobs = JobStore(client, settings.job_ttl_s)
        events = EventLog(client, settings.event_ttl_s, batch_reads=True)
        admission = Admission.from_settings(settings, client)
        celery = make_celery(settings)  # a producer: the front end runs no task
        dispatcher = Dispatcher(celery, jobs, events, admission.budget)
        store = KeyStore(client)
        auth = Authenticator(store, allow_anonymous=settings.allow_anonymous,
                             anonymous_tier=settings.anonymous_tier, demo_key=settings.demo_key)
        sockets = Sockets(store)
        relay = Relay(client, sockets, lost_after_s=settings.redis_lost_after_s)
        frames = FrameBudget(client, per_s=settings.key_frames_per_s,
                             burst=settings.key_frame_burst,
                             tiers={name: t.rates for name, t in admission.tiers.items()})
        # Enqueued by the job-creation script when the broker is this Redis.
        messages = TaskMessages(celery) if TaskMessages.inline(settings) else None
        return cls(settings, client, jobs, events, relay, auth, admission,
                   Intake(admission, jobs, dispatcher, messages), celery, frames, sockets)

    def warm(self) -> None:
        """Load the models' token encodings, connect to Redis and load its scripts now.

        Done at start, so the first request does not pay for it (100-200 ms);
        best effort: with Redis down the front end still starts, and
        ``/readyz`` says what is wrong.
        """
        try:
            load_encodings(self.settings.model_names)
            load_scripts(self.redis, self.jobs, self.events, self.admission.budget,
                         self.auth.store, self.frames)
        except redis.RedisError as e:
            log.warning("warm-up: Redis unreachable (%s)", e)
        except Exception:  # a warm-up must not stop the front end
            log.exception("warm-up failed")

    def ready(self) -> dict[str, str]:
        """Check Redis and the broker; return a problem per failing part."""
        problems = {}
        try:
            self.redis.ping()
        except redis.RedisError as e:
            problems["redis"] = str(e)
        try:
            with self.celery.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
        except Exception as e:  # noqa: BLE001 - report any broker failure
            problems["broker"] = str(e)
        return problems
