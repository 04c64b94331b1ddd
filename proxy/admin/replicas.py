"""Replicas: every running proxy's heartbeat in the ledger, and `GET /admin/replicas` listing them.

`Heartbeat` writes this process's row at start and every `interval` seconds after (on a worker thread, its
own connection), and deletes it on a clean stop. A heartbeat that fails is logged once per outage and
never stops the proxy. The route lists every row, says which are alive, and warns when live replicas
price with different pricing versions (or run different meterproxy versions).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from typing import Any, Callable

from aiohttp import web

from proxy import __version__
from proxy.admin.routes import GuardedRoutes
from proxy.core.times import iso
from proxy.forwarding.responses import error_response, unknown_parameter
from proxy.ledger import replica_store
from proxy.ledger.replica_store import Replica
from proxy.ledger.sqlconn import Conn
from proxy.ledger.target import parse_target

__all__ = ["Heartbeat", "add_replica_routes", "replicas_view"]

log = logging.getLogger("meterproxy.replicas")


class Heartbeat:
    """This process's row in the replicas table, refreshed every `interval` seconds."""

    def __init__(self, db: str, interval: float, pricing_version: Callable[[], str | None]) -> None:
        self.db = db
        self.interval = interval
        self.id = secrets.token_hex(8)
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.started_at = time.time()
        self._pricing_version = pricing_version
        self._conn: Conn | None = None
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self.beats = 0

    def _row(self) -> Replica:
        return Replica(self.id, self.host, self.pid, __version__, self._pricing_version(), self.started_at,
                       time.time(), self.interval)

    def _beat_now(self, row: Replica) -> None:
        if self._conn is None or self._conn.closed:
            self._conn = replica_store.open_conn(self.db)
        try:
            replica_store.beat(self._conn, row)
        except Exception:
            self._drop_conn()
            raise

    def _drop_conn(self) -> None:
        if self._conn is not None:
            self._conn.close_quietly()
            self._conn = None

    async def beat(self) -> bool:
        """Write the row now; whether it was written (a failure is logged, once until it works again)."""
        try:
            await asyncio.to_thread(self._beat_now, self._row())
        except Exception as exc:  # a heartbeat must never take the proxy down
            if not self._failing:
                log.warning("replica heartbeat to %s failed (retrying every %ss): %s",
                            parse_target(self.db), self.interval, exc)
            self._failing = True
            return False
        if self._failing:
            log.info("replica heartbeat to %s works again", parse_target(self.db))
        self._failing = False
        self.beats += 1
        return True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.beat()

    async def start(self) -> None:
        await self.beat()
        self._task = asyncio.create_task(self._run(), name="replica-heartbeat")

    async def stop(self) -> None:
        """Stop beating and delete the row (a clean stop: the replica is gone, not dead)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

        def delete() -> None:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = replica_store.open_conn(self.db)
                replica_store.remove(self._conn, self.id)
            finally:
                self._drop_conn()

        try:
            await asyncio.to_thread(delete)
        except Exception as exc:
            log.warning("replica %s could not delete its row in %s on stopping: %s", self.id,
                        parse_target(self.db), exc)


def replicas_view(rows: list[Replica], now: float) -> dict[str, Any]:
    """The answer of GET /admin/replicas for `rows` at `now`."""
    live = [r for r in rows if r.alive(now)]
    warnings: list[str] = []
    for field, what in (("pricing_version", "pricing versions"), ("version", "meterproxy versions")):
        seen: dict[str, list[str]] = {}
        for r in live:
            seen.setdefault(str(getattr(r, field)), []).append(f"{r.host}:{r.pid}")
        if len(seen) > 1:
            parts = "; ".join(f"{value} ({', '.join(who)})" for value, who in sorted(seen.items()))
            warnings.append(f"live replicas run different {what}: {parts}")
    return {
        "replicas": [{
            "id": r.id, "host": r.host, "pid": r.pid, "version": r.version, "pricing_version": r.pricing_version,
            "started_at": iso(r.started_at), "last_seen": iso(r.seen_at),
            "seen_seconds_ago": round(max(0.0, now - r.seen_at), 3), "interval_seconds": r.interval_s,
            "alive": r.alive(now),
        } for r in rows],
        "alive": len(live),
        "warnings": warnings,
    }  # fmt: skip


def _read(db: str) -> list[Replica]:
    conn = replica_store.open_conn(db, read_only=True)
    try:
        return replica_store.list_replicas(conn)
    finally:
        conn.close()


def add_replica_routes(admin: GuardedRoutes, db: str) -> None:
    """`GET /replicas` on the admin sub-app, over the ledger `db`."""

    async def replicas(request: web.Request) -> web.StreamResponse:
        if (refused := unknown_parameter(request.query, ())) is not None:
            return refused
        try:
            rows = await asyncio.to_thread(_read, db)
        except replica_store.driver_errors() as exc:  # the database is down, missing or unreadable right now
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return error_response(503, f"The ledger {parse_target(db)} cannot be read: {first}", "server_error",
                                  "ledger_unavailable")
        return web.json_response(replicas_view(rows, time.time()))

    admin.router.add_get("/replicas", replicas)
