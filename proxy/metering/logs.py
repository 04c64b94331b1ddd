"""Operator logs: the one `meterproxy` logger tree, the access log, and warnings that come once, not per call.

Every logger of the project is `meterproxy` or below it, so one setting (`--log-level`, or a logging
config naming `meterproxy`) reaches them all. `CallLogs.observe` sees each call once its row is stored
(committed or spooled) or refused by the ledger:
- `access_log`: one JSON line per call on `meterproxy.access` — request id, key id, user, model, status,
  latency and cost. Never the key itself, never a body, never a header value beyond the attributed user.
- an unreachable upstream is a WARNING once per burst (the first failure, then at most once a minute while
  it lasts), and one line when it answers again;
- an unpriced model is a WARNING once per model and hour (the model name comes from clients: the set of
  names remembered is bounded, and names are logged escaped).

This module must never log a raw key, a request or response body, or a line per call outside the access log.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Callable

from proxy.core.money import usd_text
from proxy.core.record import CallRecord

__all__ = ["ACCESS", "CallLogs", "setup"]

ROOT = "meterproxy"
ACCESS = "meterproxy.access"
log = logging.getLogger("meterproxy.calls")
access = logging.getLogger(ACCESS)

_UNPRICED_EVERY = 3600.0  # seconds between two warnings about one model
_UNPRICED_MODELS = 1000   # model names remembered at most (clients choose them)
_DOWN_EVERY = 60.0        # seconds between two "still unreachable" warnings in one outage
_UNREACHABLE = ("Upstream unreachable", "Upstream timed out connecting")


def setup(level: str, access_log: bool) -> None:
    """Log lines to stderr with time, level and logger; the access log, when on, as bare JSON lines."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger(ROOT).setLevel(level)
    if access_log:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
        access.setLevel(logging.INFO)  # asked for explicitly: shown whatever --log-level says
        access.propagate = False


class CallLogs:
    """What the operator's log learns from each finished call; see the module docstring."""

    def __init__(self, access_log: bool = False, clock: Callable[[], float] = time.monotonic) -> None:
        self.access_log = access_log
        self._clock = clock
        self._unpriced: dict[str, float] = {}  # model -> when it was last warned about
        self._down_since: float | None = None
        self._down_warned = 0.0
        self._down_calls = 0

    def observe(self, rec: CallRecord) -> None:
        if self.access_log:
            access.info("%s", json.dumps(access_line(rec), ensure_ascii=True, separators=(",", ":")))
        error = rec.error or ""
        if error.startswith(_UNREACHABLE):
            self._unreachable(error)
        elif rec.ttfb_ms is not None:  # the upstream answered
            self._reachable()
        if not rec.priced and rec.model and rec.status is not None and 200 <= rec.status < 300:
            self._unpriced_model(rec.model)

    def _unreachable(self, error: str) -> None:
        now = self._clock()
        self._down_calls += 1
        if self._down_since is None:
            self._down_since = self._down_warned = now
            log.warning("%s (further failures are logged at most once a minute until it answers)", error)
        elif now - self._down_warned >= _DOWN_EVERY:
            self._down_warned = now
            log.warning("upstream still unreachable: %d call(s) failed over %.0f s; last: %s",
                        self._down_calls, now - self._down_since, error)

    def _reachable(self) -> None:
        if self._down_since is None:
            return
        log.warning("upstream answers again after %d failed call(s) over %.0f s", self._down_calls,
                    self._clock() - self._down_since)
        self._down_since, self._down_calls = None, 0

    def _unpriced_model(self, model: str) -> None:
        now = self._clock()
        last = self._unpriced.get(model)
        if last is not None and now - last < _UNPRICED_EVERY:
            return
        if last is None and len(self._unpriced) >= _UNPRICED_MODELS:
            self._unpriced = {m: t for m, t in self._unpriced.items() if now - t < _UNPRICED_EVERY}
            if len(self._unpriced) >= _UNPRICED_MODELS:
                return  # a flood of made-up names: the ledger flags every one of them anyway
        self._unpriced[model] = now
        log.warning("model %s has no price in the pricing table: its calls are recorded unpriced (priced: false) "
                    "until it is added (then `meterproxy reprice`); said once an hour per model",
                    json.dumps(model[:200]))


def access_line(rec: CallRecord) -> dict[str, object]:
    """The access log's fields for one call: ids, attribution, outcome and cost; nothing secret."""
    return {
        "ts": round(rec.started_at, 3), "request_id": rec.request_id, "key_id": rec.key_id, "user": rec.user,
        "method": rec.method, "endpoint": rec.endpoint, "model": rec.model or rec.requested_model,
        "stream": rec.stream, "status": rec.status,
        "latency_ms": None if rec.latency_ms is None else round(rec.latency_ms, 1),
        "total_tokens": rec.total_tokens, "usage_source": rec.usage_source,
        "cost_usd": usd_text(rec.cost_usd), "priced": rec.priced,
    }  # fmt: skip
