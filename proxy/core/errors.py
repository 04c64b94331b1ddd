"""Errors the proxy itself answers, in OpenAI's shape, so every client SDK reports them clearly.

`{"error": {"message", "type", "param", "code"}}` — the same body OpenAI sends, so `openai.APIError`
subclasses carry our message. Never used for the upstream's own errors: those pass through untouched.
Pure: `forwarding/responses.py: error_response` wraps `error_body` in an aiohttp Response.
"""

from __future__ import annotations

import json


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
