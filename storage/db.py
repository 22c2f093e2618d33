"""Engines, the one session scope ``db()``, and schema migration on first use.

SQLite is the embedded default (huey's ``SqliteStorage``): WAL so the UI's reads never wait
for the worker's writes, a busy timeout so concurrent writers queue instead of failing, and
foreign keys on so deleting a job deletes its metrics.
"""
from __future__ import annotations

import fcntl
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from .settings import get_settings

BUSY_TIMEOUT_MS = 30_000
MIGRATIONS = Path(__file__).parent / "migrations"

_engines: dict[tuple[int, str], tuple[Engine, sessionmaker]] = {}
_lock = threading.Lock()


def _on_sqlite_connect(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA foreign_keys=ON")
    # WAL makes NORMAL durable across process crashes; only a power cut can lose the last commit
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _alembic_config(connection):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def _at_head(engine: Engine) -> bool:
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config(None)).get_current_head()
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision() == head


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """Serialize migrations of one SQLite file across processes (the app and its workers start
    together); SQLite DDL is not transactional here, so a second migrator must wait, not race."""
    path = engine.url.database
    if engine.dialect.name != "sqlite" or path in (None, "", ":memory:"):
        yield
        return
    with open(f"{path}.migrate-lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def migrate(engine: Engine) -> None:
    """Upgrade the schema to the newest revision; existing rows are kept (Alembic only alters)."""
    from alembic import command

    if _at_head(engine):
        return
    with _migration_lock(engine):
        if _at_head(engine):
            return
        try:
            with engine.connect() as conn:
                sqlite = engine.dialect.name == "sqlite"
                if sqlite:
                    # Off outside any transaction (SQLite ignores it inside one): a migration that
                    # rebuilds a table must not cascade-delete the rows that reference it.
                    conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
                    conn.commit()
                try:
                    with conn.begin():
                        command.upgrade(_alembic_config(conn), "head")
                        if sqlite and conn.exec_driver_sql("PRAGMA foreign_key_check").first():
                            raise RuntimeError("a migration left rows whose job no longer exists")
                finally:
                    if sqlite:
                        conn.exec_driver_sql("PRAGMA foreign_keys=ON")
                        conn.commit()
        except Exception:
            # a server database has no file lock: losing the race to another migrator is fine
            if not _at_head(engine):
                raise


def get_engine(url: str | None = None) -> Engine:
    """The engine for ``url`` (default: settings), created and migrated once per process."""
    return _get(url)[0]


def _get(url: str | None) -> tuple[Engine, sessionmaker]:
    url = url or get_settings().db_url
    key = (os.getpid(), url)   # a forked child must not reuse its parent's pooled connections
    with _lock:
        if key not in _engines:
            parsed = make_url(url)
            if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(url)
            if engine.dialect.name == "sqlite":
                event.listen(engine, "connect", _on_sqlite_connect)
            migrate(engine)
            _engines[key] = (engine, sessionmaker(engine, expire_on_commit=False))
        return _engines[key]


@contextmanager
def db(url: str | None = None) -> Iterator[Session]:
    """One unit of work: commits if the block succeeds, rolls back if it raises."""
    session = _get(url)[1]()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
