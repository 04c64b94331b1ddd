"""The fake upstream: a fast OpenAI-shaped chat completions server on loopback, in its own process.

`python -m bench.upstream --port P` answers POST /v1/chat/completions with a JSON completion carrying usage,
or (for `"stream": true`) an SSE stream of `X-Bench-Chunks` chunks (default 100) spaced by
`X-Bench-Interval-Ms` (default 0), with a usage chunk only when `stream_options.include_usage` is set, then
`[DONE]`; with `X-Bench-Status: N` it answers an OpenAI error body with status N instead. Every response
is prebuilt so the upstream costs as little CPU as the stack allows. It must never listen anywhere but the
address it is given (127.0.0.1 by default).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from functools import lru_cache

from aiohttp import web

from bench import payloads

_JSON_BODY = payloads.chat_response()
_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}


@lru_cache(maxsize=64)
def _chunks(count: int, include_usage: bool) -> tuple[bytes, ...]:
    return tuple(payloads.stream_chunks(count, include_usage))


async def _chat(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    status = request.headers.get(payloads.STATUS_HEADER)
    if status is not None:  # an error asked for by the load (soak): nothing else is read
        return web.Response(body=payloads.error_response(int(status)), status=int(status),
                            content_type="application/json")
    try:
        obj = json.loads(body)  # a real upstream parses the request; so does this one
    except ValueError:
        return web.json_response({"error": {"message": "bad JSON", "type": "invalid_request_error"}},
                                 status=400)
    if not obj.get("stream"):
        return web.Response(body=_JSON_BODY, content_type="application/json")
    options = obj.get("stream_options") or {}
    count = int(request.headers.get(payloads.CHUNKS_HEADER, payloads.DEFAULT_CHUNKS))
    interval = float(request.headers.get(payloads.INTERVAL_HEADER, 0)) / 1000
    response = web.StreamResponse(headers=_SSE_HEADERS)
    await response.prepare(request)
    for i, chunk in enumerate(_chunks(count, bool(options.get("include_usage")))):
        if i and interval:
            await asyncio.sleep(interval)
        await response.write(chunk)
    await response.write_eof()
    return response


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def make_app() -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post(payloads.CHAT_PATH, _chat)
    app.router.add_get("/healthz", _healthz)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    # A deep backlog: 1,000 streams connect at once and must not wait on SYN retransmits.
    web.run_app(make_app(), host=args.host, port=args.port, backlog=4096, access_log=None, print=None)


if __name__ == "__main__":
    main()
