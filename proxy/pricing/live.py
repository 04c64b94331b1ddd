"""The price table in force, kept current while the proxy runs: file watch, SIGHUP and an admin reload.

`LivePrices.table` is the active `PriceTable`, a plain attribute: a call reads it once, when it starts,
and prices with that table whatever happens next. A changed file is read and validated in a worker
thread; only a table that validated replaces the active one, in a single attribute assignment on the
event loop. A refused edit leaves the old table in force, is logged in one line naming the file, the
line and the problem, and stays visible (`error`, `GET /admin/pricing` in `admin/pricing.py`) until a good
edit replaces it.

The watcher polls the file's (mtime_ns, size, inode) and, for two seconds after a change, its bytes too:
a second edit within one timestamp tick changes neither the mtime nor, often, the size.

This module must never leave the proxy without a table, never apply a table that failed validation,
and never read or parse the file on the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any

from proxy.core.times import iso
from proxy.pricing.table import PriceTable, PricingError

__all__ = ["LivePrices", "Outcome", "RefusedEdit"]

log = logging.getLogger("meterproxy.pricing")

# A file modified this recently may be modified again within the same mtime tick: compare its bytes.
_RECENT_NS = 2_000_000_000

Signature = tuple[int, int, int] | None  # (mtime_ns, size, inode); None: the file cannot be stat'ed
_NEVER: Signature = (-1, -1, -1)  # not looked at yet: differs from every stat, and from a missing file


@dataclass(frozen=True, slots=True)
class RefusedEdit:
    """The last edit that was refused: the one-line reason (file, line, problem) and when (unix seconds)."""

    message: str
    at: float


class Outcome(Enum):
    LOADED = "loaded"  # a new table is in force
    UNCHANGED = "unchanged"  # the file holds the table already in force
    REFUSED = "refused"  # the file cannot be used: the old table stays


class LivePrices:
    """The active price table of one pricing file, and the means to replace it while serving."""

    def __init__(self, path: str | os.PathLike[str], table: PriceTable | None = None) -> None:
        """`table`: the file's table already loaded (the CLI loads it first, to fail early); else loaded here."""
        self.path = os.fspath(path)
        self.table: PriceTable = table if table is not None else PriceTable.load(self.path)
        self.loaded_at = time.time()
        self.error: RefusedEdit | None = None
        # The file's stat and bytes hash when last read. The hash of a loaded file is its table's
        # version, so the first poll finds nothing new unless the file changed since `table` was read.
        self._seen: Signature = _NEVER
        self._digest: str | None = self.table.version
        self._lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sighup_loop: asyncio.AbstractEventLoop | None = None

    @property
    def version(self) -> str:
        return self.table.version

    @property
    def source(self) -> str:
        return self.table.source

    # --- reloading ----------------------------------------------------------------------------------
    async def reload(self) -> bool:
        """Read the file now; True if a new table is in force. A refused edit keeps the old one (see `error`)."""
        return await self.refresh(force=True) is Outcome.LOADED

    async def refresh(self, force: bool = False) -> Outcome:
        """Reload if the file changed (always, with `force`); says what became of it."""
        async with self._lock:  # a SIGHUP during a poll's reload waits for it rather than racing it
            return await self._refresh(force)

    async def _refresh(self, force: bool) -> Outcome:
        seen = await asyncio.to_thread(_signature, self.path)
        if not force and seen == self._seen and not _recent(seen):
            return Outcome.UNCHANGED
        try:
            raw = await asyncio.to_thread(_read, self.path)
        except OSError as exc:
            self._seen, self._digest = seen, None
            return self._refuse(f"{self.path}: cannot read price table: {exc.strerror or exc}")
        digest = hashlib.sha256(raw).hexdigest()[:16]
        self._seen = seen
        if not force and digest == self._digest:
            return Outcome.UNCHANGED  # touched, or rewritten with the same bytes; or already refused
        self._digest = digest
        try:
            table = await asyncio.to_thread(PriceTable.from_bytes, raw, self.path)
        except PricingError as exc:
            return self._refuse(str(exc))
        except Exception as exc:  # noqa: BLE001 - a parser bug (deep nesting...) must not kill the watcher
            return self._refuse(f"{self.path}: cannot use price table: {type(exc).__name__}: {exc}")
        self.error = None
        if table.version == self.table.version:
            return Outcome.UNCHANGED
        previous, self.table, self.loaded_at = self.table.version, table, time.time()
        log.info("pricing: %s loaded, version %s (was %s)", self.path, table.version, previous)
        return Outcome.LOADED

    def _refuse(self, message: str) -> Outcome:
        self.error = RefusedEdit(message, time.time())
        log.error("pricing edit refused, version %s stays in force: %s", self.table.version, message)
        return Outcome.REFUSED

    # --- watching -----------------------------------------------------------------------------------
    def start_watching(self, interval: float = 0.5) -> None:
        """Poll the file every `interval` seconds from a task of the running loop; `stop()` ends it."""
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch(interval),
                                                                   name=f"pricing watcher {self.path}")

    async def _watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.refresh()
            except Exception:  # never die: the next poll may work
                log.exception("pricing watcher: checking %s failed", self.path)

    def install_sighup(self, loop: asyncio.AbstractEventLoop) -> None:
        """Reload on SIGHUP (where the platform has it). `stop()` removes the handler."""
        if not hasattr(signal, "SIGHUP"):
            return
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup, loop)
        self._sighup_loop = loop

    def _on_sighup(self, loop: asyncio.AbstractEventLoop) -> None:
        log.info("pricing: SIGHUP, reloading %s", self.path)
        task = loop.create_task(self.refresh(force=True), name="pricing reload (SIGHUP)")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """Stop watching and listening for SIGHUP; wait for a reload under way to end."""
        if self._sighup_loop is not None:
            self._sighup_loop.remove_signal_handler(signal.SIGHUP)
            self._sighup_loop = None
        tasks = [t for t in (self._watcher, *self._tasks) if t is not None]
        self._watcher = None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # --- views --------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        error = self.error
        return {"version": self.version, "source": self.source, "loaded_at": iso(self.loaded_at),
                "error": None if error is None else {"message": error.message, "at": iso(error.at)}}

    def status(self) -> dict[str, Any]:
        """What `GET /admin/pricing` answers: the summary, and every entry's prices as decimal strings."""
        return {**self.summary(), **self.table.describe()}


def _signature(path: str) -> Signature:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def _recent(seen: Signature) -> bool:
    return seen is not None and time.time_ns() - seen[0] < _RECENT_NS


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
