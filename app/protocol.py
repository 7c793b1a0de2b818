"""The WebSocket wire protocol: client frames, validated into requests.

Client → server frames are JSON objects with a ``type``: ``auth`` (browsers,
which cannot set a header on a WebSocket, send their key in this first
frame), ``generate``, ``bulk`` (many ``generate`` requests at once), ``resume`` or
``cancel``.  Anything else gets a :class:`ProtocolError` whose ``code`` is
stable and whose message names the bad value.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from tasks.bulk_store import BULK_ID_HEX
from tasks.config import Settings
from tasks.jobs import JOB_ID, JobSpec

ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
MAX_REF_CHARS = 200
MAX_SESSION_CHARS = 200
#: Deepest nesting a frame may have; real frames need 4 (a message inside ``messages``).
MAX_DEPTH = 32
BULK_ID = re.compile(f"^[0-9a-f]{{{BULK_ID_HEX}}}$")
#: A lone surrogate cannot be encoded as UTF-8: it would fail wherever the text goes next.
_SURROGATE = re.compile("[\ud800-\udfff]")


class ProtocolError(Exception):
    """A client frame that cannot be served; the socket stays open."""

    def __init__(self, code: str, message: str, ref: Any = None, *,
                 retry_after: float | None = None, scope: str | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref
        #: Seconds after which the same frame would be accepted (``rate_limited``).
        self.retry_after = retry_after
        #: Which frame budget refused it: ``socket`` or ``key`` (``rate_limited``).
        self.scope = scope
        #: Further fields of the error frame (a refused ``bulk``'s per-item ``items``).
        self.extra = extra

    def frame(self) -> str:
        """The ``error`` frame telling the client what was wrong."""
        body: dict[str, Any] = {"type": "error", "ref": self.ref, "code": self.code,
                                "message": self.message}
        if self.retry_after is not None:
            body["retry_after"] = self.retry_after
        if self.scope is not None:
            body["scope"] = self.scope
        return json.dumps({**body, **(self.extra or {})})


@dataclass(frozen=True)
class Auth:
    """Authenticate the socket with an API key."""

    ref: Any
    key: str


@dataclass(frozen=True)
class Generate:
    """Start a job."""

    ref: Any
    spec: JobSpec
    #: Whether the client set max_tokens (else the tier's default allowance applies).
    max_tokens_given: bool = True


@dataclass(frozen=True)
class Resume:
    """Replay a job's events after ``after``, then follow it live."""

    ref: Any
    job_id: str
    after: int


@dataclass(frozen=True)
class Bulk:
    """Submit many items at once; each is a valid :class:`Generate` or why it is not."""

    ref: Any
    items: list[Generate | ProtocolError]


@dataclass(frozen=True)
class Cancel:
    """Stop a job (``job_id``), or every item of a bulk (``bulk_id``)."""

    ref: Any
    job_id: str | None
    bulk_id: str | None = None


Request = Auth | Generate | Bulk | Resume | Cancel


def parse(text: str | bytes, settings: Settings) -> Request:
    """Validate one client frame.

    :raises ProtocolError: the frame is not valid; the error names the problem.
    """
    if isinstance(text, bytes):
        raise ProtocolError("bad_frame", "frames must be JSON text, not binary")
    try:
        frame = json.loads(text)
    except ValueError as e:
        raise ProtocolError("bad_json", f"frame is not valid JSON: {e}") from e
    except RecursionError as e:
        raise ProtocolError("bad_json", f"frame is nested too deeply; at most {MAX_DEPTH} "
                            "levels are allowed") from e
    if not isinstance(frame, dict):
        raise ProtocolError("bad_frame", f"frame must be a JSON object, not {_kind(frame)}")
    ref = frame.get("ref")
    if not _good_ref(ref) or (isinstance(ref, str) and _SURROGATE.search(ref)):
        raise ProtocolError("bad_field", f"'ref' must be a string or integer of at most "
                            f"{MAX_REF_CHARS} characters")
    kind = frame.get("type")
    try:
        _check_text(frame)
        if kind == "generate":
            return generate_request(frame, settings, ref)
        if kind == "bulk":
            return bulk_request(frame, settings, ref)
        if kind == "auth":
            key = frame.get("key")
            if not isinstance(key, str) or not key:
                raise ProtocolError("bad_field", "'key' must be a non-empty string")
            return Auth(ref, key)
        if kind == "resume":
            return Resume(ref, _job_id(frame), _int(frame, "after", -1, -1, 2**53))
        if kind == "cancel":
            return _cancel(frame, ref)
    except ProtocolError as e:
        e.ref = ref
        raise
    raise ProtocolError("unknown_type", f"unknown frame type {kind!r:.40}; expected "
                        "'auth', 'generate', 'bulk', 'resume' or 'cancel'", ref)


def generate_request(fields: dict[str, Any], settings: Settings, ref: Any = None) -> Generate:
    """Validate a generation request: a ``generate`` frame's fields, or an HTTP API body's.

    :param fields: ``prompt`` or ``messages``, and optionally ``model``, ``max_tokens``,
        ``temperature``, ``seed``, ``session``; other keys are ignored.
    :raises ProtocolError: a field is missing or bad; the error names it.
    """
    return Generate(ref, _spec(fields, settings), "max_tokens" in fields)


def bulk_request(frame: dict[str, Any], settings: Settings, ref: Any = None) -> Bulk:
    """Validate a ``bulk`` frame: its ``items`` list, and each item as a ``generate``.

    A bad item does not sink the others: it is kept as its :class:`ProtocolError`
    (with the item's ``ref``), in its place.

    :raises ProtocolError: ``items`` is missing, not a list, empty (``bad_field``),
        or longer than ``settings.bulk_max_items`` (``too_many_items``).
    """
    items = frame.get("items")
    if items is None:
        raise ProtocolError("missing_field", "'items' is required: a list of requests, each "
                            "like a 'generate' frame's fields")
    if not isinstance(items, list):
        raise ProtocolError("bad_field", f"'items' must be a list, not {_kind(items)}")
    if not items:
        raise ProtocolError("bad_field", "'items' must hold at least one request")
    if len(items) > settings.bulk_max_items:
        raise ProtocolError("too_many_items", f"'items' holds {len(items)} requests; a bulk "
                            f"frame may hold at most {settings.bulk_max_items}")
    out: list[Generate | ProtocolError] = []
    for i, item in enumerate(items):
        item_ref = item.get("ref") if isinstance(item, dict) else None
        try:
            if not isinstance(item, dict):
                raise ProtocolError("bad_field", f"items[{i}] must be an object, not "
                                    f"{_kind(item)}")
            if not _good_ref(item_ref):
                item_ref = None
                raise ProtocolError("bad_field", f"items[{i}].ref must be a string or integer "
                                    f"of at most {MAX_REF_CHARS} characters")
            out.append(generate_request(item, settings, item_ref))
        except ProtocolError as e:
            e.ref = item_ref
            out.append(e)
    return Bulk(ref, out)


def _cancel(frame: dict[str, Any], ref: Any) -> Cancel:
    bulk_id = frame.get("bulk_id")
    if bulk_id is None:
        return Cancel(ref, _job_id(frame))
    if "job_id" in frame:
        raise ProtocolError("bad_frame", "give one of 'job_id' or 'bulk_id', not both")
    if not isinstance(bulk_id, str) or not BULK_ID.match(bulk_id):
        raise ProtocolError("bad_field", f"'bulk_id' must be {BULK_ID_HEX} lowercase hex "
                            f"digits, got {bulk_id!r:.60}")
    return Cancel(ref, None, bulk_id)


def _good_ref(ref: Any) -> bool:
    return ref is None or (isinstance(ref, (str, int)) and not isinstance(ref, bool)
                           and len(str(ref)) <= MAX_REF_CHARS)


def _spec(frame: dict[str, Any], settings: Settings) -> JobSpec:
    models = settings.model_names
    model = frame.get("model", models[0])
    if not isinstance(model, str):
        raise ProtocolError("bad_field", f"'model' must be a string, not {_kind(model)}")
    if model not in models:
        raise ProtocolError("unknown_model", f"unknown model {model!r}; available: "
                            f"{', '.join(models)}")
    session = frame.get("session")
    if session is not None and not (isinstance(session, str)
                                    and 0 < len(session) <= MAX_SESSION_CHARS):
        raise ProtocolError("bad_field", f"'session' must be a non-empty string of at most "
                            f"{MAX_SESSION_CHARS} characters")
    temperature = frame.get("temperature")
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise ProtocolError("bad_field", f"'temperature' must be a number, not "
                                f"{_kind(temperature)}")
        if not math.isfinite(temperature):
            raise ProtocolError("bad_field", f"'temperature' must be a finite number, "
                                f"got {temperature}")
        if not 0 <= temperature <= 2:
            raise ProtocolError("out_of_range", f"'temperature' must be within 0..2, "
                                f"got {temperature}")
        temperature = float(temperature)
    seed = _int(frame, "seed", None, -(2**63), 2**63 - 1)
    return JobSpec(model=model, messages=_messages(frame, settings),
                   max_tokens=_int(frame, "max_tokens", settings.default_max_tokens, 1,
                                   settings.max_tokens_limit),
                   temperature=temperature, seed=seed, session=session)


def _messages(frame: dict[str, Any], settings: Settings) -> list[dict[str, Any]]:
    prompt, messages = frame.get("prompt"), frame.get("messages")
    if (prompt is None) == (messages is None):
        raise ProtocolError("missing_field", "give exactly one of 'prompt' or 'messages'")
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt:
            raise ProtocolError("bad_field", "'prompt' must be a non-empty string")
        messages = [{"role": "user", "content": prompt}]
    if not isinstance(messages, list) or not messages:
        raise ProtocolError("bad_field", "'messages' must be a non-empty list")
    size = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES \
                or not isinstance(m.get("content"), str):
            raise ProtocolError("bad_field", f"messages[{i}] must be an object with a 'role' "
                                f"({', '.join(sorted(ROLES))}) and a string 'content'")
        size += len(m["content"])
    if size > settings.max_prompt_chars:
        raise ProtocolError("too_large", f"the prompt has {size} characters; the limit is "
                            f"{settings.max_prompt_chars}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _int(frame: dict[str, Any], name: str, default: Any, lo: int, hi: int) -> Any:
    value = frame.get(name, default)
    if value is None or value is default:
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError("bad_field", f"{name!r} must be an integer, not {_kind(value)}")
    if not lo <= value <= hi:
        raise ProtocolError("out_of_range", f"{name!r} must be within {lo}..{hi}, got {value}")
    return value


def _job_id(frame: dict[str, Any]) -> str:
    job_id = frame.get("job_id")
    if job_id is None:
        raise ProtocolError("missing_field", "'job_id' is required")
    if not isinstance(job_id, str) or not JOB_ID.match(job_id):
        raise ProtocolError("bad_field", f"'job_id' must be 32 lowercase hex digits, "
                            f"got {job_id!r:.60}")
    return job_id


def _check_text(frame: dict[str, Any]) -> None:
    """Refuse frames nested deeper than :data:`MAX_DEPTH` or holding a lone surrogate.

    Every string counts, keys and fields Sluice ignores included: JSON's
    ``\\ud800`` escape decodes to text that no later step can encode.
    Iterative, so no frame can exhaust the stack.
    """
    todo: list[tuple[Any, str, int]] = [(frame, "", 1)]
    while todo:
        value, path, depth = todo.pop()
        if isinstance(value, str):
            if not value.isascii() and _SURROGATE.search(value):
                raise ProtocolError("bad_field", f"{path} holds a lone UTF-16 surrogate; "
                                    "strings must be valid Unicode")
        elif isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                raise ProtocolError("bad_frame", f"frame is nested deeper than {MAX_DEPTH} "
                                    f"levels, at {path[:80]}")
            if isinstance(value, dict):
                for k, v in value.items():
                    name = f"{path[1:-1]}.{k:.40}" if path else f"{k:.40}"
                    # Pushed after its value, so a bad key is reported before its name is used.
                    todo.append((v, f"'{name}'", depth + 1))
                    todo.append((k, f"a key of {path or 'the frame'}", depth))
            else:
                todo.extend((v, f"'{path[1:-1]}[{i}]'", depth + 1) for i, v in enumerate(value))


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null", int: "an integer", float: "a number"}.get(type(value), "?")
