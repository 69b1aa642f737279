"""HTTP/1.1 for the lean path: one endpoint, requests written whole, replies read by a
sans-IO parser (:class:`Reply`) that both pools feed, and the synchronous pool of kept-alive
connections.

A connection taken from the pool may have been closed by the server while idle (DynamoDB
closes idle connections after a while, and load balancers do). A request on such a
connection fails before any byte of reply arrives: it is sent again at once on a new
connection, once. Any other failure goes to the caller (and to the retry policy there).
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import threading
from urllib.parse import urlsplit

import msgspec

_MAX_HEAD = 64 * 1024
_DEFAULT_PORTS = {"http": 80, "https": 443}


class Endpoint(msgspec.Struct, frozen=True):
    """Where requests go: ``url`` split into what a connection and the signature need."""

    url: str
    scheme: str
    hostname: str
    port: int
    #: the ``Host`` header (and the signed host): the port only when it is not the default
    host: str
    path: str

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        hostname = parts.hostname or ""
        port = parts.port or _DEFAULT_PORTS[scheme]
        host = f"[{hostname}]" if ":" in hostname else hostname
        if parts.port is not None and parts.port != _DEFAULT_PORTS[scheme]:
            host = f"{host}:{parts.port}"
        return cls(url, scheme, hostname, port, host, parts.path or "/")

    @property
    def tls(self) -> bool:
        return self.scheme == "https"


def tls_context() -> ssl.SSLContext:
    """Verification as botocore does it: ``AWS_CA_BUNDLE``, else certifi's bundle, else the
    bundle botocore ships."""
    bundle = os.environ.get("AWS_CA_BUNDLE")
    if not bundle:
        try:
            import certifi

            bundle = certifi.where()
        except ImportError:
            import importlib.util

            spec = importlib.util.find_spec("botocore")
            if spec is not None and spec.origin is not None:
                bundle = os.path.join(os.path.dirname(spec.origin), "cacert.pem")
    return ssl.create_default_context(cafile=bundle or None)


def request_bytes(endpoint: Endpoint, headers: dict[str, str], body: bytes) -> bytes:
    lines = [f"POST {endpoint.path} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append(f"content-length: {len(body)}")
    lines.append("user-agent: idem-core-dynamodb")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Reply:
    """A reply read from bytes as they arrive: ``feed`` until it returns True."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0  # parsed up to here (chunked bodies)
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""
        self.keep_alive = True
        self.received = False  # any byte at all: past this, a request is not resent blindly
        self._head = False
        self._length: int | None = None
        self._chunked = False
        self._chunks: list[bytes] = []

    def feed(self, data: bytes) -> bool:
        if not data:
            return self._eof()
        self.received = True
        self._buf += data
        while not self._head:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > _MAX_HEAD:
                    raise _bad("reply head too long")
                return False
            self._parse_head(bytes(self._buf[:end]))
            del self._buf[: end + 4]
            if 100 <= self.status < 200:  # an interim reply: the real one follows
                self._head = False
                self.headers = {}
        if self._chunked:
            return self._chunk()
        if self._length is not None:
            if len(self._buf) < self._length:
                return False
            self.body = bytes(self._buf[: self._length])
            return True
        return False  # delimited by the end of the connection

    def _eof(self) -> bool:
        if self._head and self._length is None and not self._chunked:
            self.body = bytes(self._buf)
            self.keep_alive = False
            return True
        where = "in the middle of the reply" if self.received else "before replying"
        raise ConnectionResetError(f"DynamoDB closed the connection {where}")

    def _parse_head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise _bad(f"not an HTTP reply: {lines[0][:100]!r}")
        self.status = int(parts[1])
        headers = self.headers
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise _bad(f"bad reply header {line[:100]!r}")
            headers[name.strip().lower()] = value.strip()
        self._head = True
        connection = headers.get("connection", "").lower()
        self.keep_alive = parts[0] == "HTTP/1.1" and "close" not in connection
        if parts[0] != "HTTP/1.1" and "keep-alive" in connection:
            self.keep_alive = True
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._chunked = True
        elif "content-length" in headers:
            try:
                self._length = int(headers["content-length"])
            except ValueError:
                raise _bad("bad content-length") from None
        elif self.status in (204, 304):
            self._length = 0
        else:
            self.keep_alive = False

    def _chunk(self) -> bool:
        buf = self._buf
        while True:
            end = buf.find(b"\r\n", self._pos)
            if end < 0:
                return False
            line = bytes(buf[self._pos : end]).split(b";", 1)[0].strip()
            try:
                size = int(line, 16)
            except ValueError:
                raise _bad(f"bad chunk size {line[:20]!r}") from None
            if size == 0:
                # Trailers (none expected) end with an empty line.
                done = buf.find(b"\r\n\r\n", end)
                if done < 0 and buf[end + 2 : end + 4] != b"\r\n":
                    return False
                self.body = b"".join(self._chunks)
                return True
            start = end + 2
            if len(buf) < start + size + 2:
                return False
            self._chunks.append(bytes(buf[start : start + size]))
            self._pos = start + size + 2


def _bad(what: str) -> ConnectionError:
    from .protocol import BadReply

    return BadReply(what)


class _Conn:
    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class Pool:
    """Kept-alive connections to one endpoint, shared by threads."""

    def __init__(
        self, endpoint: Endpoint, connect_timeout: float, read_timeout: float, size: int
    ) -> None:
        self.endpoint = endpoint
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.size = size
        self._idle: list[_Conn] = []
        self._lock = threading.Lock()
        self._tls: ssl.SSLContext | None = tls_context() if endpoint.tls else None
        #: connections opened so far (tests read it: keep-alive means few)
        self.opened = 0

    def _connect(self) -> _Conn:
        e = self.endpoint
        sock = socket.create_connection((e.hostname, e.port), timeout=self.connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_hostname=e.hostname)
            sock.settimeout(self.read_timeout)
        except BaseException:
            sock.close()
            raise
        self.opened += 1
        return _Conn(sock)

    def send(self, data: bytes) -> Reply:
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is not None:
            reply = Reply()
            try:
                return self._exchange(conn, data, reply)
            except ConnectionError:
                if reply.received:
                    raise
                # Closed while idle, before any byte of reply: send it again, once, on a
                # new connection (a server closing an idle connection has not read it).
        return self._exchange(self._connect(), data, Reply())

    def _exchange(self, conn: _Conn, data: bytes, reply: Reply) -> Reply:
        try:
            conn.sock.sendall(data)
            recv = conn.sock.recv
            while not reply.feed(recv(65536)):
                pass
        except BaseException:
            conn.close()
            raise
        if reply.keep_alive:
            with self._lock:
                if len(self._idle) < self.size:
                    self._idle.append(conn)
                    return reply
        conn.close()
        return reply

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
