"""The asyncio pool of kept-alive connections: the twin of :class:`.http.Pool` on asyncio
streams, reading replies with the same parser. It belongs to the event loop it was made in
(the store makes one per loop)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl

from .http import Endpoint, Reply, tls_context


class _Conn:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        # A loop that is already closed cannot schedule the close: the socket goes with it.
        with contextlib.suppress(RuntimeError):
            self.writer.close()


class AsyncPool:
    def __init__(
        self, endpoint: Endpoint, connect_timeout: float, read_timeout: float, size: int
    ) -> None:
        self.endpoint = endpoint
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.size = size
        self._idle: list[_Conn] = []
        self._tls: ssl.SSLContext | None = tls_context() if endpoint.tls else None
        self.opened = 0

    async def _connect(self) -> _Conn:
        e = self.endpoint
        async with asyncio.timeout(self.connect_timeout):
            reader, writer = await asyncio.open_connection(
                e.hostname,
                e.port,
                ssl=self._tls,
                server_hostname=e.hostname if self._tls is not None else None,
                limit=2**20,
            )
        self.opened += 1
        return _Conn(reader, writer)

    async def send(self, data: bytes) -> Reply:
        conn = None
        while self._idle:
            conn = self._idle.pop()
            if not (conn.reader.at_eof() or conn.writer.transport.is_closing()):
                break
            conn.close()  # the server closed it while idle
            conn = None
        if conn is not None:
            reply = Reply()
            try:
                return await self._exchange(conn, data, reply)
            except ConnectionError:
                if reply.received:
                    raise
                # Closed while idle, before any byte of reply: once more, on a new one.
        return await self._exchange(await self._connect(), data, Reply())

    async def _exchange(self, conn: _Conn, data: bytes, reply: Reply) -> Reply:
        try:
            conn.writer.write(data)
            read = conn.reader.read
            async with asyncio.timeout(self.read_timeout):
                while not reply.feed(await read(65536)):
                    pass
        except BaseException:
            conn.close()
            raise
        if reply.keep_alive and len(self._idle) < self.size:
            self._idle.append(conn)
        else:
            conn.close()
        return reply

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
