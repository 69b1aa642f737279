"""A loopback TCP proxy that the fault tests put between a store and its real server.

The proxy passes bytes both ways until a test tells it to fail the path:

- ``blackhole()``: every connection stays open and no byte flows either way, new connections
  included (their handshake completes, as with a frozen server whose kernel still answers). What
  was in flight is held, and flows again after ``heal()``.
- ``drop()``: every connection is closed (FIN both ways); new ones are closed at once.
- ``reset()``: every connection is reset (RST); new ones are reset at once.
- ``reset_mid_reply()``: the next chunk the server sends is cut halfway, then the client's
  connection is reset: a reply lost in the middle.
- ``heal()``: pass traffic again (connections closed meanwhile stay closed).

Usage::

    with FaultProxy("127.0.0.1", 5432) as proxy:
        url = f"postgresql://postgres@127.0.0.1:{proxy.port}/test"
        ...
        proxy.blackhole()
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from types import TracebackType

_CHUNK = 65536


def _abort(sock: socket.socket, rst: bool) -> None:
    with contextlib.suppress(OSError):
        if rst:
            # SO_LINGER with a zero timeout turns close() into an RST; SHUT_RD wakes a pump
            # thread blocked in recv() on this socket, which would otherwise hold the file
            # open and delay the close (and the RST) until its next byte.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.shutdown(socket.SHUT_RD)
        else:
            sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


class _Link:
    """One client connection and its connection to the server, pumped by two threads."""

    def __init__(self, proxy: FaultProxy, client: socket.socket, server: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.server = server
        self.closed = False

    def start(self) -> None:
        """Pump both ways. Only once the proxy lists the link: a fault injected after the
        client's first byte went through must find the link to cut (on a loaded machine the
        accept thread could otherwise list it only after a whole request and reply)."""
        pairs = ((self.client, self.server, False), (self.server, self.client, True))
        for src, dst, from_server in pairs:
            threading.Thread(target=self._pump, args=(src, dst, from_server), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_server: bool) -> None:
        proxy = self.proxy
        try:
            while True:
                data = src.recv(_CHUNK)
                if not data:
                    break
                with proxy._cond:
                    # Blackholed: hold the bytes until healed or until this link is killed.
                    proxy._cond.wait_for(lambda: proxy._mode != "blackhole" or self.closed)
                    if self.closed:
                        return
                    cut = from_server and proxy._cut_next
                    if cut:
                        proxy._cut_next = False
                if cut:
                    dst.sendall(data[: max(1, len(data) // 2)])
                    self.kill(rst=True)
                    return
                dst.sendall(data)
        except OSError:
            pass
        self.kill(rst=False)

    def kill(self, rst: bool) -> None:
        with self.proxy._cond:
            if self.closed:
                return
            self.closed = True
            self.proxy._links.discard(self)
            self.proxy._cond.notify_all()
        _abort(self.client, rst)
        _abort(self.server, rst)


class FaultProxy:
    """Listens on 127.0.0.1:``port`` (a free port) and forwards to ``host``:``target_port``."""

    def __init__(self, host: str, target_port: int) -> None:
        self.target = (host, target_port)
        self._cond = threading.Condition()
        self._mode = "pass"
        self._cut_next = False
        self._links: set[_Link] = set()
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port: int = self._listener.getsockname()[1]
        self._stopped = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            mode = self._mode
            if mode in ("drop", "reset"):
                _abort(client, rst=mode == "reset")
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
                server.settimeout(None)
            except OSError:
                _abort(client, rst=True)
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(self, client, server)
            with self._cond:
                # A drop or reset injected while this connection was being set up killed
                # the links listed then, not this one: it goes the same way.
                cut = self._mode in ("drop", "reset")
                if not cut:
                    self._links.add(link)
            if cut:
                _abort(client, rst=self._mode == "reset")
                _abort(server, rst=False)
                continue
            link.start()

    def _kill_all(self, rst: bool) -> None:
        with self._cond:
            links = list(self._links)
        for link in links:
            link.kill(rst)

    def _set(self, mode: str) -> None:
        with self._cond:
            self._mode = mode
            self._cond.notify_all()

    def blackhole(self) -> None:
        self._set("blackhole")

    def drop(self) -> None:
        self._set("drop")
        self._kill_all(rst=False)

    def reset(self) -> None:
        self._set("reset")
        self._kill_all(rst=True)

    def reset_mid_reply(self) -> None:
        with self._cond:
            self._cut_next = True

    def heal(self) -> None:
        with self._cond:
            self._cut_next = False
        self._set("pass")

    @property
    def connections(self) -> int:
        """Connections open through the proxy now."""
        with self._cond:
            return len(self._links)

    def close(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        with contextlib.suppress(OSError):
            self._listener.close()
        self._set("pass")
        self._kill_all(rst=False)
        self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
