"""The sockets open in one front-end process, and what is said to all of them at once.

The relay's pub/sub connection is the process's ear (see
:class:`app.relay.Watcher`); this registry is its mouth: it closes the
sockets of a revoked key, tells the clients following jobs to reconnect when
Redis is lost, and tells every client to reconnect elsewhere when the
process shuts down.  Each socket is closed by its own writer (see
:mod:`app.writer`), so nothing here blocks.
"""

from __future__ import annotations

import logging
from typing import Protocol

import gevent
import redis
from gevent.event import Event

from app.apikeys import ANONYMOUS_ID, KeyInfo, KeyStore
from app.protocol import ProtocolError
from app.relay import Watcher
from app.writer import GOING_AWAY, TRY_AGAIN_LATER, UNAUTHORIZED, Closing

log = logging.getLogger(__name__)


class Member(Protocol):
    """What the registry needs of a socket."""

    @property
    def key(self) -> KeyInfo | None:
        """Who the socket acts for; ``None`` until it authenticates."""

    def following_jobs(self) -> bool:
        """Whether the socket follows any job now."""

    def close(self, closing: Closing) -> None:
        """Say why and close; must not block."""


def revoked() -> Closing:
    """How a socket of a revoked key closes: ``unauthorized``, 4401, its jobs cancelled."""
    frame = ProtocolError("unauthorized", "this API key has been revoked").frame()
    return Closing.error(UNAUTHORIZED, frame, cancel_jobs=True)


class Sockets(Watcher):
    """Every open socket of this process.

    Example::

        sockets = Sockets(KeyStore(client))
        relay = Relay(client, watcher=sockets)
        sockets.add(connection)            # ... sockets.discard(connection)
        sockets.shutdown()                 # SIGTERM: everyone reconnects elsewhere
    """

    def __init__(self, store: KeyStore) -> None:
        self.store = store
        self.open: set[Member] = set()
        self.shutting_down = False
        self._empty = Event()
        self._empty.set()

    def add(self, member: Member) -> None:
        """Register an open socket (one accepted during shutdown is told to go at once)."""
        self.open.add(member)
        self._empty.clear()
        if self.shutting_down:
            member.close(Closing.reconnect_later("going_away", GOING_AWAY))

    def discard(self, member: Member) -> None:
        """Forget a closed socket."""
        self.open.discard(member)
        if not self.open:
            self._empty.set()

    def on_revoked(self, key_id: str) -> None:
        """Close every socket of ``key_id`` with ``unauthorized`` and cancel its jobs."""
        for member in list(self.open):
            if member.key is not None and member.key.key_id == key_id:
                member.close(revoked())

    def on_watching(self) -> None:
        """Check the keys of all open sockets: a revocation may have gone unheard."""
        gevent.spawn(self.verify_keys)

    def verify_keys(self) -> None:
        """Close the sockets whose key is no longer active (one round trip)."""
        ids = {m.key.key_id for m in list(self.open)
               if m.key is not None and m.key.key_id != ANONYMOUS_ID}
        if not ids:
            return
        try:
            active = self.store.active_ids(ids)
        except redis.RedisError as e:
            log.warning("could not re-check the keys of open sockets: %s", e)
            return
        for key_id in ids - active:
            log.info("key %s is no longer active; closing its sockets", key_id)
            self.on_revoked(key_id)

    def on_redis_lost(self) -> None:
        """Tell every client that follows a job to reconnect and resume (close 1013)."""
        for member in list(self.open):
            if member.following_jobs():
                member.close(Closing.reconnect_later("unavailable", TRY_AGAIN_LATER))

    def shutdown(self, wait_s: float = 0.0) -> None:
        """Tell every client which jobs to resume and close its socket with 1001.

        :param wait_s: how long to wait for the sockets to be gone.
        """
        self.shutting_down = True
        log.info("shutting down: closing %d sockets", len(self.open))
        for member in list(self.open):
            member.close(Closing.reconnect_later("going_away", GOING_AWAY))
        if wait_s:
            self._empty.wait(timeout=wait_s)
