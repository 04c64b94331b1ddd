"""One metered call: ties a request's attribution, its endpoint meter, pricing and the ledger together.

The forwarder reports what happens to the HTTP exchange; this turns it into a `CallRecord` and commits it.
A meter that raises is logged and ignored (mitmproxy's safecall): metering must never break a request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from typing import Any, Callable, Mapping

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.control.gate import Admission, Gate, Refusal
from proxy.core.attribution import TEAM_TAG, attribute
from proxy.core.credentials import api_key
from proxy.core.record import CallRecord
from proxy.counting.counter import CallCount, CountPolicy, count_call
from proxy.forwarding.edits import Edit
from proxy.forwarding.redact import Secrets
from proxy.ledger.writer import Ledger, LedgerError
from proxy.metering.logs import CallLogs
from proxy.metering.meters import MAX_ERROR_CHARS, Meter, meter_for
from proxy.metering.metrics import Metrics
from proxy.pricing.table import PriceTable

log = logging.getLogger("meterproxy.metering")
MAX_METER_BYTES = 64 * 1024 * 1024  # the max_meter_bytes default
# A body larger than this is parsed in a thread: json.loads of 30 MiB holds the loop for ~100 ms.
_INLINE_PARSE_BYTES = 256 * 1024
# What stands in the ledger where the upstream echoed the real key (managed mode): not even its last digits.
UPSTREAM_KEY_MARK = "[upstream key]"


class MeteredCall:
    """Observer of one forwarded call (it implements proxy.forwarding.observer.CallObserver). The forwarder
    calls the on_* hooks, then `await finish()`; admission goes through `check_caller` and `admit`, to the
    gate this call was given."""

    def __init__(self, method: str, path: str, headers: CIMultiDictProxy[str], *,
                 prices: PriceTable, ledger: Ledger, inject_usage: bool = False,
                 counting: CountPolicy | None = None, sample_rate: float = 0.0,
                 metrics: Metrics | None = None, max_meter_bytes: int = MAX_METER_BYTES,
                 logs: CallLogs | None = None, gate: Gate | None = None) -> None:
        self._gate = gate
        self._metrics = metrics
        self._submitted_at: float | None = None  # when the row went to the ledger
        self._logs = logs
        self._prices = prices
        self._ledger = ledger
        self._counting = counting
        self._sample_rate = sample_rate
        self._t0 = time.perf_counter()
        self.meter: Meter = meter_for(method, path, inject_usage, max_meter_bytes)
        self._max_meter_bytes = max_meter_bytes
        self._fed = 0  # bytes of the decoded copy the meter has read
        self._stopped: str | None = None  # why metering stopped before the end (a bound was passed)
        # 128 random bits, as uuid4 has, at a twentieth of its cost.
        self.record = CallRecord(request_id=os.urandom(16).hex(), started_at=time.time(), method=method,
                                 endpoint=path)
        attribute(headers, self.record)
        # Held in memory for this call only, to take every key it holds out of anything the upstream echoes.
        self.secrets = Secrets([(api_key(headers), f"...{self.record.key_hint or ''}")])
        self._meter_failed = False
        self._finished = False
        self.recorded: bool | None = None  # after finish(): the row was committed or spooled
        self._done: asyncio.Event | None = None  # set once finish() has handed the row over (or failed to)
        self._admission: Admission | None = None

    @property
    def finished(self) -> bool:
        return self._finished

    def _safe(self, hook: Callable[..., Any], *args: Any) -> Any:
        if self._meter_failed:
            return None
        try:
            return hook(*args)
        except Exception:  # a meter bug must not break the call; the row says usage was not read
            self._meter_failed = True
            log.exception("meter %s failed on %s", type(self.meter).__name__, self.record.endpoint)
            return None

    # --- hooks called by the forwarder -------------------------------------------------------
    async def read_request(self, body: bytes, content_type: str) -> bytes:
        """`on_request`, with a large body parsed off the event loop."""
        if len(body) <= _INLINE_PARSE_BYTES:
            return self.on_request(body, content_type)
        return await asyncio.to_thread(self.on_request, body, content_type)

    def on_request(self, body: bytes, content_type: str) -> bytes:
        """Read the request; returns the body to forward (the client's, unless include_usage is injected)."""
        replaced = self._safe(self.meter.on_request, body, content_type)
        rec, meter = self.record, self.meter
        rec.requested_model = meter.requested_model
        rec.stream = meter.stream
        if rec.user is None:
            rec.user = meter.body_user[:256] if meter.body_user else None
        return replaced if replaced is not None else body

    @property
    def edits_stream(self) -> bool:
        """The response stream must pass through the meter's edits (include_usage was injected)."""
        return self.meter.inject and self.metering

    @property
    def metering(self) -> bool:
        """The meter still reads the body (it has not failed, nor passed a bound)."""
        return not self._meter_failed and self._stopped is None

    @property
    def max_meter_bytes(self) -> int:
        return self._max_meter_bytes

    def _stop(self, note: str) -> None:
        self._stopped = note
        self.meter.discard()
        log.warning("%s on %s: %s", self.record.request_id, self.record.endpoint, note)

    def admitted(self, admission: Admission) -> None:
        """The gate let the call through; in managed mode the key names the user and team, not the headers."""
        self._admission = admission
        self._attribute(admission.key_id, admission.user, admission.team, admission.managed)
        # Managed mode: the upstream gets the real key, so the upstream may echo that one.
        self.secrets.add(admission.authorization, UPSTREAM_KEY_MARK)

    def refused(self, refusal: Refusal) -> None:
        """The gate refused the call (bad key, rate limit, budget): recorded as such, never forwarded."""
        self._attribute(refusal.key_id, refusal.user, refusal.team, refusal.managed)
        self.on_failure(refusal.status, f"{refusal.code}: {refusal.message}")
        if refusal.status == 401:
            self._unauthenticated()

    # -- admission, for the forwarder: the gate is reached only through the metered call --

    @property
    def request_id(self) -> str:
        return self.record.request_id

    async def check_caller(self, headers: Mapping[str, str]) -> Refusal | None:
        """In managed mode, the presented key before the body is read: its refusal (recorded), else None."""
        if self._gate is None or not self._gate.managed:
            return None
        resolved = await self._gate.resolve(headers)
        if isinstance(resolved, Refusal):
            self.refused(resolved)
            return resolved
        return None

    def on_unchecked_caller(self) -> None:
        """Refused before the key was checked: in managed mode the client's X-Meter-* names no one."""
        if self._gate is not None and self._gate.managed:
            self.record.user = None
            self.record.tags.pop(TEAM_TAG, None)

    async def admit(self, headers: Mapping[str, str], path: str, method: str, body: bytes,
                    upstream_headers: CIMultiDict[str]) -> Refusal | None:
        """Managed keys, rate limits and budgets: the gate's refusal (recorded), or None with
        `upstream_headers` amended by the admission (the real upstream key in managed mode)."""
        if self._gate is None:
            return None
        admission = await self._gate.admit(headers, self.meter.request, path, method=method, body_size=len(body),
                                           record=self.record, raw=body)
        if isinstance(admission, Refusal):
            self.refused(admission)
            return admission
        self.admitted(admission)
        admission.apply(upstream_headers)
        return None

    # -- what of an edited stream may be sent, for the forwarder --

    def last_event_end(self) -> int | None:
        return self.meter.last_event_end

    def stream_edits(self) -> list[Edit]:
        return self.meter.edits

    def on_decode_error(self, error: str) -> None:
        if self.meter.usage_error is None:
            self.meter.usage_error = error

    def _unauthenticated(self) -> None:
        # Anyone can send a call that fails authentication: its free-form X-Meter-* tags are not stored,
        # or a flood of them would grow the ledger at the caller's will.
        self.record.tags = {}

    def _attribute(self, key_id: str | None, user: str | None, team: str | None, managed: bool = False) -> None:
        """Managed: the key names the subject, whatever X-Meter-User / X-Meter-Team or the body said."""
        rec = self.record
        if key_id is not None or managed:
            rec.key_id = key_id
        if user is not None or managed:
            rec.user = user
        if team is not None:
            rec.tags[TEAM_TAG] = team
        elif managed:
            rec.tags.pop(TEAM_TAG, None)

    def on_response_headers(self, status: int, content_type: str) -> None:
        self.record.status = status
        if status == 401:  # the upstream refused the key (passthrough): as unauthenticated as the gate's 401
            self._unauthenticated()
        self._safe(self.meter.on_response_headers, status, content_type)

    def on_first_byte(self) -> None:
        self.record.ttfb_ms = (time.perf_counter() - self._t0) * 1000

    def on_chunk(self, data: bytes) -> int | None:
        """Feed a decoded copy of body bytes; returns the stream offset to hold back from, if any.

        Past max_meter_bytes (or a stream event past it) the meter stops reading: the bytes still go to
        the client, and the row says metering stopped."""
        if not self.metering:
            return None
        if len(data) > self._max_meter_bytes - self._fed:
            self._stop(f"the response's decoded body passed max_meter_bytes ({self._max_meter_bytes} bytes): "
                       "metering stopped there; usage not read")
            return None
        self._fed += len(data)
        self._safe(self.meter.on_chunk, data)
        stopped = self.meter.stopped
        if stopped is not None:
            self._stop(f"{stopped} (max_meter_bytes {self._max_meter_bytes}): metering stopped there; "
                       "usage not read")
            return None
        return self.meter.hold_from

    def on_end(self) -> None:
        if self._stopped is None:
            self._safe(self.meter.on_end)

    def on_failure(self, status: int | None, message: str) -> None:
        """The exchange failed: upstream unreachable, timed out, broke off, or the client went away."""
        if status is not None:
            self.record.status = status
        self.record.error = message if self.record.error is None else f"{self.record.error}; {message}"

    @property
    def upstream_key(self) -> str | None:
        """The real key sent upstream in managed mode (to keep out of the client's bytes), else None."""
        return self._admission.authorization if self._admission is not None else None

    # --- the end -----------------------------------------------------------------------------
    def _redact(self) -> None:
        """Every text the upstream may have written into the row, without a key, then cut to size."""
        rec, secrets = self.record, self.secrets
        if secrets:
            rec.error = secrets.redact(rec.error, MAX_ERROR_CHARS)
            rec.model = secrets.redact(rec.model)
            rec.service_tier = secrets.redact(rec.service_tier)
        elif rec.error is not None:
            rec.error = rec.error[:MAX_ERROR_CHARS]

    def _finalize_record(self, counted: CallCount | None) -> None:
        rec, meter = self.record, self.meter
        rec.ended_at = time.time()
        rec.latency_ms = (time.perf_counter() - self._t0) * 1000
        rec.stream = rec.stream or meter.stream
        rec.model = meter.model or rec.requested_model
        rec.service_tier = meter.service_tier
        if meter.error and rec.error is None:
            rec.error = meter.error
        if self._stopped is not None:
            rec.usage_note = self._stopped
        if meter.usage is not None and not self._meter_failed:
            rec.set_usage(meter.usage, "upstream")
            rec.cost_usd, rec.priced = self._prices.cost(rec.model, meter.usage, rec.service_tier)
            rec.pricing_version = self._prices.version
            if counted is not None:  # sampled for accuracy: keep our count beside the provider's
                rec.counted_prompt_tokens = counted.prompt.tokens if counted.prompt else None
                rec.counted_completion_tokens = counted.completion.tokens if counted.completion else None
            return
        note = self._stopped or meter.usage_error or ("meter failed" if self._meter_failed else None)
        if note and 200 <= rec.status < 300:
            rec.error = note if rec.error is None else f"{rec.error}; {note}"
        if counted is not None:
            usage = counted.usage()
            rec.set_usage(usage, "counted")
            rec.approximate, rec.lower_bound, rec.usage_note = counted.approximate, counted.lower_bound, counted.note()
            rec.cost_usd, rec.priced = self._prices.cost(rec.model, usage, rec.service_tier)
            rec.pricing_version = self._prices.version
            return
        # Nothing to price: flag it unpriced only if its model has no price (a bare GET is not "unpriced"),
        # or if its endpoint bills by usage and the usage could not be read.
        rec.priced = rec.model is None or self._prices.resolve(rec.model) is not None
        if meter.unpriced_without_usage and meter.succeeded:
            rec.priced = False

    def _wants_count(self) -> bool:
        """Count when the upstream spent tokens but reported none, and for a sample of those it reported."""
        meter = self.meter
        if self._counting is None or not self.metering or not meter.countable or not meter.succeeded:
            return False
        if meter.usage is None:
            return True
        return self._sample_rate > 0 and random.random() < self._sample_rate

    async def _count(self) -> CallCount | None:
        meter, policy = self.meter, self._counting
        assert policy is not None
        model = meter.model or meter.requested_model
        try:
            # Off the event loop: a 100k-token prompt takes ~20 ms to tokenize.
            return await asyncio.to_thread(count_call, policy, self.record.endpoint, model, meter.request,
                                           meter.output)
        except Exception:  # a counting bug must not break the call; the row says usage was not read
            log.exception("counting failed on %s", self.record.endpoint)
            return None

    async def finish(self) -> None:
        """Count if needed, price and commit the row; returns once it is committed (a ledger failure is logged).

        Shielded throughout: a cancelled handler (client gone, shutdown) must still leave its row."""
        if self._finished:
            return
        self._finished = True
        self._done = asyncio.Event()
        if self._wants_count():
            await asyncio.shield(self._count_and_commit())
            return
        self._finalize_record(None)
        self._redact()
        try:
            # The ledger's own future, shielded: no task per call on this, the common path.
            await asyncio.shield(self._submit())
            self.recorded = True
        except LedgerError as exc:
            self.recorded = False
            log.error("ledger: call %s not recorded: %s", self.record.request_id, exc)
        finally:
            self._conclude()

    async def _count_and_commit(self) -> None:
        counted = await self._count()
        self._finalize_record(counted)
        self._redact()
        try:
            await self._submit()
            self.recorded = True
        except LedgerError as exc:
            self.recorded = False
            log.error("ledger: call %s not recorded: %s", self.record.request_id, exc)
        finally:
            self._conclude()

    def _submit(self) -> asyncio.Future[None]:
        self._submitted_at = time.perf_counter()
        try:
            return self._ledger.submit(self.record)
        except LedgerError as exc:
            failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            failed.set_exception(exc)
            return failed

    async def wait_done(self) -> None:
        """Until finish(), begun, is over: the row committed, spooled or refused (a shutdown waits on it)."""
        if self._done is not None:
            await self._done.wait()

    def _conclude(self) -> None:
        if self._done is not None:
            self._done.set()
        if self._metrics is not None:
            self._metrics.observe_call(self.record)
            if self._submitted_at is not None:
                self._metrics.observe_row_wait(time.perf_counter() - self._submitted_at)
        if self._logs is not None:
            try:
                self._logs.observe(self.record)
            except Exception:  # a log line must never keep a call's budget hold
                log.exception("call logs failed on %s", self.record.request_id)
        if self._admission is not None:  # settle: charge the hold with the recorded cost
            self._admission.settle(self.record.cost_usd, self.record.total_tokens, recorded=bool(self.recorded))
