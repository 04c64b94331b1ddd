"""Who made a call: the API key's identity (id and hint, never the key), the X-Meter-* attribution headers
and the team, as the ledger row and every other place read them (`caller_of`, `attribute`).

The key itself is read and hashed in `core/credentials.py`; which headers go upstream is
`forwarding/headers.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from proxy.core.credentials import LONE_SURROGATE, api_key, key_id_of
from proxy.core.record import CallRecord

METER_PREFIX = "x-meter-"
MAX_TAGS = 32
MAX_VALUE_CHARS = 256
MAX_TAG_NAME_CHARS = 64


def storable(value: str, limit: int = MAX_VALUE_CHARS) -> str:
    """`value` cut to `limit` characters, with any lone surrogate replaced by U+FFFD.

    Attribution values are stored and reported: an unbounded one must not bloat the ledger. Header bytes
    that are not UTF-8 reach us as lone surrogates (aiohttp decodes with surrogateescape), as do JSON's
    `\\ud800` escapes; SQLite and the UTF-8 spool cannot encode them, and one such row would stop the
    ledger's writer.
    """
    value = value[:limit]
    return value if value.isascii() else LONE_SURROGATE.sub("\ufffd", value)


TEAM_TAG = "team"  # a call's team is its "team" tag: X-Meter-Team, or the managed key's team


def team_of(tags: Mapping[str, str]) -> str | None:
    """The team of a call, from its tags (None if it has none)."""
    return tags.get(TEAM_TAG) or None


@dataclass(slots=True)
class Caller:
    """Who the request's headers say made it: the key's identity and the X-Meter-* attribution, stored as is."""

    key_id: str | None = None
    key_hint: str | None = None
    user: str | None = None
    session: str | None = None
    operation: str | None = None
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def team(self) -> str | None:
        return team_of(self.tags)


def caller_of(headers: Mapping[str, str]) -> Caller:
    """The one reading of a request's attribution headers, for the ledger row and every other place.

    The last of repeated X-Meter-* headers wins; every value is cut and cleaned by `storable`.
    """
    found = Caller()
    key = api_key(headers)
    if key is not None:
        found.key_id = key_id_of(key)
        # A hint of a short key would reveal too much of it.
        found.key_hint = storable(key[-4:]) if len(key) >= 8 else None
    for name, value in headers.items():
        lower = name.lower()
        if not lower.startswith(METER_PREFIX):
            continue
        label = lower[len(METER_PREFIX):]
        if not label:
            continue
        if label == "user":
            found.user = storable(value)
        elif label == "session":
            found.session = storable(value)
        elif label == "operation":
            found.operation = storable(value)
        else:
            tag = storable(label, MAX_TAG_NAME_CHARS)
            if len(found.tags) < MAX_TAGS or tag in found.tags:
                found.tags[tag] = storable(value)
    return found


def attribute(headers: Mapping[str, str], attr: CallRecord) -> None:
    """Fill the record's key_id, key_hint, user, session, operation and tags from the request headers."""
    found = caller_of(headers)
    if found.key_id is not None:
        attr.key_id, attr.key_hint = found.key_id, found.key_hint
    if found.user is not None:
        attr.user = found.user
    if found.session is not None:
        attr.session = found.session
    if found.operation is not None:
        attr.operation = found.operation
    for tag, value in found.tags.items():
        if len(attr.tags) < MAX_TAGS or tag in attr.tags:
            attr.tags[tag] = value
