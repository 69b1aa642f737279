"""The asyncio twin of :class:`.http.Pool` and :class:`.client.WireClient`: kept-alive
connections to one endpoint, replies read by the same parser (:class:`.http.Reply`). They
belong to the event loop they were made in (the store makes one per loop). Only async
processes import this module (and asyncio).

A connection is an :class:`asyncio.Protocol` that feeds the bytes the loop hands it straight
to the parser and wakes the caller once, when the reply is whole: no stream buffers, no task,
one future and one timer per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any

from .client import Wire
from .http import Endpoint, Reply, tls_context
from .protocol import OPERATIONS, encode, reply
from .sigv4 import Frozen, amz_date


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        #: the reply being read, and the future that waits for it (None while idle)
        self.reply: Reply | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        waiter, got = self.waiter, self.reply
        if waiter is None or got is None or waiter.done():
            self.close()  # bytes nobody asked for: this connection cannot be trusted
            return
        try:
            if got.feed(data):
                waiter.set_result(None)
        except Exception as exc:
            waiter.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        waiter, got = self.waiter, self.reply
        if waiter is None or got is None or waiter.done():
            return
        try:
            if exc is not None:
                raise exc
            got.feed(b"")  # a reply delimited by the end of the connection, or an error
            waiter.set_result(None)
        except Exception as error:
            waiter.set_exception(error)

    def timed_out(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(TimeoutError("DynamoDB did not reply in time"))

    def usable(self) -> bool:
        return not self.lost and self.transport is not None and not self.transport.is_closing()

    def close(self) -> None:
        # A loop that is already closed cannot schedule the close: the socket goes with it.
        if self.transport is not None:
            with contextlib.suppress(RuntimeError):
                self.transport.close()


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
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.connect_timeout):
            _, conn = await loop.create_connection(
                _Conn,
                e.hostname,
                e.port,
                ssl=self._tls,
                server_hostname=e.hostname if self._tls is not None else None,
            )
        self.opened += 1
        return conn

    async def send(self, data: bytes) -> Reply:
        conn = None
        while self._idle:
            conn = self._idle.pop()
            if conn.usable():
                break
            conn.close()  # the server closed it while idle
            conn = None
        if conn is not None:
            got = Reply()
            try:
                return await self._exchange(conn, data, got)
            except ConnectionError:
                if got.received:
                    raise
                # Closed while idle, before any byte of reply: once more, on a new one.
        return await self._exchange(await self._connect(), data, Reply())

    async def _exchange(self, conn: _Conn, data: bytes, got: Reply) -> Reply:
        loop = asyncio.get_running_loop()
        conn.reply, conn.waiter = got, loop.create_future()
        timer = loop.call_later(self.read_timeout, conn.timed_out)
        try:
            if conn.lost:
                raise ConnectionResetError("DynamoDB closed the connection before replying")
            conn.transport.write(data)  # type: ignore[union-attr]
            await conn.waiter
        except BaseException:
            conn.close()
            raise
        finally:
            timer.cancel()
            conn.reply = conn.waiter = None
        if got.keep_alive and len(self._idle) < self.size and conn.usable():
            self._idle.append(conn)
        else:
            conn.close()
        return got

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class AsyncWireClient:
    def __init__(self, wire: Wire, pool: AsyncPool) -> None:
        self.wire = wire
        self.pool = pool

    async def _creds(self) -> Frozen:
        # A refresh may be a blocking request (STS, metadata): not in the event loop.
        return await asyncio.to_thread(self.wire.credentials.frozen)

    async def call(self, op: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        wire, operation, body = self.wire, OPERATIONS[op], encode(kwargs)
        credentials = wire.credentials
        attempt, failed = 1, None
        while True:
            try:
                creds = await self._creds() if credentials.stale() else credentials.frozen()
                got = await self.pool.send(wire.request(operation, body, creds, amz_date()))
                result = reply(operation, got.status, got.headers, got.body)
            except Exception as exc:
                delay = wire.retries.delay(exc, attempt)
                if delay is None:
                    raise wire.retries.gave_up(exc, attempt) from None
                attempt, failed = attempt + 1, exc
                await asyncio.sleep(delay)
                continue
            wire.retries.succeeded(failed)
            return result

    def close(self) -> None:
        self.pool.close()
