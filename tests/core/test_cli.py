"""``idem check`` as a user runs it (a subprocess) on the machine's real servers: the exit
code says whether a problem was listed, and every failure is one line without a traceback."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import port_open, server_missing

IDEM = [sys.executable, "-m", "idem_core.cli"]
REDIS = ("127.0.0.1", 6379)
POSTGRES = ("127.0.0.1", 5432)
MARIADB = ("127.0.0.1", 3306)
FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def idem(*args: str, code: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = [*IDEM, *args] if code is None else [sys.executable, "-c", code, *args]
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=120, env={**os.environ, **FAKE_AWS}
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def need(name: str, addr: tuple[str, int]) -> None:
    if not port_open(*addr):
        server_missing(name, f"nothing listens on {addr[0]}:{addr[1]}")


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("idem: ")
    for word in words:
        assert word in lines[0], lines[0]


# -- a store that is fine --------------------------------------------------------------------


def test_memory_and_sqlite_are_ok(tmp_path: Path) -> None:
    for url in ("memory://", f"sqlite:///{tmp_path}/idem.db"):
        proc = idem("check", url)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.splitlines()[-1] == "OK"
        assert proc.stderr == ""


@pytest.mark.parametrize(
    ("name", "addr", "base"),
    [
        ("PostgreSQL", POSTGRES, "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
        ("MariaDB", MARIADB, "mysql+pymysql://root@127.0.0.1:3306/test"),
    ],
)
def test_sql_servers_are_ok(name: str, addr: tuple[str, int], base: str) -> None:
    need(name, addr)
    table = f"idem_check_{uuid.uuid4().hex[:10]}"
    try:
        proc = idem("check", f"{base}?table={table}")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "server_version" in proc.stdout and proc.stdout.splitlines()[-1] == "OK"
    finally:
        from sqlalchemy import create_engine, text

        engine = create_engine(base)
        with engine.begin() as conn:
            conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
        engine.dispose()


# -- problems: listed, and the exit code says so -----------------------------------------------


def test_a_redis_without_persistence_is_a_problem() -> None:
    """The machine's Redis keeps nothing on disk (``save ""``, ``appendonly no``): a restart
    would lose every record, and each retry after it would run again."""
    need("Redis", REDIS)
    proc = idem("check", f"redis://127.0.0.1:6379/0?prefix=idemcheck:{uuid.uuid4().hex}:")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    problems = [line for line in proc.stdout.splitlines() if line.startswith("PROBLEM:")]
    assert len(problems) == 1 and "keeps nothing on disk" in problems[0]
    assert "on disk: save='' appendonly='no'" in proc.stdout


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[int]:
    """A Redis of this test's own, with AOF on."""
    binary = shutil.which("redis-server")
    if binary is None:
        server_missing("redis-server", "not installed (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen(
        [
            *(binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)),
            *("--appendonly", "yes", "--save", ""),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while not port_open("127.0.0.1", port):
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_redis_with_aof_is_ok(durable_redis: int) -> None:
    proc = idem("check", f"redis://127.0.0.1:{durable_redis}/0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "on disk: save='' appendonly='yes'" in proc.stdout
    assert proc.stdout.splitlines()[-1] == "OK"


@pytest.fixture(scope="module")
def moto() -> Iterator[str]:
    """moto's DynamoDB server on a free loopback port."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "idem_bench.moto_atomic", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **FAKE_AWS},
    )
    try:
        deadline = time.monotonic() + 30
        while not port_open("127.0.0.1", port):
            if proc.poll() is not None or time.monotonic() > deadline:
                server_missing("moto server", "did not start")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def test_dynamodb_problems_set_the_exit_code(moto: str) -> None:
    import boto3

    table = f"idem_check_{uuid.uuid4().hex[:8]}"
    client = boto3.client("dynamodb", endpoint_url=moto, **_aws())
    client.create_table(
        TableName=table,
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    url = f"dynamodb://{table}?region=us-east-1&endpoint_url={moto}"
    # Made by hand, without TTL: expired records would stay forever. Before: listed, exit 0.
    proc = idem("check", url)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert any(line.startswith("PROBLEM: TTL is") for line in proc.stdout.splitlines()), proc.stdout
    assert idem("setup", url).returncode == 0
    proc = idem("check", url)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _aws() -> dict[str, str]:
    return {
        "region_name": "us-east-1",
        "aws_access_key_id": "testing",
        "aws_secret_access_key": "testing",
    }


# -- errors: one line, no traceback ------------------------------------------------------------


def test_a_bad_url_is_one_line() -> None:
    assert_one_line_error(idem("check", "not-a-url"), "ConfigurationError", "not a store URL")
    assert_one_line_error(idem("check", "nope://x"), "unknown store URL scheme 'nope'")


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:{port}/0",
        "postgresql+psycopg://postgres@127.0.0.1:{port}/test",
        "mysql+pymysql://root@127.0.0.1:{port}/test",
    ],
)
def test_a_down_server_is_one_line(url: str) -> None:
    port = free_port()  # nothing listens there
    proc = idem("check", url.format(port=port))
    assert_one_line_error(proc, str(port))


@pytest.mark.parametrize(
    ("name", "addr", "url"),
    [
        ("Redis", REDIS, "redis://127.0.0.1:6379/0?no_such_option=1"),
        ("MariaDB", MARIADB, "mysql+pymysql://root@127.0.0.1:3306/test?no_such_option=1"),
        ("PostgreSQL", POSTGRES, "postgresql+psycopg://postgres@127.0.0.1:5432/test?x_opt=1"),
    ],
)
def test_a_wrong_option_is_one_line(name: str, addr: tuple[str, int], url: str) -> None:
    need(name, addr)
    proc = idem("check", url)
    word = "x_opt" if "x_opt" in url else "no_such_option"
    assert_one_line_error(proc, word)


def test_a_missing_extra_is_one_line() -> None:
    # The redis driver is installed here: hide it, as on a machine without idem-core[redis].
    code = (
        "import sys; sys.modules['redis'] = None; from idem_core.cli import main; "
        "sys.exit(main(sys.argv[1:]))"
    )
    proc = idem("check", "redis://127.0.0.1:6379/0", code=code)
    assert_one_line_error(proc, "pip install 'idem-core[redis]'")


def test_setup_and_purge_errors_are_one_line_too() -> None:
    assert_one_line_error(idem("setup", "nope://x"), "nope")
    port = free_port()
    assert_one_line_error(idem("purge", f"mysql+pymysql://root@127.0.0.1:{port}/t"), str(port))


def test_passwords_stay_out_of_messages() -> None:
    proc = idem("check", f"redis://user:s3cret@127.0.0.1:{free_port()}/0")
    assert_one_line_error(proc, "user:***@")
    assert "s3cret" not in proc.stderr
