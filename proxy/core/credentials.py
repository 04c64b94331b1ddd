"""An API key as the request presents it and as it is stored: never the key itself.

`api_key` reads it (Authorization: Bearer, or Azure's api-key), `identity_problem` refuses a request whose
credentials are ambiguous (the key attributed must be the key billed), `key_hash`/`key_id_of` are what is
stored. The raw key must never leave here except in the forwarded headers: not in a record, a log line or an
exception message.
"""

from __future__ import annotations

import hashlib
import re
from typing import Mapping

from multidict import CIMultiDictProxy

__all__ = ["CREDENTIAL_HEADERS", "LONE_SURROGATE", "api_key", "forwardable", "identity_problem", "key_hash", "key_id_of"]

# Forwarded once: a second copy would let the upstream bill one key while the row names another.
CREDENTIAL_HEADERS = frozenset({"authorization", "api-key"})
# Header bytes that were not UTF-8 reach us as lone surrogates (aiohttp decodes with surrogateescape).
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


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


def forwardable(value: str) -> str:
    """A header value as aiohttp will write it: without lone surrogates (bytes that were not UTF-8).

    aiohttp's writer drops them (its pure-Python writer raises instead); dropping them here keeps the
    attributed key identical to the key the upstream receives, whichever writer runs.
    """
    return value if value.isascii() else LONE_SURROGATE.sub("", value)


def api_key(headers: Mapping[str, str]) -> str | None:
    auth = headers.get("Authorization")
    if auth:
        auth = forwardable(auth)
        scheme, _, credential = auth.partition(" ")
        if scheme.lower() == "bearer" and credential.strip():
            return credential.strip()
    azure = forwardable(headers.get("api-key") or "")
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
    named = sorted(connection & CREDENTIAL_HEADERS)
    if named:
        return f"the Connection header must not name the credential header {named[0]!r}"
    presented: set[str] = set()
    for value in headers.getall("Authorization", ()):
        value = forwardable(value)
        if not value.strip():
            continue
        scheme, _, credential = value.strip().partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential or _TOKEN_BAD.search(credential):
            return "the Authorization header must be 'Bearer <API key>'"
        presented.add(credential)
    for value in headers.getall("api-key", ()):
        value = forwardable(value).strip()
        if value:
            if _TOKEN_BAD.search(value):
                return "the api-key header must be a single API key"
            presented.add(value)
    if len(presented) > 1:
        return "the request carries more than one API key (Authorization and api-key, or one header twice)"
    return None
