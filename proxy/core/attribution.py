"""Who made a call: the API key (as a hash and a hint, never the key), and the X-Meter-* attribution headers.

Also decides which request headers go upstream. The raw key must never leave this module except in the
forwarded headers: not in a record, a log line or an exception message.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Mapping

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.core.record import CallRecord

# RFC 9110 hop-by-hop headers, plus those aiohttp computes itself for the new message (Host, Content-Length).
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
    "trailer", "trailers", "transfer-encoding", "upgrade",
})
_RECOMPUTED = frozenset({"host", "content-length"})
# Forwarded once: a second copy would let the upstream bill one key while the row names another.
_CREDENTIALS = frozenset({"authorization", "api-key"})
METER_PREFIX = "x-meter-"
MAX_TAGS = 32
MAX_VALUE_CHARS = 256
MAX_TAG_NAME_CHARS = 64
_SURROGATE = re.compile("[\ud800-\udfff]")


def key_hash(key: str) -> str:
    """The full SHA-256 hex of an API key: what the control store keeps of a managed key."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def key_id_of(key: str) -> str:
    """The stored identity of an API key: the first 16 hex characters of its SHA-256 (`key_hash`)."""
    known = _KEY_IDS.get(key)
    if known is None:
        known = key_hash(key)[:16]
        if len(_KEY_IDS) >= 4096:  # a team has few keys; a flood of distinct ones must not grow this
            _KEY_IDS.clear()
        _KEY_IDS[key] = known
    return known


_KEY_IDS: dict[str, str] = {}  # key -> key_id, in memory only (the process holds the keys anyway)
_NOTHING: frozenset[str] = frozenset()


def _forwardable(value: str) -> str:
    """A header value as aiohttp will write it: without lone surrogates (bytes that were not UTF-8).

    aiohttp's writer drops them (its pure-Python writer raises instead); dropping them here keeps the
    attributed key identical to the key the upstream receives, whichever writer runs.
    """
    return value if value.isascii() else _SURROGATE.sub("", value)


def api_key(headers: Mapping[str, str]) -> str | None:
    auth = headers.get("Authorization")
    if auth:
        auth = _forwardable(auth)
        scheme, _, credential = auth.partition(" ")
        if scheme.lower() == "bearer" and credential.strip():
            return credential.strip()
    azure = _forwardable(headers.get("api-key") or "")
    if azure.strip():
        return azure.strip()
    return None


_TOKEN_BAD = re.compile(r"[\x00-\x20\x7f]")


def identity_problem(headers: CIMultiDictProxy[str]) -> str | None:
    """Why the request's credentials are ambiguous, or None: the key attributed must be the key billed.

    Refused: two different credentials (Authorization and api-key, or either one twice with different
    values), a credential header named in Connection (a hop would drop it, and another key would be billed),
    and an Authorization that is not `Bearer <key>` (the upstream may read it otherwise than we do).
    """
    connection = {token.strip().lower() for value in headers.getall("Connection", ())
                  for token in value.split(",")}
    named = sorted(connection & _CREDENTIALS)
    if named:
        return f"the Connection header must not name the credential header {named[0]!r}"
    presented: set[str] = set()
    for value in headers.getall("Authorization", ()):
        value = _forwardable(value)
        if not value.strip():
            continue
        scheme, _, credential = value.strip().partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential or _TOKEN_BAD.search(credential):
            return "the Authorization header must be 'Bearer <API key>'"
        presented.add(credential)
    for value in headers.getall("api-key", ()):
        value = _forwardable(value).strip()
        if value:
            if _TOKEN_BAD.search(value):
                return "the api-key header must be a single API key"
            presented.add(value)
    if len(presented) > 1:
        return "the request carries more than one API key (Authorization and api-key, or one header twice)"
    return None


def storable(value: str, limit: int = MAX_VALUE_CHARS) -> str:
    """`value` cut to `limit` characters, with any lone surrogate replaced by U+FFFD.

    Attribution values are stored and reported: an unbounded one must not bloat the ledger. Header bytes
    that are not UTF-8 reach us as lone surrogates (aiohttp decodes with surrogateescape), as do JSON's
    `\\ud800` escapes; SQLite and the UTF-8 spool cannot encode them, and one such row would stop the
    ledger's writer.
    """
    value = value[:limit]
    return value if value.isascii() else _SURROGATE.sub("\ufffd", value)


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


def _filtered(headers: CIMultiDictProxy[str], drop: frozenset[str], drop_meter: bool,
              once: frozenset[str] = frozenset()) -> CIMultiDict[str]:
    connection = headers.getall("Connection", ())
    connection_named = {
        token.strip().lower() for value in connection for token in value.split(",")
    } if connection else _NOTHING
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower in drop or lower in connection_named or (drop_meter and lower.startswith(METER_PREFIX)):
            continue
        if lower in once and lower in out:
            continue
        out.add(name, _forwardable(value))
    return out


def upstream_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The client's headers as the upstream should see them: minus hop-by-hop and our own X-Meter-*.

    Only the first Authorization and api-key go on: the one attributed is the one the upstream bills.
    """
    return _filtered(headers, HOP_BY_HOP | _RECOMPUTED, drop_meter=True, once=_CREDENTIALS)


def client_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The upstream's response headers as the client should see them: minus hop-by-hop."""
    return _filtered(headers, HOP_BY_HOP, drop_meter=False)

