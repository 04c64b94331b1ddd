"""Where the ledger lives: a SQLite file (the embedded default) or a PostgreSQL database.

`--db` (and `db:` in the config) takes either: `postgresql://…` or `postgres://…` is PostgreSQL, anything
else a SQLite path. A password is best left to `PGPASSWORD` or `~/.pgpass` (libpq reads both); one written
in the URL is accepted, but `Target.shown` — the form for logs, errors and `/healthz` — never carries it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

__all__ = ["POSTGRES_SCHEMES", "Target", "parse_target"]

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


@dataclass(frozen=True)
class Target:
    kind: Literal["sqlite", "postgres"]
    where: str  # the SQLite path, or the libpq URL (as given: it may hold a password)
    shown: str  # safe to print: the path, or the URL without its password

    @property
    def is_postgres(self) -> bool:
        return self.kind == "postgres"

    def __str__(self) -> str:  # a Target formatted into a message never shows a password
        return self.shown

    def __repr__(self) -> str:
        return f"Target({self.kind!r}, {self.shown!r})"


def parse_target(value: str | os.PathLike[str]) -> Target:
    """The ledger named by a `--db` value."""
    text = os.fspath(value)
    if text.lower().startswith(POSTGRES_SCHEMES):
        return Target("postgres", text, redact_url(text))
    return Target("sqlite", text, text)


def redact_url(url: str) -> str:
    """`url` with any password replaced by `***` (also inside a `password=` query parameter)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "postgresql://(unparsable URL)"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        netloc = f"{userinfo}@{host}"
    query = "&".join(
        ("password=***" if item.lower().startswith("password=") else item)
        for item in parts.query.split("&")
    ) if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
