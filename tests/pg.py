"""A throwaway PostgreSQL server for the tests: Debian's binaries, a temp folder, a private port.

``server()`` runs ``initdb`` into a new temp folder and starts ``postgres`` listening on
127.0.0.1 only, with its unix socket inside that folder, so it never meets a system cluster.
PostgreSQL refuses to run as root: as root, the server runs as the ``postgres`` user that
Debian's package creates. Without the binaries the tests skip, except in CI, where they fail.
"""
from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from helpers import free_port

MISSING = "Debian's postgresql package is not installed: apt-get install postgresql"
SUPERUSER = "postgres"
START_TIMEOUT_S = 60
# The server is thrown away: durability buys nothing and costs seconds per test.
FAST = ("fsync=off", "synchronous_commit=off", "full_page_writes=off", "max_connections=200")


def find_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` holding initdb and postgres."""
    found = [p for p in Path("/usr/lib/postgresql").glob("*/bin")
             if (p / "initdb").is_file() and (p / "postgres").is_file()]
    return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, default=None)


def unavailable(reason: str) -> None:
    """Skip the test, or fail it in CI, where a skipped database test would pass unnoticed."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so the PostgreSQL tests must run)", pytrace=False)
    pytest.skip(reason)


def _run_as() -> dict:
    """Popen arguments that drop root for the postgres user; nothing when we are not root."""
    if os.getuid() != 0:
        return {}
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        unavailable("running as root and there is no postgres user to run the server as: "
                    "apt-get install postgresql creates it")
    return dict(user=user.pw_uid, group=user.pw_gid, extra_groups=[])


def _url(port: int, database: str) -> str:
    return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{port}/{database}"


def _admin(url: str):
    """An autocommit connection to the maintenance database of ``url``'s server."""
    import psycopg
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    return psycopg.connect(host=parsed.host, port=parsed.port, user=parsed.username, dbname="postgres",
                           autocommit=True, connect_timeout=5)


def create_database(url: str, prefix: str = "qalora") -> str:
    """A new empty database with a unique name on ``url``'s server; returns its SQLAlchemy URL."""
    from sqlalchemy.engine import make_url

    name = f"{prefix}_{secrets.token_hex(4)}"
    with _admin(url) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return make_url(url).set(database=name).render_as_string(hide_password=False)


def drop_database(url: str) -> None:
    """Drop ``url``'s database, closing whatever connections a test's processes left open."""
    from sqlalchemy.engine import make_url

    with _admin(url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)')


def _wait_ready(url: str, proc: subprocess.Popen, log: Path) -> None:
    import psycopg

    end = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"postgres exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            _admin(url).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > end:
                raise RuntimeError(f"postgres did not accept connections in {START_TIMEOUT_S} s:\n"
                                   f"{log.read_text()[-3000:]}") from None
            time.sleep(0.1)


@contextmanager
def server() -> Iterator[str]:
    """A running server with one new database, whose URL it yields; at the end the server stops
    and its folder is deleted."""
    bindir = find_bindir()
    if bindir is None:
        unavailable(MISSING)
    try:
        import psycopg  # noqa: F401
    except ImportError:
        unavailable("the psycopg driver is not installed: pip install -r requirements.txt")
    run_as = _run_as()
    root = Path(tempfile.mkdtemp(prefix="qalora-pg-"))  # /tmp, not pytest's folders: root-only mode 0700
    proc = None
    try:
        data, sockets = root / "data", root / "sockets"
        sockets.mkdir()
        if run_as:
            for path in (root, sockets):
                os.chown(path, run_as["user"], run_as["group"])
        log = root / "server.log"
        init = subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", SUPERUSER, "--auth=trust",
                               "--no-sync", "-E", "UTF8", "--locale=C"], cwd=root, capture_output=True,
                              text=True, **run_as)
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{init.stdout}{init.stderr}")
        port = free_port()
        options = [arg for opt in ("listen_addresses=127.0.0.1", f"unix_socket_directories={sockets}",
                                   f"port={port}", *FAST) for arg in ("-c", opt)]
        with open(log, "w") as out:
            proc = subprocess.Popen([str(bindir / "postgres"), "-D", str(data), *options], cwd=root,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **run_as)
        _wait_ready(_url(port, "postgres"), proc, log)
        yield create_database(_url(port, "postgres"))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)  # fast shutdown: ends open sessions instead of waiting for them
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(root, ignore_errors=True)
