"""Routes: which path a request reaches, whether it is written canonically, and which routes a policy allows.

A route is named as "METHOD /v1/path", where the method may be `*` and a path segment may be `*` (any one
segment) or the last segment `**` (anything below). `canonical_problem()` refuses a path that an upstream
or a CDN could normalise into another route (empty segments, `;` parameters, percent-encoded letters or
slashes, backslashes, case variants of known routes), so the route metered is always the route served.

Pure functions on strings. This module must never decode a path for forwarding (the client's bytes go
upstream as sent) and never let a path it refuses be forwarded.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

from proxy.core.errors import MeterproxyError

__all__ = [
    "DEFAULT_ROUTES", "FREE_ROUTES", "METERED_ROUTES", "RouteError", "RoutePolicy", "canonical_problem",
    "method_problem", "parse_routes",
]  # fmt: skip

# What a managed key may do unless its own `routes` say otherwise: inference, and listing models.
DEFAULT_ROUTES: tuple[str, ...] = (
    "POST /v1/chat/completions", "POST /v1/completions", "POST /v1/embeddings", "POST /v1/responses",
    "POST /v1/moderations", "POST /v1/audio/transcriptions", "POST /v1/audio/translations",
    "POST /v1/audio/speech", "POST /v1/images/generations", "POST /v1/images/edits",
    "POST /v1/images/variations", "GET /v1/models", "GET /v1/models/*",
)  # fmt: skip
# Routes whose usage the proxy reads and prices (proxy.meters), so a budget can hold them.
METERED_ROUTES: tuple[str, ...] = (
    "POST /v1/chat/completions", "POST /v1/completions", "POST /v1/embeddings", "POST /v1/responses",
    "POST /v1/images/generations", "POST /v1/audio/transcriptions",
)  # fmt: skip
# Routes that spend nothing at the upstream: allowed under a budget without a meter.
FREE_ROUTES: tuple[str, ...] = ("GET /v1/models", "GET /v1/models/*", "POST /v1/moderations")
# Methods each known route takes; any other is refused (405) before it is forwarded.
_METHODS: dict[str, frozenset[str]] = {
    "/v1/chat/completions": frozenset({"POST", "GET"}),  # GET lists stored completions
    "/v1/completions": frozenset({"POST"}),
    "/v1/embeddings": frozenset({"POST"}),
    "/v1/responses": frozenset({"POST"}),
    "/v1/moderations": frozenset({"POST"}),
    "/v1/images/generations": frozenset({"POST"}),
    "/v1/images/edits": frozenset({"POST"}),
    "/v1/images/variations": frozenset({"POST"}),
    "/v1/audio/transcriptions": frozenset({"POST"}),
    "/v1/audio/translations": frozenset({"POST"}),
    "/v1/audio/speech": frozenset({"POST"}),
    "/v1/models": frozenset({"GET", "HEAD"}),
}
_BODYLESS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})
# Resource names of OpenAI's API: a case variant of any of them is refused (an upstream may fold case).
_KNOWN_WORDS = frozenset({
    "chat", "completions", "embeddings", "responses", "moderations", "audio", "transcriptions", "translations",
    "speech", "images", "generations", "edits", "variations", "models", "files", "batches", "fine_tuning",
    "jobs", "uploads", "vector_stores", "assistants", "threads", "organization", "realtime", "evals",
    "containers", "conversations", "videos", "input_items", "messages", "runs", "checkpoints", "content",
})  # fmt: skip
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
MAX_ROUTES = 100
_METHOD_NAMES = frozenset({"*", "GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


class RouteError(MeterproxyError, ValueError):
    """A route spec that cannot be used; the message is for the user."""


# The common case, decided by one match: lowercase segments of plain characters (no '%', ';', '\\').
_PLAIN = re.compile(r"/v1(?:/[a-z0-9_.~:@!$&'()*+,=-]+)+")


def canonical_problem(raw_path: str) -> str | None:
    """Why `raw_path` (as sent, still percent-encoded) is not canonical, or None if it is."""
    if _PLAIN.fullmatch(raw_path) and "/." not in raw_path:
        return None
    if not raw_path.startswith("/v1/"):
        return "the path must start with /v1/"
    if any(c in raw_path for c in ";\\") or any(ord(c) < 0x21 or ord(c) == 0x7F for c in raw_path):
        return "the path must not contain ';', '\\', spaces or control characters"
    for match in _PERCENT.finditer(raw_path):
        char = chr(int(match.group(1), 16))
        if char in _UNRESERVED or char in "/\\;" or ord(char) < 0x21:
            return f"the path must not percent-encode {char!r} ({match.group(0)})"
    if "%" in _PERCENT.sub("", raw_path):
        return "the path has a '%' that is not a percent-encoding"
    segments = raw_path.split("/")[1:]
    if any(s == "" for s in segments):
        return "the path must not have empty segments ('//' or a trailing '/')"
    if any(s in (".", "..") or _PERCENT.sub(lambda m: chr(int(m.group(1), 16)), s) in (".", "..")
           for s in segments):
        return "the path must not have '.' or '..' segments"
    for segment in segments[1:]:
        lower = segment.lower()
        if lower != segment and lower in _KNOWN_WORDS:
            return f"the path segment {segment!r} must be written {lower!r}"
    return None


def method_problem(method: str, path: str, body_size: int) -> tuple[int, str] | None:
    """(status, why) if `method` is not one the route takes, or carries a body it must not; else None."""
    if method in _BODYLESS and body_size > 0:
        return 400, f"a {method} request must not carry a body"
    allowed = _METHODS.get(path)
    if allowed is not None and method not in allowed:
        return 405, f"{path} takes {' or '.join(sorted(allowed))}, not {method}"
    return None


def _parse_one(spec: object) -> tuple[str, tuple[str, ...]]:
    if not isinstance(spec, str):
        raise RouteError("each route must be a string such as 'POST /v1/chat/completions'")
    method, _, path = spec.strip().partition(" ")
    method, path = method.upper(), path.strip()
    if method not in _METHOD_NAMES or not path.startswith("/v1/") or " " in path:
        raise RouteError(f"route {spec[:80]!r} must be 'METHOD /v1/path' (METHOD: * or "
                         f"{', '.join(sorted(_METHOD_NAMES - {'*'}))}; a segment may be * or a last **)")
    segments = tuple(path.split("/")[1:])
    if any(not s for s in segments) or "**" in segments[:-1] or any("*" in s and s not in ("*", "**")
                                                                      for s in segments):
        raise RouteError(f"route {spec[:80]!r}: segments must be non-empty; '*' and '**' stand alone, "
                         "and '**' only last")
    return method, segments


def parse_routes(value: object, param: str = "routes") -> tuple[str, ...]:
    """A validated list of route specs; the word "default" stands for DEFAULT_ROUTES."""
    if not isinstance(value, (list, tuple)) or not value or len(value) > MAX_ROUTES:
        raise RouteError(f"{param} must be a list of 1 to {MAX_ROUTES} routes such as 'POST /v1/files' or "
                         "'default' (null: the default inference routes)")
    out = []
    for spec in value:
        if spec == "default":
            out.append("default")
            continue
        method, segments = _parse_one(spec)
        out.append(f"{method} /{'/'.join(segments)}")
    return tuple(out)


class RoutePolicy:
    """A set of route specs, matched against (method, path)."""

    __slots__ = ("_known", "_rules", "specs")

    def __init__(self, specs: Iterable[str]) -> None:
        expanded: list[str] = []
        for spec in specs:
            expanded.extend(DEFAULT_ROUTES if spec == "default" else (spec,))
        self.specs = tuple(expanded)
        self._rules = [_parse_one(spec) for spec in self.specs]
        self._known: dict[tuple[str, str], bool] = {}  # answers for recent (method, path); emptied when full

    def allows(self, method: str, path: str) -> bool:
        known = self._known.get((method, path))
        if known is None:
            segments = path.split("/")[1:]
            known = any(_matches(rule, method, segments) for rule in self._rules)
            if len(path) <= 256:
                if len(self._known) >= 1024:
                    self._known.clear()
                self._known[(method, path)] = known
        return known

    def __repr__(self) -> str:
        return f"RoutePolicy({len(self.specs)} routes)"


def _matches(rule: tuple[str, tuple[str, ...]], method: str, segments: Sequence[str]) -> bool:
    rule_method, pattern = rule
    if rule_method != "*" and rule_method != method and not (rule_method == "GET" and method == "HEAD"):
        return False
    if pattern and pattern[-1] == "**":
        head = pattern[:-1]
        return len(segments) > len(head) and all(p in ("*", s) for p, s in zip(head, segments))
    return len(pattern) == len(segments) and all(p in ("*", s) for p, s in zip(pattern, segments))


DEFAULT_POLICY = RoutePolicy(DEFAULT_ROUTES)
METERED_POLICY = RoutePolicy(METERED_ROUTES)
FREE_POLICY = RoutePolicy(FREE_ROUTES)
