"""The aiohttp responses of the errors meterproxy answers itself, in OpenAI's shape.

`core/errors.py: error_body` writes the body (pure); this module wraps it in a `web.Response` for every HTTP
layer (forwarding, admin, ui, app).
"""

from __future__ import annotations

from typing import Iterable, Mapping

from aiohttp import web

from proxy.core.errors import error_body

__all__ = ["error_response", "unknown_parameter"]


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
