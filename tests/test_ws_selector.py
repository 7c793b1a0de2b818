"""The one-socket selector the front end gives simple_websocket's reader (see app.ws)."""

from __future__ import annotations

import selectors
import socket

import pytest

from app.ws import ReadableSelector


def test_select_is_empty_until_the_socket_is_readable_then_reports_it() -> None:
    ours, peer = socket.socketpair()
    sel = ReadableSelector()
    try:
        sel.register(ours, selectors.EVENT_READ, True)
        assert sel.select(0.05) == []          # nothing to read: time to ping
        peer.sendall(b"x")
        assert sel.select(10) == [(None, selectors.EVENT_READ)]
        assert ours.recv(1) == b"x"
        assert sel.select(0) == []
        peer.close()                           # end of stream is readable too
        assert sel.select(10)
        assert ours.recv(1) == b""
    finally:
        sel.close()
        ours.close()


def test_a_closed_socket_cannot_be_registered() -> None:
    ours, peer = socket.socketpair()
    ours.close()
    peer.close()
    with pytest.raises(ValueError):
        ReadableSelector().register(ours, selectors.EVENT_READ, True)
