"""Errors the proxy itself answers, in OpenAI's shape, so every client SDK reports them clearly.

`{"error": {"message", "type", "param", "code"}}` — the same body OpenAI sends, so `openai.APIError`
subclasses carry our message. Never used for the upstream's own errors: those pass through untouched.
"""

from __future__ import annotations

import json
from typing import Iterable, Mapping

from aiohttp import web


class MeterproxyError(Exception):
    """The base of every exception meterproxy raises: `except MeterproxyError` catches ours and nothing else."""


class ParameterError(MeterproxyError, ValueError):
    """An invalid parameter (a query parameter, a body field, a setting's value): the message is meant for the
    user and `param` names what was wrong. Answered 400 in OpenAI's shape, param included."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}}).encode()


def error_response(status: int, message: str, type_: str, code: str | None = None,
                   param: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=error_body(message, type_, code, param),
                        content_type="application/json", headers=headers)


def unknown_parameter(query: Mapping[str, str], allowed: Iterable[str]) -> web.Response | None:
    """A 400 naming the first query parameter not in `allowed`, or None. A typo (`groupby`) must not be
    read as a request for the default answer."""
    known = tuple(allowed)
    for name in query:
        if name not in known:
            listed = ", ".join(known) if known else "none"
            return error_response(400, f"Unknown query parameter {name!r} (this route takes: {listed})",
                                  "invalid_request_error", "unknown_parameter", name[:100])
    return None
