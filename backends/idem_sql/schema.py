"""The one table idem-core keeps in SQL databases, as a SQLAlchemy Core ``Table``.

Put :data:`table` (or :func:`records_table` with your own name and ``MetaData``) in your
Alembic metadata to manage it with your migrations; ``idem setup URL`` creates it otherwise.
"""

from __future__ import annotations

import re

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.dialects import mysql

from idem_core.errors import ConfigurationError

#: default table name
DEFAULT_TABLE = "idem_records"

#: longest key, in characters, stored as is; the core hashes longer keys
MAX_KEY_LENGTH = 255

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")

# Keys must compare byte for byte: "k " is not "k", "K" is not "k", and "É" composed (NFC)
# is not "É" decomposed (NFD). PostgreSQL (deterministic collations break ties by bytes) and
# SQLite (BINARY collation) do so with VARCHAR; MySQL/MariaDB text collations ignore case or
# trailing spaces (even utf8mb4_bin is PAD SPACE), so keys are stored there as their UTF-8
# bytes: 255 characters take at most 1020 bytes.
_KEY_TYPE = String(MAX_KEY_LENGTH).with_variant(
    mysql.VARBINARY(4 * MAX_KEY_LENGTH), "mysql", "mariadb"
)
# BLOB tops out at 64 KiB on MySQL/MariaDB.
_RESULT_TYPE = LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")


def check_identifier(name: str) -> str:
    """``name`` if it is a plain SQL identifier; table names are never quoted from user input."""
    if not isinstance(name, str) or not _IDENTIFIER.fullmatch(name):
        raise ConfigurationError(
            f"table name {name!r} is not a plain identifier (letters, digits, underscore; "
            "at most 63 characters, not starting with a digit)"
        )
    return name


def records_table(metadata: MetaData, name: str = DEFAULT_TABLE) -> Table:
    """The records table under ``name`` in ``metadata`` (for Alembic or ``metadata.create_all``).

    Columns mirror :class:`idem_core.Record`; times are BIGINT microseconds since the epoch,
    written from the database's own clock.
    """
    check_identifier(name)
    return Table(
        name,
        metadata,
        Column("key", _KEY_TYPE, primary_key=True),
        Column("status", String(16), nullable=False),
        Column("fingerprint", Text, nullable=False),
        Column("fence", BigInteger, nullable=False),
        Column("lease_expires_at", BigInteger, nullable=False),
        Column("expires_at", BigInteger, nullable=False),
        Column("attempt", Text, nullable=False),
        Column("created_at", BigInteger, nullable=False),
        Column("updated_at", BigInteger, nullable=False),
        Column("result", _RESULT_TYPE, nullable=True),
        Index(f"ix_{name}_expires_at"[:63], "expires_at"),
    )


#: the MetaData holding :data:`table`
metadata = MetaData()
#: the records table under its default name
table = records_table(metadata)

COLUMNS = (
    "key",
    "status",
    "fingerprint",
    "fence",
    "lease_expires_at",
    "expires_at",
    "attempt",
    "created_at",
    "updated_at",
    "result",
)
