"""Dashboard sessions: a signed cookie instead of the credential, and a CSRF token tied to it.

A session cookie is `base64url(payload).hex(HMAC-SHA256(k, payload))`, payload `purpose|subject|expiry|nonce`.
`k` is derived from the admin token (HMAC of the token with a fixed label per purpose), so any process that
shares the token — after a restart, or another replica — verifies the cookie, a changed token ends every
session, and an admin cookie is never a key holder's (the purposes sign with different keys). The payload
never holds the credential: an admin session carries nothing but its expiry; a key holder's carries the key's
key_id (the first 16 hex digits of its SHA-256), and the server looks the key up on every request, so a
revoked key's session ends with it. Signatures are compared in constant time.

Logging out forgets the nonce in this process (until it would have expired anyway) and clears the cookie.

The CSRF token of a session is HMAC(k, "csrf|" + nonce): a page's forms carry it, every state-changing
request must send it back, and it is worth nothing without the cookie (or the cookie without it).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from aiohttp import web

__all__ = ["Session", "Signer"]

_MAX_COOKIE = 512  # a cookie longer than any we make is not read at all
_MAX_FORGOTTEN = 100_000


@dataclass(frozen=True, slots=True)
class Session:
    subject: str  # "admin", or a key holder's key_id
    expires: int
    nonce: str
    csrf: str


class Signer:
    """Makes and reads the session cookies of one purpose ("admin" or "meter")."""

    def __init__(self, secret: bytes, purpose: str, cookie: str, ttl: float, path: str) -> None:
        self._key = hmac.new(secret, b"meterproxy-ui-session:" + purpose.encode(), hashlib.sha256).digest()
        self.purpose, self.cookie, self.ttl, self.path = purpose, cookie, ttl, path
        self._forgotten: dict[str, int] = {}  # nonce -> expiry, for sessions ended by logging out

    def _mac(self, data: bytes) -> str:
        return hmac.new(self._key, data, hashlib.sha256).hexdigest()

    def _session(self, subject: str, expires: int, nonce: str) -> Session:
        return Session(subject, expires, nonce, self._mac(b"csrf|" + nonce.encode()))

    def start(self, response: web.StreamResponse, request: web.Request, subject: str) -> Session:
        """Set a new session's cookie on `response`."""
        if "|" in subject:
            raise ValueError("a session subject has no '|'")
        expires, nonce = int(time.time() + self.ttl), secrets.token_hex(16)
        payload = f"{self.purpose}|{subject}|{expires}|{nonce}".encode()
        value = base64.urlsafe_b64encode(payload).decode().rstrip("=") + "." + self._mac(payload)
        response.set_cookie(self.cookie, value, max_age=int(self.ttl), path=self.path, httponly=True,
                            samesite="Strict", secure=request.secure)
        return self._session(subject, expires, nonce)

    def read(self, request: web.Request) -> Session | None:
        """The request's valid session, or None (no cookie, a bad signature, expired, logged out)."""
        value = request.cookies.get(self.cookie)
        if not value or len(value) > _MAX_COOKIE or value.count(".") != 1:
            return None
        encoded, mac = value.split(".")
        try:
            payload = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        except (binascii.Error, ValueError):
            return None
        if not hmac.compare_digest(self._mac(payload).encode(), mac.encode()):
            return None
        parts = payload.decode("utf-8", "replace").split("|")
        if len(parts) != 4 or parts[0] != self.purpose or not parts[2].isdigit():
            return None
        _, subject, expires_text, nonce = parts
        expires = int(expires_text)
        if expires <= time.time() or nonce in self._forgotten:
            return None
        return self._session(subject, expires, nonce)

    def end(self, response: web.StreamResponse, session: Session | None) -> None:
        """Log out: this session's nonce is refused from now on, and the cookie is cleared."""
        if session is not None:
            now = time.time()
            if len(self._forgotten) >= _MAX_FORGOTTEN:
                self._forgotten = {n: e for n, e in self._forgotten.items() if e > now}
            self._forgotten[session.nonce] = session.expires
        response.del_cookie(self.cookie, path=self.path)

    @staticmethod
    def csrf_ok(session: Session, given: object) -> bool:
        return isinstance(given, str) and hmac.compare_digest(given.encode(), session.csrf.encode())
