"""API keys: created once, stored only as a SHA-256 hash, verified on every connection.

A key looks like ``sk-sluice-<43 url-safe characters>`` (256 random bits).
Its id is the first 16 hex digits of its hash, so verifying a key is one
``HGETALL`` and the id can appear in logs, the CLI and metrics without
revealing anything.  Because the keys are long random strings, a plain
SHA-256 is as strong as a slow password hash here, and much cheaper.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis

from tasks import keys
from tasks.jobs import JobStore

KEY_PREFIX = "sk-sluice-"
KEY_ID_HEX = 16
MAX_KEY_CHARS = 200
MAX_NAME_CHARS = 100
ACTIVE, REVOKED = "active", "revoked"
#: The key id of requests made without a key, when anonymous access is enabled.
ANONYMOUS_ID = "anonymous"


# Register an API key unless its id is taken, all at once: a concurrent verify
# sees either no key or the whole record, never half of one.
# KEYS[1] the key's record hash, KEYS[2] the key index zset.
# ARGV[1] sha256 hex digest, ARGV[2] name, ARGV[3] tier, ARGV[4] created ms, ARGV[5] key id.
# Returns 1 if registered, 0 if the id was taken (the record is left alone).
CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'hash', ARGV[1], 'name', ARGV[2], 'tier', ARGV[3],
           'created_ms', ARGV[4], 'state', 'active')
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[5])
return 1
"""


class KeyNotFoundError(LookupError):
    """No API key has that id."""


@dataclass(frozen=True)
class KeyInfo:
    """An API key as stored: everything but the key itself."""

    key_id: str
    name: str
    tier: str
    created_ms: int
    state: str = ACTIVE
    revoked_ms: int | None = None

    @property
    def active(self) -> bool:
        """Whether the key may be used."""
        return self.state == ACTIVE


def hash_key(raw_key: str) -> str:
    """The SHA-256 hex digest stored in place of ``raw_key``."""
    return hashlib.sha256(raw_key.encode()).hexdigest()


def anonymous_key(tier: str) -> KeyInfo:
    """The identity of unauthenticated clients, who share one set of buckets.

    :param tier: the tier anonymous clients get.
    """
    return KeyInfo(ANONYMOUS_ID, ANONYMOUS_ID, tier, 0)


class KeyStore:
    """Creates, lists, revokes and verifies API keys in Redis.

    Example::

        store = KeyStore(redis.Redis.from_url(url))
        raw, info = store.create("alice", "pro")   # show ``raw`` once; it is not kept
        assert store.verify(raw) == info
    """

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._create = client.register_script(CREATE)
        # Only its cancel is used, which needs no TTL.
        self._jobs = JobStore(client, ttl_s=0)

    def create(self, name: str, tier: str, raw: str | None = None) -> tuple[str, KeyInfo]:
        """Make a new key; the caller must show it now, as only its hash is stored.

        :param name: who or what the key is for.
        :param tier: the tier whose limits the key gets.
        :param raw: register this key instead of drawing one (``sluice run``'s demo
            key); registering the same key again returns its existing record.
        :return: the raw key and its stored record.
        :raises ValueError: an empty or overlong name or tier, or a ``raw`` key whose
            id is taken by another key.
        """
        for what, value in (("name", name), ("tier", tier)):
            if not value or len(value) > MAX_NAME_CHARS:
                raise ValueError(f"key {what} must have 1..{MAX_NAME_CHARS} characters, "
                                 f"got {value!r}")
        given = raw
        if given is not None:
            existing = self.verify(given)
            if existing is not None:
                return given, existing
        while True:
            raw = given or KEY_PREFIX + secrets.token_urlsafe(32)
            digest = hash_key(raw)
            info = KeyInfo(digest[:KEY_ID_HEX], name, tier, int(time.time() * 1000))
            # 64-bit ids never collide in practice; if one does, draw again rather
            # than overwrite someone's key.
            if self._create(keys=[keys.api_key(info.key_id), keys.API_KEYS],
                            args=[digest, name, tier, info.created_ms, info.key_id]):
                return raw, info
            if given is not None:
                # Registered a moment ago by a concurrent first use of the same key.
                existing = self.verify(given)
                if existing is not None:
                    return given, existing
                raise ValueError(f"key id {info.key_id} is taken (or that key was revoked)")

    def get(self, key_id: str) -> KeyInfo | None:
        """Read a key's record by id, or ``None`` when there is none."""
        return _info(key_id, _fields(self.redis.hgetall(keys.api_key(key_id))))

    def list(self) -> list[KeyInfo]:
        """Every key, oldest first, revoked ones included."""
        ids = [_text(i) for i in self.redis.zrange(keys.API_KEYS, 0, -1)]
        pipe = self.redis.pipeline(transaction=False)
        for key_id in ids:
            pipe.hgetall(keys.api_key(key_id))
        found = (_info(i, _fields(raw)) for i, raw in zip(ids, pipe.execute(), strict=True))
        return [info for info in found if info is not None]

    def revoke(self, key_id: str) -> KeyInfo:
        """Revoke a key everywhere at once.  Revoking twice is harmless (and tells everyone again).

        From now on :meth:`verify` refuses it; every front end hears of it on
        :data:`tasks.keys.REVOKED` and closes the key's open sockets; and the
        key's unsettled jobs (those holding a concurrency slot) are cancelled,
        so a revoked key stops spending at once.

        :return: the revoked key's record.
        :raises KeyNotFoundError: no key has this id.
        """
        info = self.get(key_id)
        if info is None:
            raise KeyNotFoundError(f"no API key with id {key_id!r}")
        pipe = self.redis.pipeline()
        if info.active:
            revoked_ms = int(time.time() * 1000)
            pipe.hset(keys.api_key(key_id), mapping={"state": REVOKED, "revoked_ms": revoked_ms})
            info = KeyInfo(info.key_id, info.name, info.tier, info.created_ms, REVOKED,
                           revoked_ms)
        pipe.publish(keys.REVOKED, key_id)
        pipe.zrange(keys.slots(key_id), 0, -1)
        unsettled = pipe.execute()[-1]
        # Jobs admitted after this read are cancelled by the front end whose
        # socket submitted them, once it hears of the revocation.
        for job_id in unsettled:
            self._jobs.request_cancel(_text(job_id))
        return info

    def active_ids(self, key_ids: Iterable[str]) -> set[str]:
        """Which of ``key_ids`` are active keys now (one round trip).

        :raises redis.RedisError: Redis cannot be reached.
        """
        ids = list(key_ids)
        pipe = self.redis.pipeline(transaction=False)
        for key_id in ids:
            pipe.hget(keys.api_key(key_id), "state")
        states = pipe.execute()
        return {i for i, state in zip(ids, states, strict=True)
                if state is not None and _text(state) == ACTIVE}

    def verify(self, raw_key: str) -> KeyInfo | None:
        """Return the record of an active key, or ``None`` for an unknown or revoked one.

        :param raw_key: the key as the client presented it (``Bearer`` token).
        :raises redis.RedisError: Redis cannot be reached; the caller decides what that means.
        """
        # Keys are ASCII; anything else (a lone surrogate included) is no key.
        if not raw_key.startswith(KEY_PREFIX) or len(raw_key) > MAX_KEY_CHARS \
                or not raw_key.isascii():
            return None
        digest = hash_key(raw_key)
        key_id = digest[:KEY_ID_HEX]
        fields = _fields(self.redis.hgetall(keys.api_key(key_id)))
        if not hmac.compare_digest(fields.get("hash", ""), digest):
            return None
        info = _info(key_id, fields)
        return info if info is not None and info.active else None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _fields(raw: Mapping[Any, Any]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in raw.items()}


def _info(key_id: str, fields: dict[str, str]) -> KeyInfo | None:
    if "tier" not in fields:
        return None
    revoked = fields.get("revoked_ms")
    return KeyInfo(key_id, fields["name"], fields["tier"], int(fields["created_ms"]),
                   fields["state"], int(revoked) if revoked else None)


def bearer_token(header: str) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header value, if it holds one."""
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class Authenticator:
    """Says who an API key stands for on this gateway.

    Example::

        auth = Authenticator(KeyStore(client), allow_anonymous=False)
        key = auth.authenticate(raw)      # None: refuse
    """

    def __init__(self, store: KeyStore, *, allow_anonymous: bool = False,
                 anonymous_tier: str = "free", demo_key: str = "") -> None:
        self.store = store
        self.allow_anonymous = allow_anonymous
        self.anonymous_tier = anonymous_tier
        self.demo_key = demo_key

    def authenticate(self, raw_key: str | None) -> KeyInfo | None:
        """The identity behind an API key, or ``None`` if it may not use the gateway.

        No key means anonymous, when that is enabled.  ``sluice run``'s demo key
        is registered on its first use.

        :raises redis.RedisError: Redis cannot be reached.
        """
        if raw_key is None:
            return anonymous_key(self.anonymous_tier) if self.allow_anonymous else None
        info = self.store.verify(raw_key)
        if info is None and self.demo_key and raw_key == self.demo_key:
            try:
                info = self.store.create("demo", "pro", raw=raw_key)[1]
            except ValueError:
                return None  # the demo key was revoked
        return info
