"""The aiohttp application: routes, and the resources every request shares.

Resources (upstream client session, ledger writer, price table) are opened and closed in cleanup_ctx.
Routes: `/v1/...` is forwarded, `/healthz` answers readiness, `/admin/...` is the admin sub-app; anything
else is a 404 in OpenAI's shape — nothing but `/v1/` ever reaches the upstream.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from proxy.admin.keys import add_key_routes, meter_usage
from proxy.admin.pricing import admin_routes as pricing_routes
from proxy.admin.replicas import Heartbeat, add_replica_routes
from proxy.admin.routes import GuardedRoutes, Handler, admin_guard, make_admin_app
from proxy.config import Settings, spool_path
from proxy.control.gate import Gate, open_gate
from proxy.counting.counter import CountPolicy
from proxy.forwarding.forward import forward
from proxy.forwarding.responses import error_response
from proxy.ledger import rollup_build, rollup_views
from proxy.ledger.hooks import after_insert_hooks
from proxy.ledger.retention import RetentionTask
from proxy.ledger.sqlconn import Conn
from proxy.ledger.writer import Ledger
from proxy.metering.call import MeteredCall
from proxy.metering.logs import CallLogs
from proxy.metering.metrics import Metrics
from proxy.pricing.live import LivePrices
from proxy.pricing.table import PriceTable
from proxy.ui import make_meter_ui, make_ui, mount

SETTINGS = web.AppKey("settings", Settings)
LEDGER = web.AppKey("ledger", Ledger)
SESSION = web.AppKey("session", aiohttp.ClientSession)
TIMEOUT = web.AppKey("timeout", aiohttp.ClientTimeout)
COUNTING = web.AppKey("counting", CountPolicy)
GATE = web.AppKey("gate", Gate)
LIVE = web.AppKey("live_prices", LivePrices)
METRICS = web.AppKey("metrics", Metrics)
CALL_LOGS = web.AppKey("call_logs", CallLogs)
HEARTBEAT = web.AppKey("heartbeat", Heartbeat)


class InFlight:
    """The calls under way, so that those still running when `shutdown_grace` ends are recorded before the
    ledger closes: status 499, "proxy shut down", with the tokens counted so far."""

    MESSAGE = "proxy shut down"

    def __init__(self) -> None:
        self.calls: set[MeteredCall] = set()
        self.cut = 0  # calls recorded as cut off by the shutdown

    async def cut_off(self, call: MeteredCall) -> None:
        if call.finished:
            await call.wait_done()
            return
        self.cut += 1
        call.on_end()
        call.on_failure(499, self.MESSAGE)
        await call.finish()

    async def close(self) -> None:
        """Before the ledger closes: record whatever is still under way, and wait for the rows still being
        counted or handed over (a handler aiohttp stopped waiting for)."""
        for call in list(self.calls):
            await self.cut_off(call)
        if self.cut:
            logging.getLogger("meterproxy").warning(
                "shutdown: %d call(s) still in flight when shutdown_grace ended; recorded as 499 (%s) with the "
                "tokens counted so far", self.cut, self.MESSAGE)


INFLIGHT = web.AppKey("inflight", InFlight)


async def _proxy(request: web.Request) -> web.StreamResponse:
    app = request.app
    settings = app[SETTINGS]
    ledger = app[LEDGER]
    if not ledger.storing or (settings.on_ledger_error == "reject" and not ledger.accepting):
        # Forward nothing that cannot be recorded: no unrecorded spend. (When neither the database nor the
        # spool takes rows, whatever the policy: no response could complete.)
        return error_response(503, "The usage ledger cannot record calls right now; the request was not "
                              "forwarded. Retry shortly.", "server_error", "ledger_unavailable",
                              headers={"Retry-After": "1"})
    # The table in force when the call starts prices it, even if an edit lands while it runs.
    call = MeteredCall(request.method, request.path, request.headers, prices=app[LIVE].table, ledger=app[LEDGER],
                       inject_usage=settings.stream_usage == "inject", counting=app[COUNTING],
                       sample_rate=settings.accuracy_sample_rate, metrics=app[METRICS], gate=app[GATE],
                       max_meter_bytes=settings.max_meter_bytes, logs=app[CALL_LOGS])
    inflight = app[INFLIGHT]
    inflight.calls.add(call)
    try:
        return await forward(request, call, session=app[SESSION], upstream=settings.upstream,
                             timeout=app[TIMEOUT], first_byte=settings.first_byte_timeout,
                             idle=settings.idle_timeout)
    except asyncio.CancelledError:
        # aiohttp cancels the handlers still running when shutdown_grace ends: record the call first.
        await inflight.cut_off(call)
        raise
    finally:
        inflight.calls.discard(call)


async def _healthz(request: web.Request) -> web.Response:
    ledger = request.app[LEDGER]
    reason = ledger.degraded
    backend = {"backend": ledger.target.kind, "db": ledger.target.shown}  # never the password
    if reason is None:
        # Slow is not down: every replica shares the database, so a load balancer that dropped the slow ones
        # would drop them all. 200, with the figure and why, for people and alerts.
        threshold = request.app[SETTINGS].slow_database
        shared = request.app[GATE].shared if GATE in request.app else None
        slow = [] if threshold is None else [why for why in (
            ledger.writes.slow(threshold, "ledger write"),
            shared.admissions.slow(threshold, "budget admission") if shared else None) if why]
        if slow:
            return web.json_response({"status": "slow", "reason": "; ".join(slow), **backend})
        return web.json_response({"status": "ok", **backend})
    # Serving on with rows only in the spool is degraded, not down; when calls are refused (`reject`, or
    # neither the database nor the spool takes rows): 503.
    if not ledger.storing:
        state = "unavailable"
    else:
        state = "rejecting" if request.app[SETTINGS].on_ledger_error == "reject" else "spooling"
    return web.json_response({"status": "degraded", "ledger": state, "reason": reason,
                              "spool_depth": ledger.spool_depth, **backend}, status=200 if state == "spooling" else 503)


def _not_found_on(serves: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The catch-all 404 of one port, in OpenAI's shape, naming what that port serves."""

    async def not_found(request: web.Request) -> web.Response:
        return error_response(404, f"No route for {request.method} {request.path}: {serves}",
                              "invalid_request_error", "not_found")

    return not_found


def _proxy_port_serves(settings: Settings) -> str:
    extra = ", /metrics, /admin/... and the dashboard /admin/ui/" if settings.admin_port is None else (
        f"; /admin/..., the dashboard and /metrics are on the admin port http://{settings.admin_host}:"
        f"{settings.admin_port}")
    return f"the proxy forwards /v1/... to the upstream and serves /healthz, /meter/usage, /meter/ui/{extra}"


class _NoRequestLines(logging.Filter):
    """aiohttp logs a malformed request with the parser's exception, which quotes the raw header line —
    an API key included. Keep the record, drop the quote: only the exception's class and status remain."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg = f"{record.getMessage()}: {type(exc).__name__} ({exc.code})"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
        return True


def _quiet_request_parser_logs() -> None:
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _NoRequestLines) for f in server_log.filters):
        server_log.addFilter(_NoRequestLines())


def _mark_stale_rollups(conn: Conn) -> None:
    if rollup_build.make_current(conn):
        logging.getLogger("meterproxy.rollups").warning(
            "ledger has calls written without rollups (another tool, or an older meterproxy): their hours are "
            "marked for rebuilding in the background; until then reports read them from the calls (slower)")


def make_app(settings: Settings, prices: PriceTable | None = None) -> web.Application:
    """Build the app. `prices` may be given already loaded (the CLI loads it first to fail early)."""
    _quiet_request_parser_logs()
    app = web.Application(client_max_size=settings.max_request_bytes)
    app[SETTINGS] = settings
    metrics = Metrics(label_keys="key" in settings.metrics_labels, label_users="user" in settings.metrics_labels)
    app[METRICS] = metrics
    app[CALL_LOGS] = CallLogs(access_log=settings.access_log)
    app[COUNTING] = counting_policy(settings)
    app[INFLIGHT] = InFlight()
    # First byte and idle gaps are timed by the forwarder itself: aiohttp's sock_read would apply one
    # figure to both the wait for headers and the gaps between chunks.
    app[TIMEOUT] = aiohttp.ClientTimeout(total=settings.total_timeout, connect=settings.connect_timeout)

    # One cleanup context per resource, in the order they open; aiohttp closes them in reverse (the calls
    # still in flight first, the ledger and the upstream session last), and on a failed start closes those
    # already open once the runner's cleanup runs.
    async def price_table(app: web.Application) -> AsyncIterator[None]:
        table = prices if prices is not None else PriceTable.load(settings.pricing)
        app[LIVE] = LivePrices(settings.pricing, table)
        yield

    async def upstream_session(app: web.Application) -> AsyncIterator[None]:
        # Unlimited pool with keep-alive; aiohttp sets TCP_NODELAY on every connection itself.
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        # auto_decompress off: the client gets the upstream's compressed bytes; meters decode a copy.
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                         cookie_jar=aiohttp.DummyCookieJar()) as session:
            app[SESSION] = session
            yield

    async def ledger_ctx(app: web.Application) -> AsyncIterator[None]:
        ledger = Ledger(settings.db, spool_path=spool_path(settings),
                        busy_timeout_ms=int((settings.ledger_busy_timeout or 5.0) * 1000),
                        spool_reserve_bytes=settings.spool_reserve, write_timeout=settings.ledger_write_timeout)
        ledger.db.after_insert.extend(after_insert_hooks(ledger.db.target))  # rollups, shared spend: with their rows
        ledger.db.on_open.append(_mark_stale_rollups)  # rows written without rollups: marked for the upkeep
        ledger.on_commit = metrics.observe_commit
        await ledger.open()
        metrics.queue_depth_from(lambda: ledger.queue_depth)
        metrics.spool_from(lambda: ledger.spool_depth, lambda: 1 if ledger.accepting else 0)
        app[LEDGER] = ledger
        try:
            yield
        finally:
            await ledger.close()

    async def gate_ctx(app: web.Application) -> AsyncIterator[None]:
        gate = await open_gate(
            db_path=settings.db, managed=settings.keys == "managed", prices=app[LIVE],
            counting=app[COUNTING], upstream_key=settings.upstream_api_key, limits=settings.limits,
            reserve_max_tokens=settings.reserve_max_tokens, alert_webhook=settings.alert_webhook,
            alert_thresholds=settings.alert_thresholds, unmetered_routes=settings.unmetered_routes,
            reservation_lease_seconds=settings.reservation_lease_seconds, pg_pool_size=settings.pg_pool_size,
            pg_pool_timeout=settings.pg_pool_timeout)
        spooled = await app[LEDGER].spooled_rows()  # left by an earlier run: their cost counts until replayed
        if gate.shared is not None:  # a spooled row's cost stays held until its replay (control/shared.py)
            gate.shared.ledger_clear = lambda: app[LEDGER].accepting
            gate.shared.keep_spooled(spooled)
        else:
            gate.budgets.keep_spooled(spooled)
        app[GATE] = gate
        if gate.shared is not None:
            gate.shared.on_admission = metrics.observe_admission
        try:
            yield
        finally:
            await gate.close()

    async def price_watch(app: web.Application) -> AsyncIterator[None]:
        app[LIVE].start_watching()
        try:
            yield
        finally:
            await app[LIVE].stop()

    async def retention(app: web.Application) -> AsyncIterator[None]:
        upkeep = RetentionTask(settings.db, settings.retention_days,
                               views=rollup_views.wanted(settings.rollup_pairs, settings.report_zones))
        upkeep.start()
        try:
            yield
        finally:
            await upkeep.stop()

    async def in_flight(app: web.Application) -> AsyncIterator[None]:
        yield
        await app[INFLIGHT].close()  # before the ledger closes: the calls still under way get their rows

    app.cleanup_ctx.extend([price_table, upstream_session, ledger_ctx, gate_ctx, price_watch, retention,
                            in_flight])

    # Replicas: this process's heartbeat row in the ledger (GET /admin/replicas), deleted on a clean stop;
    # last, so it opens once the ledger has migrated and its row goes first when the proxy stops.
    async def heartbeat(app: web.Application) -> AsyncIterator[None]:
        beat = Heartbeat(settings.db, settings.heartbeat_interval, lambda: app[LIVE].table.version)
        await beat.start()
        app[HEARTBEAT] = beat
        try:
            yield
        finally:
            await beat.stop()

    app.cleanup_ctx.append(heartbeat)
    app.router.add_get("/healthz", _healthz)
    if settings.admin_port is None:  # else /metrics is served beside the admin API, on its own address
        app.router.add_get("/metrics", metrics_handler(settings, metrics))
    app.router.add_get("/meter/usage", meter_usage(GATE))
    mount(app, "/meter/ui", make_meter_ui(settings, GATE))  # a key holder's own page
    app.router.add_route("*", "/v1/{tail:.*}", _proxy)
    if settings.admin_port is None:
        _add_admin(app, settings)
    app.router.add_route("*", "/{tail:.*}", _not_found_on(_proxy_port_serves(settings)))
    return app


def _add_admin(app: web.Application, settings: Settings) -> None:
    mount(app, "/admin/ui", make_ui(settings, GATE, LIVE))  # the dashboard, before the API's /admin
    # `/admin` itself matches no route of the sub-app, and aiohttp would answer it with a plain-text 404.
    app.router.add_route("*", "/admin", _not_found_on("the admin API's routes are under /admin/, such as "
                                                       "/admin/usage, /admin/calls and /admin/keys"))
    app.add_subapp("/admin", _admin(settings))


def _admin(settings: Settings) -> web.Application:
    def extra(admin: GuardedRoutes) -> None:
        add_key_routes(admin, GATE)
        pricing_routes(admin, LIVE)
        add_replica_routes(admin, settings.db)

    return make_admin_app(settings.db, settings.admin_token, extra)


def make_admin_site(settings: Settings, gate: Gate, live: LivePrices, metrics: Metrics) -> web.Application:
    """The admin API alone, for `admin_host`:`admin_port` (e.g. localhost only, while the proxy faces a network).

    It shares the running proxy's gate, so key and budget changes apply to it at once."""
    app = web.Application()
    app[GATE] = gate
    app[LIVE] = live
    app.router.add_get("/metrics", metrics_handler(settings, metrics))
    _add_admin(app, settings)
    app.router.add_route("*", "/{tail:.*}", _not_found_on(
        f"the admin port serves /admin/..., the dashboard /admin/ui/ and /metrics; the proxy (/v1/...) is on "
        f"http://{settings.host}:{settings.port}"))
    return app


def metrics_handler(settings: Settings, metrics: Metrics) -> Handler:
    """GET /metrics: behind the admin token (it names models, costs and traffic) unless metrics_public."""
    handler = metrics.handler()
    return handler if settings.metrics_public else admin_guard(settings.admin_token)(handler)


def counting_policy(settings: Settings) -> CountPolicy:
    return CountPolicy(default_encoding=settings.count_encoding, overrides=settings.count_encoding_overrides,
                       reasoning_models=settings.reasoning_models)
