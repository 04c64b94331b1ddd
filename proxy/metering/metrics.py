"""Prometheus metrics for `GET /metrics`: calls, tokens and cost per model and endpoint, latency, the ledger.

One `Metrics` per app, each with its own CollectorRegistry (never the process-global one: two apps in one
process, as in the tests, must not collide). `observe_call` runs once per call on the hot path: it finds
the call's label set in a plain dict and bumps pre-bound children, a few microseconds.

Cardinality is bounded: endpoints outside the known OpenAI routes count as "other", at most `max_models`
model names (then "other"; only a call that succeeded gives its model a label of its own, so failed calls
naming junk models cannot crowd real ones out), and per-key / per-user labels exist only when configured, each capped too.

Cost here is a float counter in USD, good enough for dashboards; the ledger stays the exact record. This
module must never raise into a call (a bad record is counted as best it can be), never log per call,
and never label by anything a client controls without a cap.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import choose_encoder

from proxy.core.record import CallRecord

__all__ = ["KNOWN_ENDPOINTS", "Metrics"]

KNOWN_ENDPOINTS = frozenset({
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/models",
    "/v1/moderations", "/v1/audio/speech", "/v1/audio/transcriptions", "/v1/audio/translations",
    "/v1/images/generations", "/v1/images/edits", "/v1/images/variations", "/v1/batches", "/v1/files",
})  # fmt: skip
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 600)
_TTFB_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)
_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
_TOKEN_KINDS = ("prompt", "completion", "cached", "reasoning")
OTHER = "other"


class _Capped:
    """Values as labels, the first `limit` distinct ones as themselves, the rest as "other"."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str | None, admit: bool = True) -> str:
        """The label of `value`; a value not seen yet takes a place of its own only if `admit`."""
        if value is None:
            return ""
        if value in self._seen:
            return value
        if not admit or len(self._seen) >= self._limit:
            return OTHER
        self._seen.add(value)
        return value


class Metrics:
    """The proxy's metrics; see the module docstring. `registry` is this app's own."""

    def __init__(self, label_keys: bool = False, label_users: bool = False, *, max_models: int = 500,
                 max_keys: int = 1000, max_users: int = 5000) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._label_keys, self._label_users = label_keys, label_users
        self._model = _Capped(max_models)
        self._key = _Capped(max_keys)
        self._user = _Capped(max_users)
        extra = [*(["key_id"] if label_keys else []), *(["user"] if label_users else [])]
        base = ["model", "endpoint"]
        reg = self.registry
        self.requests = Counter("meterproxy_requests", "Calls through the proxy, by model, endpoint and status "
                                "(status 0: no response from the upstream)", [*base, "status", *extra], registry=reg)
        self.tokens = Counter("meterproxy_tokens", "Tokens of recorded calls; cached is part of prompt, reasoning "
                              "part of completion", [*base, "kind", *extra], registry=reg)
        self.cost = Counter("meterproxy_cost_usd", "Cost of recorded calls in USD (float; the ledger is exact)",
                            [*base, *extra], registry=reg)
        self.unpriced = Counter("meterproxy_unpriced_calls", "Calls whose model has no price", base, registry=reg)
        self.usage_source = Counter("meterproxy_calls_by_usage_source", "Calls by where their usage came from: "
                                    "upstream (reported), counted (by the proxy), none", ["source"], registry=reg)
        self.latency = Histogram("meterproxy_upstream_latency_seconds", "From the request's arrival to the "
                                 "end of the upstream's response", base, buckets=_LATENCY_BUCKETS, registry=reg)
        self.ttfb = Histogram("meterproxy_upstream_ttfb_seconds", "From the request's arrival to the upstream's "
                              "first response byte", base, buckets=_TTFB_BUCKETS, registry=reg)
        self.queue_depth = Gauge("meterproxy_ledger_queue_depth", "Rows waiting for the ledger writer",
                                 registry=reg)
        self.spool_depth = Gauge("meterproxy_ledger_spool_depth", "Rows waiting in the spool because the "
                                 "database refused them", registry=reg)
        self.ledger_accepting = Gauge("meterproxy_ledger_accepting", "1 while the database takes rows, 0 while "
                                      "they are only spooled", registry=reg)
        self.commit_seconds = Histogram("meterproxy_ledger_commit_seconds", "Time to insert and commit one "
                                        "ledger batch", buckets=_COMMIT_BUCKETS, registry=reg)
        self.batch_rows = Histogram("meterproxy_ledger_batch_rows", "Rows per committed ledger batch",
                                    buckets=_BATCH_BUCKETS, registry=reg)
        self.row_wait = Histogram("meterproxy_ledger_row_wait_seconds", "From a call's row handed to the ledger "
                                  "to the row committed or spooled: what the call's response waited for",
                                  buckets=_COMMIT_BUCKETS, registry=reg)
        self.admission_wait = Histogram("meterproxy_budget_admission_wait_seconds", "PostgreSQL: time an "
                                        "admission waited for the shared-limits connection", buckets=_COMMIT_BUCKETS,
                                        registry=reg)
        self.admission_seconds = Histogram("meterproxy_budget_admission_seconds", "PostgreSQL: time of one "
                                           "admission's transaction (reserve budgets, count rate windows)",
                                           buckets=_COMMIT_BUCKETS, registry=reg)
        self._children: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        self._sources: dict[str, Any] = {}

    # --- per call ---------------------------------------------------------------------------------
    def _bound(self, rec: CallRecord) -> tuple[Any, ...]:
        # Capped values first, so this cache is as bounded as the labels are.
        # A model name takes a label of its own only once a call to it succeeded: a failed call's model is
        # whatever the client typed, and junk names must not use up the places real models need.
        key = (self._model(rec.model, 200 <= rec.status < 300), rec.endpoint if rec.endpoint in KNOWN_ENDPOINTS else OTHER, rec.status,
               self._key(rec.key_id) if self._label_keys else None,
               self._user(rec.user) if self._label_users else None)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = self._bind(*key)
        return found

    def _bind(self, model: str, endpoint: str, status: int, key_id: str | None,
              user: str | None) -> tuple[Any, ...]:
        base = (model, endpoint)
        extra = (*((key_id,) if self._label_keys else ()), *((user,) if self._label_users else ()))
        return (
            self.requests.labels(*base, str(status), *extra),
            *(self.tokens.labels(*base, kind, *extra) for kind in _TOKEN_KINDS),
            self.cost.labels(*base, *extra), self.unpriced.labels(*base),
            self.latency.labels(*base), self.ttfb.labels(*base),
        )

    def observe_call(self, rec: CallRecord) -> None:
        """Count one recorded call. Cheap: one dict lookup, then a few increments."""
        try:
            requests, prompt, completion, cached, reasoning, cost, unpriced, latency, ttfb = self._bound(rec)
            requests.inc()
            if rec.prompt_tokens:
                prompt.inc(rec.prompt_tokens)
            if rec.completion_tokens:
                completion.inc(rec.completion_tokens)
            if rec.cached_tokens:
                cached.inc(rec.cached_tokens)
            if rec.reasoning_tokens:
                reasoning.inc(rec.reasoning_tokens)
            if rec.cost_usd:
                cost.inc(float(rec.cost_usd))
            if not rec.priced:
                unpriced.inc()
            latency.observe(rec.latency_ms / 1000)
            if rec.ttfb_ms is not None:
                ttfb.observe(rec.ttfb_ms / 1000)
            source = self._sources.get(rec.usage_source)
            if source is None:
                source = self._sources[rec.usage_source] = self.usage_source.labels(str(rec.usage_source))
            source.inc()
        except (TypeError, ValueError):  # a malformed record must not break the call it describes
            return

    # --- the ledger -------------------------------------------------------------------------------
    def observe_commit(self, seconds: float, batch_size: int) -> None:
        self.commit_seconds.observe(seconds)
        self.batch_rows.observe(batch_size)

    def observe_row_wait(self, seconds: float) -> None:
        self.row_wait.observe(seconds)

    def observe_admission(self, waited: float, seconds: float) -> None:
        """Thread-safe: called from the shared limits' worker thread."""
        self.admission_wait.observe(waited)
        self.admission_seconds.observe(seconds)

    def queue_depth_from(self, read: Callable[[], float]) -> None:
        """Read the queue depth at scrape time (e.g. `lambda: ledger.queue_depth`)."""
        self.queue_depth.set_function(read)

    def spool_from(self, depth: Callable[[], float], accepting: Callable[[], float]) -> None:
        """Read the spool's depth and whether the database takes rows at scrape time."""
        self.spool_depth.set_function(depth)
        self.ledger_accepting.set_function(accepting)

    # --- exposition -------------------------------------------------------------------------------
    def render(self) -> bytes:
        return generate_latest(self.registry)

    def handler(self) -> Callable[[web.Request], Awaitable[web.Response]]:
        """An aiohttp handler for GET /metrics: Prometheus text, or OpenMetrics if the scraper asks for it."""

        async def metrics(request: web.Request) -> web.Response:
            encode, content_type = choose_encoder(request.headers.get("Accept", ""))
            return web.Response(body=encode(self.registry), headers={"Content-Type": content_type})

        return metrics
