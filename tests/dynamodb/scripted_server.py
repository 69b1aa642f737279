"""A tiny DynamoDB stand-in on loopback for what no real server does on demand: throttling,
5xx replies, garbled replies. It answers each request with the next scripted reply (then
with ``{}``, which a claim reads as "no previous item") and records what it received."""

from __future__ import annotations

import dataclasses
import http.server
import json
import ssl
import threading
import zlib
from types import TracebackType
from typing import Any


@dataclasses.dataclass
class Received:
    target: str
    headers: dict[str, str]
    body: bytes
    #: the client's (host, port): one per TCP connection
    peer: tuple[str, int]


@dataclasses.dataclass
class Scripted:
    status: int
    body: dict[str, Any] | bytes
    bad_crc: bool = False


def throttled() -> Scripted:
    return Scripted(
        400,
        {
            "__type": "com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException",
            "message": "The level of configured provisioned throughput for the table was exceeded.",
        },
    )


class ScriptedServer:
    def __init__(self, tls: tuple[str, str] | None = None) -> None:
        """``tls``: (certificate file, key file) to serve HTTPS."""
        self.script: list[Scripted] = []
        self.received: list[Received] = []
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(length)
                headers = {k.lower(): v for k, v in self.headers.items()}
                with server._lock:
                    server.received.append(
                        Received(
                            headers.get("x-amz-target", ""), headers, body, self.client_address
                        )
                    )
                    reply = server.script.pop(0) if server.script else Scripted(200, {})
                data = (
                    reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
                )
                crc = zlib.crc32(data) ^ (1 if reply.bad_crc else 0)
                self.send_response(reply.status)
                self.send_header("content-type", "application/x-amz-json-1.0")
                self.send_header("content-length", str(len(data)))
                self.send_header("x-amz-crc32", str(crc))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        scheme = "http"
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
            scheme = "https"
        self.endpoint = f"{scheme}://localhost:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, **options: Any) -> str:
        query = "&".join(
            [f"region=us-east-1&endpoint_url={self.endpoint}"]
            + [f"{k}={v}" for k, v in options.items()]
        )
        return f"dynamodb://idem_scripted?{query}"

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
