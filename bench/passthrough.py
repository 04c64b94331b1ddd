"""The bare pass-through: the fastest honest aiohttp proxy, with no metering, as the limit of this stack.

`python -m bench.passthrough --port P --upstream URL` forwards every request to `{upstream}{path}?{query}`
through one long-lived ClientSession (unlimited keep-alive pool), and relays the response as a
StreamResponse fed by `iter_any()`. It drops hop-by-hop headers both ways and nothing else. No parsing of
bodies, no ledger: what meterproxy costs on top of this is the price of metering. It must never be given
an upstream outside loopback.
"""

from __future__ import annotations

import argparse
from typing import AsyncIterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
    "trailer", "trailers", "transfer-encoding", "upgrade",
})
_REQUEST_DROP = _HOP | {"host", "content-length"}
_SKIP_AUTO = frozenset({"Accept", "Accept-Encoding", "User-Agent", "Content-Type"})
SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)


def _filtered(headers: CIMultiDictProxy[str], drop: frozenset[str]) -> CIMultiDict[str]:
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop)


async def _forward(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    session = request.app[SESSION]
    async with session.request(request.method, request.app[UPSTREAM] + request.path_qs,
                               headers=_filtered(request.headers, _REQUEST_DROP), data=body or None,
                               allow_redirects=False, skip_auto_headers=_SKIP_AUTO) as upstream:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                      headers=_filtered(upstream.headers, _HOP))
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def make_app(upstream: str) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[UPSTREAM] = upstream.rstrip("/")

    async def session(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                         cookie_jar=aiohttp.DummyCookieJar(),
                                         timeout=aiohttp.ClientTimeout(total=None, sock_read=600)) as s:
            app[SESSION] = s
            yield

    app.cleanup_ctx.append(session)
    app.router.add_get("/healthz", _healthz)
    app.router.add_route("*", "/{tail:.*}", _forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    web.run_app(make_app(args.upstream), host=args.host, port=args.port, backlog=4096, access_log=None,
                print=None)


if __name__ == "__main__":
    main()
