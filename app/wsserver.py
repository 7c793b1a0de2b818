"""simple_websocket's server, read by the greenlet that serves the socket.

simple_websocket runs a reader thread per socket (under gevent, a greenlet)
that reads the socket, answers pings, sends its own pings and hands messages
to :meth:`~simple_websocket.Server.receive` through a buffer and an event.
An idle socket then holds two greenlets (gunicorn's handler waiting in
``receive()``, the reader waiting on the socket), a ``threading.Thread`` and
an ``Event``.  :class:`InlineServer` starts no reader: ``receive()`` waits on
the socket itself and feeds what it reads to wsproto through
simple_websocket's own ``_handle_events`` (which does the framing, answers
pings and the peer's close, and enforces ``max_message_size``), and sends the
pings of ``ping_interval`` between reads.  With the handshake state dropped,
about 15 KiB less per idle socket (see "Memory" in README.rst).

Sending does not involve the reader, so another greenlet may send (and close)
while the handler waits in ``receive()``; ``event.set()`` — simple_websocket's
way to wake a waiting ``receive()`` — wakes it to see the socket closed.
Every send is whole and one at a time (:class:`WholeSends`), and no
extension (``permessage-deflate``) is negotiated.

It overrides ``receive`` and relies on ``Base``'s attributes and
``_handle_events`` as simple_websocket 1.1 has them (pinned in setup.cfg).
"""

from __future__ import annotations

from time import monotonic
from typing import Any

import flask_sock
import simple_websocket
from gevent import get_hub, getcurrent
from gevent.lock import Semaphore
from gevent.monkey import get_original
from gevent.socket import wait as wait_on_watcher
from simple_websocket import ConnectionClosed
from wsproto.events import Ping
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError

#: The real ``select.select`` (gunicorn's gevent worker patches the module), to
#: look at the socket without yielding: ``[fd], [], [], 0`` never blocks.
_select = get_original("select", "select")
#: The first byte of a close frame as a server sends it (FIN, opcode 8, unmasked).
CLOSE_FRAME = b"\x88"


class _Woken(Exception):
    """Thrown into a ``receive()`` waiting on the socket to make it look again."""


class _NoThread:
    """What simple_websocket gets as its reader thread: nothing runs (one for all sockets)."""

    name = "(none)"

    def __init__(self, target: Any = None) -> None:
        pass

    def start(self) -> None:
        """There is no reader to start: ``receive()`` reads."""


_NO_THREAD = _NoThread()


def _no_thread(target: Any = None) -> _NoThread:
    return _NO_THREAD


class Wakeup:
    """The ``event`` of an :class:`InlineServer`: ``set()`` wakes its waiting ``receive()``.

    simple_websocket calls ``event.set()`` when it has something for
    ``receive()``; here that happens in the receiving greenlet itself, so it is
    a no-op then.  From another greenlet (a writer that closed the socket) it
    interrupts the wait, and ``receive()`` finds the socket closed.
    """

    __slots__ = ("watcher",)

    def __init__(self) -> None:
        #: The read watcher ``receive()`` waits on, while it waits.
        self.watcher: Any = None

    def set(self) -> None:
        """Wake the greenlet waiting in ``receive()``, if one is."""
        watcher, self.watcher = self.watcher, None
        if watcher is not None:
            get_hub().cancel_wait(watcher, _Woken())

    def clear(self) -> None:
        """Nothing to clear: the event holds no state between waits."""


class WholeSends:
    """A connection's socket as simple_websocket uses it, each send whole and one at a time.

    simple_websocket 1.1 sends with ``sock.send`` and ignores the count it
    returns: when a slow client has left little room in the socket's buffer,
    the end of a frame is lost and the stream is corrupt from there on
    (simple-websocket issue #45).  And the writer greenlet (a frame) and the
    handler (a ping, a pong, a close) may send at once: gevent refuses a second
    greenlet waiting to write on a socket (``ConcurrentObjectUseError``), and
    two partial sends would interleave.  Here a send is a ``sendall`` under
    the connection's lock.

    The writer greenlet may :meth:`hold` its frames and :meth:`flush` them in
    one ``sendall``: the frames it finds queued together (a catch-up, or
    events that came while it waited) cost one system call, not one each.
    """

    __slots__ = ("held", "holder", "lock", "sock")

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.lock = Semaphore()
        #: Frames kept back by :meth:`hold`, sent together by :meth:`flush`.
        self.held: list[bytes] | None = None
        self.holder: Any = None

    def send(self, data: bytes) -> int:
        """Send all of ``data``, after any send in progress (kept back while held)."""
        if self.held is not None:
            if getcurrent() is self.holder:
                self.held.append(data)
                return len(data)
            # Another greenlet's frame (the handler's ping, pong or close) goes out
            # now, ahead of the held messages: none of them is on the wire yet, and
            # the handler must not wait for a client that reads nothing.  After a
            # close, they are not sent at all.
            if data[:1] == CLOSE_FRAME:
                self.drop()
        with self.lock:
            self.sock.sendall(data)
        return len(data)

    def hold(self) -> None:
        """Keep this greenlet's frames back until :meth:`flush`: one write for many."""
        self.held, self.holder = [], getcurrent()

    def flush(self) -> None:
        """Send the frames kept back since :meth:`hold`, in one write."""
        held, self.held, self.holder = self.held, None, None
        if held:
            with self.lock:
                self.sock.sendall(held[0] if len(held) == 1 else b"".join(held))

    def drop(self) -> None:
        """Forget the frames kept back (the socket failed)."""
        self.held = self.holder = None

    def recv(self, size: int) -> bytes:
        """Read up to ``size`` bytes."""
        data: bytes = self.sock.recv(size)
        return data

    def fileno(self) -> int:
        """The socket's file descriptor."""
        fd: int = self.sock.fileno()
        return fd

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()


class InlineServer(simple_websocket.Server):  # type: ignore[misc]
    """A :class:`simple_websocket.Server` with no reader thread; ``receive()`` reads.

    Same constructor and methods as simple_websocket's (``thread_class`` and
    ``event_class`` are its own).  Example::

        ws = InlineServer.accept(request.environ, ping_interval=25)
        text = ws.receive(timeout=5)      # reads the socket, answers pings
    """

    # simple_websocket's attributes this class uses (set by its __init__).
    event: Wakeup
    sock: WholeSends
    ws: Any
    connected: bool
    input_buffer: list[Any]
    pong_received: bool
    ping_interval: float | None
    receive_bytes: int
    environ: dict[str, Any]

    def __init__(self, environ: dict[str, Any], **options: Any) -> None:
        options.update(thread_class=_no_thread, event_class=Wakeup)
        super().__init__(environ, **options)
        # The handshake is over: keep wsproto's Connection (the framing; it has
        # the same send/receive_data/events as WSConnection), not the
        # handshake's h11 connection, the request it parsed and their buffers.
        self.ws = self.ws.connection
        #: When the next ping is due (``None``: no pings).
        self.next_ping = monotonic() + self.ping_interval if self.ping_interval else None

    def handshake(self) -> None:
        """simple_websocket's handshake, on a :class:`WholeSends` socket, accepting no extension.

        simple_websocket accepts ``permessage-deflate`` (browsers offer it), and
        wsproto then keeps a zlib compressor per socket from its first message
        on: about 100 KiB of a front end's memory per idle socket, for frames
        (JSON tokens) that compress little one at a time.
        """
        # Before anything is sent (the handshake's answer): see WholeSends.
        self.sock = WholeSends(self.sock)
        environ = self.environ
        self.environ = {k: v for k, v in environ.items() if k != "HTTP_SEC_WEBSOCKET_EXTENSIONS"}
        try:
            super().handshake()
        finally:
            self.environ = environ

    def receive(self, timeout: float | None = None) -> Any:
        """The next message (``str`` or ``bytes``); ``None`` once ``timeout`` passes.

        Reads the socket until a whole message is in, answering pings and
        sending ours on time.

        :raises ConnectionClosed: the socket is closed (by the peer, by us, or
            for a missing pong) and no message is left.
        """
        deadline = None if timeout is None else monotonic() + timeout
        while self.connected and not self.input_buffer:
            now = monotonic()
            if deadline is not None and now >= deadline:
                return None
            ping = self.next_ping
            if ping is not None and now >= ping:
                # Read what is in first: a pong may be waiting behind a busy handler.
                if _select([self.sock], [], [], 0)[0]:
                    self._read()
                else:
                    self._ping(now)
                continue
            until = min((t for t in (deadline, ping) if t is not None), default=None)
            if self._wait_readable(None if until is None else until - now):
                self._read()
        if self.input_buffer:
            return self.input_buffer.pop(0)
        raise ConnectionClosed(self.close_reason, self.close_message)

    def _wait_readable(self, timeout: float | None) -> bool:
        """Whether the socket is readable within ``timeout`` (``False``: woken or timed out)."""
        io = get_hub().loop.io(self.sock.fileno(), 1)
        self.event.watcher = io
        try:
            wait_on_watcher(io, timeout)
            return True
        except (TimeoutError, _Woken):
            return False
        finally:
            self.event.watcher = None
            io.close()

    def _read(self) -> None:
        """Read once and feed wsproto, as simple_websocket's reader does."""
        try:
            data = self.sock.recv(self.receive_bytes)
            if not data:
                raise OSError("the peer closed the connection")
            self.ws.receive_data(data)
            self.connected = self._handle_events()
        except (OSError, LocalProtocolError):
            self.connected = False

    def _ping(self, now: float) -> None:
        """Send the ping due; close the socket if the last one was not answered."""
        assert self.ping_interval
        if self.sock.lock.locked():
            # The writer is sending (to a client slow to read): ping a little later.
            self.next_ping = now + min(1.0, self.ping_interval)
            return
        try:
            if not self.pong_received:
                self.close(reason=CloseReason.POLICY_VIOLATION, message="Ping/Pong timeout")
                return
            self.pong_received = False
            self.sock.send(self.ws.send(Ping()))
        except (OSError, LocalProtocolError):
            self.connected = False
            return
        self.next_ping = now + self.ping_interval


def use_with_flask_sock() -> None:
    """Make flask-sock accept its sockets with :class:`InlineServer` (idempotent).

    flask-sock builds its server by the name ``Server`` it imported from
    simple_websocket (flask-sock 0.7, pinned in setup.cfg), with the app's
    ``SOCK_SERVER_OPTIONS``; ``InlineServer`` takes the same arguments.
    """
    flask_sock.Server = InlineServer
