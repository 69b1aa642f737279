"""The SQL store for idem-core: SQLite, PostgreSQL and MySQL/MariaDB through SQLAlchemy Core.

``table`` / ``records_table(metadata, name)`` are the schema for your own migrations; the
stores themselves are opened by URL (``idem_core.registry.open_store``) or through
``idem_sql.backend.BACKEND``. Nothing here imports a database driver.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy import MetaData, Table

__all__ = ["DEFAULT_TABLE", "MAX_KEY_LENGTH", "metadata", "records_table", "table"]

DEFAULT_TABLE = "idem_records"
MAX_KEY_LENGTH = 255


def records_table(metadata: MetaData, name: str = DEFAULT_TABLE) -> Table:
    """The records table under ``name`` in your ``metadata`` (Alembic, ``create_all``)."""
    from .schema import records_table as build

    return build(metadata, name)


def __getattr__(name: str) -> Any:
    # ``table`` and ``metadata`` need SQLAlchemy; build them only when asked for.
    if name in ("table", "metadata"):
        from . import schema

        return getattr(schema, name)
    raise AttributeError(f"module 'idem_sql' has no attribute {name!r}")
