"""Who made a call: the API key (as a hash and a hint, never the key), and the X-Meter-* attribution headers.

Also decides which request headers go upstream. The raw key must never leave this module except in the
forwarded headers: not in a record, a log line or an exception message.
"""

from __future__ import annotations

import hashlib
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.record import CallRecord

# RFC 9110 hop-by-hop headers, plus those aiohttp computes itself for the new message (Host, Content-Length).
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
    "trailer", "trailers", "transfer-encoding", "upgrade",
})
_RECOMPUTED = frozenset({"host", "content-length"})
METER_PREFIX = "x-meter-"
MAX_TAGS = 32
MAX_VALUE_CHARS = 256


def key_id_of(key: str) -> str:
    """The stored identity of an API key: the first 16 hex characters of its SHA-256."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _api_key(headers: CIMultiDictProxy[str]) -> str | None:
    auth = headers.get("Authorization")
    if auth:
        scheme, _, credential = auth.partition(" ")
        if scheme.lower() == "bearer" and credential.strip():
            return credential.strip()
    azure = headers.get("api-key")
    if azure and azure.strip():
        return azure.strip()
    return None


def _bounded(value: str) -> str:
    # Attribution values are stored and reported; an unbounded header must not bloat the ledger.
    return value[:MAX_VALUE_CHARS]


def attribute(headers: CIMultiDictProxy[str], attr: CallRecord) -> None:
    """Fill the record's key_id, key_hint, user, session, operation and tags from the request headers."""
    key = _api_key(headers)
    if key is not None:
        attr.key_id = key_id_of(key)
        attr.key_hint = key[-4:] if len(key) >= 8 else None  # a hint of a short key would reveal too much of it
    for name, value in headers.items():
        lower = name.lower()
        if not lower.startswith(METER_PREFIX):
            continue
        label = lower[len(METER_PREFIX):]
        if not label:
            continue
        if label == "user":
            attr.user = _bounded(value)
        elif label == "session":
            attr.session = _bounded(value)
        elif label == "operation":
            attr.operation = _bounded(value)
        elif len(attr.tags) < MAX_TAGS or label in attr.tags:
            attr.tags[label[:64]] = _bounded(value)


def _filtered(headers: CIMultiDictProxy[str], drop: frozenset[str], drop_meter: bool) -> CIMultiDict[str]:
    connection_named = {
        token.strip().lower() for value in headers.getall("Connection", ()) for token in value.split(",")
    }
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower in drop or lower in connection_named or (drop_meter and lower.startswith(METER_PREFIX)):
            continue
        out.add(name, value)
    return out


def upstream_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The client's headers as the upstream should see them: minus hop-by-hop and our own X-Meter-*."""
    return _filtered(headers, HOP_BY_HOP | _RECOMPUTED, drop_meter=True)


def client_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The upstream's response headers as the client should see them: minus hop-by-hop."""
    return _filtered(headers, HOP_BY_HOP, drop_meter=False)
