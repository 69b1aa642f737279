"""The fault proxy itself, against the machine's Redis: each fault does what the tests rely on."""

from __future__ import annotations

import socket
import time

import pytest
from fault_proxy import FaultProxy
from support import port_open, server_missing

PING = b"*1\r\n$4\r\nPING\r\n"
BIG = b"*2\r\n$4\r\nECHO\r\n$100000\r\n" + b"x" * 100000 + b"\r\n"


@pytest.fixture
def proxy() -> FaultProxy:
    if not port_open("127.0.0.1", 6379):
        server_missing("Redis on 127.0.0.1:6379", "connection refused")
    with FaultProxy("127.0.0.1", 6379) as p:
        yield p  # type: ignore[misc]


def _client(proxy: FaultProxy) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
    s.sendall(PING)
    assert s.recv(100) == b"+PONG\r\n"
    return s


def test_passes_traffic(proxy: FaultProxy) -> None:
    s = _client(proxy)
    s.sendall(PING)
    assert s.recv(100) == b"+PONG\r\n"
    s.close()


def test_blackhole_holds_bytes_until_healed(proxy: FaultProxy) -> None:
    s = _client(proxy)
    proxy.blackhole()
    s.settimeout(0.5)
    s.sendall(PING)
    with pytest.raises(TimeoutError):
        s.recv(100)
    fresh = socket.create_connection(("127.0.0.1", proxy.port), timeout=0.5)
    fresh.sendall(PING)
    with pytest.raises(TimeoutError):
        fresh.recv(100)
    proxy.heal()
    s.settimeout(2)
    assert s.recv(100) == b"+PONG\r\n"
    fresh.settimeout(2)
    assert fresh.recv(100) == b"+PONG\r\n"


def test_drop_closes_connections(proxy: FaultProxy) -> None:
    s = _client(proxy)
    proxy.drop()
    time.sleep(0.1)
    try:
        s.sendall(PING)
        assert s.recv(100) == b""
    except ConnectionError:
        pass
    fresh = socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
    try:
        fresh.sendall(PING)
        assert fresh.recv(100) == b""
    except ConnectionError:
        pass
    proxy.heal()
    _client(proxy).close()


def test_reset_sends_rst(proxy: FaultProxy) -> None:
    s = _client(proxy)
    proxy.reset()
    time.sleep(0.1)
    with pytest.raises(ConnectionResetError):
        s.sendall(PING)
        s.recv(100)


def test_reset_mid_reply_cuts_the_reply(proxy: FaultProxy) -> None:
    s = _client(proxy)
    proxy.reset_mid_reply()
    s.sendall(BIG)
    got = b""
    with pytest.raises(ConnectionResetError):
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            got += chunk
    assert 0 < len(got) < len(BIG)
