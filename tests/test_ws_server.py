"""The socket read by its handler greenlet (app.wsserver): pings, pongs, fragments, closes.

A front end of its own pings every 0.5 s, so keepalive can be seen in a test;
the auth deadline (4408), SIGTERM (1001) and the oversized frame (1009) are in
test_hardening_ws.py and test_protocol.py.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable, Iterator

import pytest
import websocket

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
