"""Write a new migration by diffing ``storage/models.py`` against a scratch database at head.

    python -m storage.migrations.revise "add column x to jobs"
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from alembic import command
from sqlalchemy import create_engine

from storage.db import _alembic_config, migrate


def revise(message: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        engine = create_engine(f"sqlite:///{Path(tmp) / 'scratch.db'}")
        migrate(engine)
        with engine.begin() as conn:
            command.revision(_alembic_config(conn), message=message, autogenerate=True)
        engine.dispose()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit('usage: python -m storage.migrations.revise "what changed"')
    revise(sys.argv[1])
