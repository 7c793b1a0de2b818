"""The socket read by its handler greenlet (app.wsserver): pings, pongs, fragments, closes.

A front end of its own pings every 0.5 s, so keepalive can be seen in a test;
the auth deadline (4408), SIGTERM (1001) and the oversized frame (1009) are in
test_hardening_ws.py and test_protocol.py.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time
import urllib.request
from collections.abc import Callable, Iterator

import gevent
import pytest
import websocket
from gevent import socket as gsocket
from wsproto.connection import Connection, ConnectionType
from wsproto.events import TextMessage

from app.wsserver import InlineServer
from tests.conftest import Client, Proc, start_web, wait_for

PING_S = 0.5
NO_JOB = "0" * 32  # well formed, never a job


@pytest.fixture(scope="module")
def pinging_web(start_proc: Callable[..., Proc], sluice_env: dict[str, str],
                worker: Proc) -> Iterator[str]:
    yield start_web(start_proc, {**sluice_env, "SLUICE_WS_PING_INTERVAL_S": str(PING_S),
                                 "SLUICE_METRICS_PORT": "0"})


def open_sockets(ws_url: str) -> float:
    """The front end's ``sluice_open_sockets`` gauge."""
    url = ws_url.replace("ws://", "http://").replace("/ws", "/metrics")
    with urllib.request.urlopen(url, timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("sluice_open_sockets"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no sluice_open_sockets sample")


def control_frames(ws: websocket.WebSocket, seconds: float,
                   answer: bool = True) -> list[tuple[int, bytes]]:
    """Every frame received within ``seconds``, up to a close; pings and the close are
    answered as a client does, unless not ``answer``."""
    frames = []
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        ws.settimeout(left)
        try:
            if answer:
                opcode, frame = ws.recv_data_frame(control_frame=True)
            else:
                frame = ws.recv_frame()
                opcode = frame.opcode
        except websocket.WebSocketTimeoutException:
            break
        frames.append((opcode, frame.data))
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            break
    return frames


def test_an_idle_socket_is_pinged_and_served_while_it_answers(
        pinging_web: str, connect: Callable[..., Client]) -> None:
    """An idle authenticated socket gets a ping every interval, and stays open while it answers them."""
    c = connect(pinging_web)
    frames = control_frames(c.ws, 8 * PING_S)
    opcodes = [op for op, _ in frames]
    assert websocket.ABNF.OPCODE_CLOSE not in opcodes, frames
    assert 5 <= opcodes.count(websocket.ABNF.OPCODE_PING) <= 9, frames
    c.send(type="cancel", ref=1, job_id=NO_JOB)
    assert c.recv()["code"] == "unknown_job"


def test_a_socket_that_does_not_answer_pings_is_closed_with_1008(
        pinging_web: str, connect: Callable[..., Client]) -> None:
    """A client that reads nothing (so answers no ping) is closed with 1008 at the next ping."""
    wait_for(lambda: open_sockets(pinging_web) == 0, 10, "the other tests' sockets to close")
    c = connect(pinging_web)
    assert open_sockets(pinging_web) == 1
    time.sleep(4 * PING_S)
    frames = control_frames(c.ws, 5, answer=False)  # too late: the server has closed
    assert frames[-1][0] == websocket.ABNF.OPCODE_CLOSE, frames
    assert int.from_bytes(frames[-1][1][:2], "big") == 1008
    wait_for(lambda: open_sockets(pinging_web) == 0, 5, "the server to drop the socket")


def test_the_client_closing_ends_the_socket_on_the_server(
        pinging_web: str, connect: Callable[..., Client]) -> None:
    """The client's close is answered with the same code and the server forgets the socket."""
    wait_for(lambda: open_sockets(pinging_web) == 0, 10, "the other tests' sockets to close")
    c = connect(pinging_web)
    assert open_sockets(pinging_web) == 1
    c.ws.send_close(4000, b"bye")
    frames = control_frames(c.ws, 5)
    assert frames[-1][0] == websocket.ABNF.OPCODE_CLOSE, frames
    assert int.from_bytes(frames[-1][1][:2], "big") == 4000
    wait_for(lambda: open_sockets(pinging_web) == 0, 5, "the server to drop the socket")


def test_a_client_that_vanishes_is_dropped(pinging_web: str, api_key: str) -> None:
    """A client whose connection just ends (no close frame) is dropped by the server."""
    wait_for(lambda: open_sockets(pinging_web) == 0, 10, "the other tests' sockets to close")
    c = Client(pinging_web, api_key)
    assert open_sockets(pinging_web) == 1
    c.ws.shutdown()
    wait_for(lambda: open_sockets(pinging_web) == 0, 5, "the server to drop the socket")


def test_pings_and_fragmented_messages_from_the_client_are_served(
        pinging_web: str, connect: Callable[..., Client]) -> None:
    """The client's ping gets a pong; a message sent in three fragments is served as one."""
    c = connect(pinging_web)
    c.ws.ping(b"hello")
    frames = control_frames(c.ws, 2 * PING_S)
    assert (websocket.ABNF.OPCODE_PONG, b"hello") in frames, frames
    text = json.dumps({"type": "cancel", "ref": "frag", "job_id": NO_JOB}).encode()
    parts = [text[:10], text[10:20], text[20:]]
    c.ws.send_frame(websocket.ABNF.create_frame(parts[0], websocket.ABNF.OPCODE_TEXT, fin=0))
    c.ws.send_frame(websocket.ABNF.create_frame(parts[1], websocket.ABNF.OPCODE_CONT, fin=0))
    c.ws.send_frame(websocket.ABNF.create_frame(parts[2], websocket.ABNF.OPCODE_CONT, fin=1))
    c.ws.settimeout(10)
    reply = c.recv()
    assert reply["ref"] == "frag" and reply["code"] == "unknown_job", reply


def test_a_stream_flows_while_the_socket_waits_for_frames_and_pings(
        pinging_web: str, connect: Callable[..., Client]) -> None:
    """The writer sends a job's events while the handler waits in receive(); a frame mid-stream is served."""
    c = connect(pinging_web)
    c.send(type="generate", ref="a", prompt="stream while idle", max_tokens=40)
    job_id = c.recv()["job_id"]
    c.until(lambda f: f.get("seq") == 3)
    c.send(type="cancel", ref="x", job_id=NO_JOB)
    assert c.until(lambda f: f.get("ref") == "x")["code"] == "unknown_job"
    events = c.finish({job_id})[job_id]
    assert events[-1]["type"] == "done"
    assert [e["seq"] for e in events] == list(range(len(events)))


def test_compression_is_not_negotiated(pinging_web: str, api_key: str) -> None:
    """A client offering permessage-deflate (browsers do) gets a socket without it, and is served."""
    ws = websocket.create_connection(pinging_web, timeout=10, header=[
        f"Authorization: Bearer {api_key}",
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"])
    try:
        assert "sec-websocket-extensions" not in {k.lower() for k in ws.getheaders()}
        ws.send(json.dumps({"type": "cancel", "ref": "z", "job_id": NO_JOB}))
        assert json.loads(ws.recv())["code"] == "unknown_job"
    finally:
        ws.close()


def test_frames_stay_whole_for_a_client_that_reads_slowly(web: str, api_key: str) -> None:
    """The writer's sends find the socket full (partial writes): every frame still arrives whole.

    On the session's front end: this one's pings would close a client that reads nothing.
    """
    ws = websocket.create_connection(web, timeout=30,
                                     header=[f"Authorization: Bearer {api_key}"],
                                     sockopt=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)])
    try:
        jobs = 90
        for i in range(jobs):
            ws.send(json.dumps({"type": "generate", "ref": i, "prompt": f"slow reader {i} " * 20,
                                "max_tokens": 12}))
        time.sleep(3)  # the jobs run while the client reads nothing
        events: dict[str, list[int]] = {}
        done = 0
        while done < jobs:
            frame = json.loads(ws.recv())
            assert frame["type"] != "error", frame
            if "seq" in frame:
                events.setdefault(frame["job_id"], []).append(frame["seq"])
            done += frame["type"] == "done"
        assert all(seqs == list(range(len(seqs))) for seqs in events.values()), events
    finally:
        ws.close()


def test_every_frame_is_sent_whole_to_a_client_that_reads_slowly() -> None:
    """10 MB of frames to a reader with a 4 KiB window: sends that find the socket nearly full
    (a partial write for plain ``socket.send``) still deliver every frame whole and in order.

    The server is InlineServer on a real TCP connection, as gunicorn hands it over; the client
    reads with wsproto.
    """
    listener = gsocket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    client = gsocket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(listener.getsockname())
    conn, _ = listener.accept()
    environ = {"gunicorn.socket": conn, "HTTP_HOST": "test", "HTTP_UPGRADE": "websocket",
               "HTTP_CONNECTION": "Upgrade", "HTTP_SEC_WEBSOCKET_VERSION": "13",
               "HTTP_SEC_WEBSOCKET_KEY": base64.b64encode(os.urandom(16)).decode()}
    frames = [f"{i:06d}" + "x" * 240 for i in range(40_000)]

    def read_all() -> list[str]:
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += client.recv(4096)
        head, rest = buf.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head
        ws = Connection(ConnectionType.CLIENT)
        ws.receive_data(rest)
        got: list[str] = []
        part = ""
        while len(got) < len(frames):
            for event in ws.events():
                assert isinstance(event, TextMessage), event  # garbage ends as a close
                part += event.data
                if event.message_finished:
                    got.append(part)
                    part = ""
            if len(got) == len(frames):
                break
            gevent.sleep(0.001)
            data = client.recv(65536)
            if not data:
                break
            ws.receive_data(data)
        return got

    try:
        server = InlineServer(environ)
        reader = gevent.spawn(read_all)
        for frame in frames:
            server.send(frame)
        got = reader.get(timeout=20)
        assert len(got) == len(frames)
        assert got == frames
    finally:
        for s in (client, conn, listener):
            s.close()
