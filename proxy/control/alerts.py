"""Soft budget alerts: a webhook POST when a subject's spend reaches a share of its budget.

At each configured share (e.g. 0.8 and 1.0) of a budget, once per subject, period and share, the proxy
POSTs a JSON body to the webhook:

    {"event": "budget_threshold", "subject": {"kind": "user", "name": "alice"}, "period": "month",
     "period_label": "2026-11", "threshold": "0.8", "spend_usd": "8.02", "budget_usd": "10",
     "reason": "spend", "at": "2026-11-23T14:00:00.000Z"}

`reason` is "spend" when settled spend reached the share, "refused" when a request was refused for the
budget: reservations usually stop spend short of 100%, so the refusal is what fires the shares up to 1.

"Once" survives restarts: the alert is claimed in the `budget_alerts` table before it is sent, and the
outcome (sent, failed, attempts) is written there and logged. Delivery is retried with exponential
backoff, a bounded number of times; a 4xx other than 408/429 is not retried.

This module must never block a request (observe() only looks at memory and schedules a task), never send
one alert twice, and never leave a task behind on close().
"""

from __future__ import annotations

import asyncio
import logging
import time
from decimal import Decimal
from typing import Sequence

import aiohttp

from proxy.control.db import ControlDB
from proxy.control.limits import Subject, iso
from proxy.ledger import control_store as store

__all__ = ["Alerts"]

log = logging.getLogger("meterproxy")
_MEMORY_MAX = 100_000  # (subject, period, share) remembered; the table is the truth when this is emptied


class Alerts:
    """Budget threshold alerts; `observe()` is what `proxy.budgets.Budgets` calls."""

    def __init__(self, db: ControlDB, url: str | None, thresholds: Sequence[Decimal], *,
                 session: aiohttp.ClientSession | None = None, attempts: int = 5, base_delay: float = 0.5,
                 max_delay: float = 30.0, timeout: float = 10.0) -> None:
        self._db = db
        self.url = url
        self.thresholds = tuple(sorted(thresholds))
        self._session = session
        self._own_session = session is None
        self._attempts = max(1, attempts)
        self._base_delay = base_delay
        self._max_delay = max_delay
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._seen: set[tuple[Subject, str, Decimal]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def observe(self, subject: Subject, period: str, label: str, spent: Decimal, budget: Decimal,
                refused: bool = False) -> None:
        """Note a subject's spend; schedule the alerts of shares it has newly reached."""
        if self.url is None or budget <= 0:
            return  # a zero budget blocks a subject on purpose: nothing to warn about
        for share in self.thresholds:
            reached = spent >= share * budget or (refused and share <= 1)
            if not reached:
                break  # thresholds are sorted: higher ones are not reached either
            mark = (subject, f"{period}:{label}", share)
            if mark in self._seen:
                continue
            if len(self._seen) >= _MEMORY_MAX:
                self._seen.clear()
            self._seen.add(mark)
            body: dict[str, object] = {
                "event": "budget_threshold", "subject": {"kind": subject.kind, "name": subject.name},
                "period": period, "period_label": label, "threshold": str(share),
                "spend_usd": format(spent, "f"), "budget_usd": format(budget, "f"),
                "reason": "refused" if refused and spent < share * budget else "spend",
                "at": iso(time.time()),
            }  # fmt: skip
            task = asyncio.get_running_loop().create_task(self._fire(subject, f"{period}:{label}", share, body))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _fire(self, subject: Subject, period: str, share: Decimal, body: dict[str, object]) -> None:
        key = (subject.kind, subject.name, period, str(share))
        try:
            claimed = await self._db.write(lambda conn: store.claim_alert(conn, key, time.time()),
                                           keys_or_limits=False)
        except Exception as exc:  # cannot remember it: sending could repeat it after a restart
            log.error("alert %s %s %s: not sent, cannot record it: %s", subject, period, share, exc)
            return
        if not claimed:
            return  # claimed before: by an earlier run, or by another replica
        outcome, attempts = await self._deliver(body)
        level = logging.INFO if outcome == "sent" else logging.ERROR
        log.log(level, "alert %s %s at %s of budget: %s after %d attempt(s)", subject, period, share, outcome,
                attempts)
        try:
            await self._db.write(lambda conn: store.finish_alert(conn, key, outcome, attempts, time.time()),
                                 keys_or_limits=False)
        except Exception as exc:
            log.error("alert %s %s %s: outcome not recorded: %s", subject, period, share, exc)

    async def _deliver(self, body: dict[str, object]) -> tuple[str, int]:
        assert self.url is not None
        session = await self._client()
        last = "not tried"
        for attempt in range(1, self._attempts + 1):
            try:
                async with session.post(self.url, json=body, timeout=self._timeout,
                                        allow_redirects=False) as resp:
                    await resp.read()
                    if 200 <= resp.status < 300:
                        return "sent", attempt
                    last = f"HTTP {resp.status}"
                    if 400 <= resp.status < 500 and resp.status not in (408, 429):
                        return f"failed: {last} (not retried)", attempt
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                last = str(exc) or type(exc).__name__
            if attempt < self._attempts:
                delay = min(self._base_delay * 2 ** (attempt - 1), self._max_delay)
                log.warning("alert webhook attempt %d failed (%s); retrying in %.1fs", attempt, last, delay)
                await asyncio.sleep(delay)
        return f"failed: {last[:200]}", self._attempts

    async def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def idle(self) -> None:
        """Wait until every alert scheduled so far is sent or given up (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self, grace: float = 5.0) -> None:
        """Let alerts in progress finish for up to `grace` seconds, then cancel what is left."""
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None
