"""The spool: ledger rows that could not be committed to SQLite, kept durably until they can be.

An append-only JSON Lines file, one row (in `ledger.COLUMNS` order) per line, fsynced after every
append. The ledger writer appends a batch when the database refuses it (locked, disk full, read-only,
gone) and replays the file, in order, once the database works again; rows carry their unique
request_id, so a replay that is interrupted and repeated never duplicates them (INSERT OR IGNORE).

On the database's own disk (the default) a full disk would refuse the spool too, so the spool keeps a
reserve: a preallocated file beside it (`<spool>.reserve`), deleted the moment an append finds the disk
full, and made again once the spool has been replayed. An append that fails is cut back to where it
began, so a retried one never leaves a torn line.

Everything here is blocking file I/O: the writer runs it in a thread. It must never hold a raw API key
(rows never do) and never drop a line it could not parse without saying so. Its files are created
readable by their owner only.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from typing import Any

log = logging.getLogger("meterproxy")

Row = tuple[Any, ...]


_FULL = (errno.ENOSPC, errno.EDQUOT)
_ROOM_WITHOUT_RESERVE = 1024 * 1024  # free bytes that count as room again when no reserve is kept


class Spool:
    def __init__(self, path: str | os.PathLike[str], reserve_bytes: int = 0) -> None:
        self.path = os.fspath(path)
        self.reserve_path = f"{self.path}.reserve"
        self.reserve_bytes = reserve_bytes

    # --- the reserve -------------------------------------------------------------------------------
    def reserve(self) -> bool:
        """Make sure the reserve file holds `reserve_bytes` of disk; False if the disk has not that room."""
        if self.reserve_bytes <= 0:
            return True
        try:
            if os.path.getsize(self.reserve_path) >= self.reserve_bytes:
                return True
        except OSError:
            pass
        fd = os.open(self.reserve_path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.fchmod(fd, 0o600)
            try:
                try:
                    os.posix_fallocate(fd, 0, self.reserve_bytes)  # real blocks: a sparse file holds none
                except OSError as exc:
                    if exc.errno in _FULL:
                        raise
                    _write_zeros(fd, self.reserve_bytes)  # a file system without fallocate
                os.fsync(fd)
            except OSError as exc:
                if exc.errno not in _FULL:
                    raise
                os.ftruncate(fd, 0)
                return False
        finally:
            os.close(fd)
        return True

    def has_room(self) -> bool:
        """Whether an append would find room now: the reserve made again, or (without one) some free space."""
        if self.reserve_bytes > 0:
            return self.reserve()
        st = os.statvfs(os.path.dirname(os.path.abspath(self.path)))
        return st.f_bavail * st.f_frsize >= _ROOM_WITHOUT_RESERVE

    def release_reserve(self) -> bool:
        """Delete the reserve, giving its room to the spool; False if there was none."""
        try:
            os.unlink(self.reserve_path)
        except FileNotFoundError:
            return False
        return True

    def has_rows(self) -> bool:
        try:
            return os.path.getsize(self.path) > 0
        except OSError:
            return False

    def append(self, rows: list[Row]) -> None:
        """Append rows durably (written and fsynced before this returns). Raises OSError.

        A full disk releases the reserve and the append is tried once more."""
        data = "".join(json.dumps(row, separators=(",", ":"), ensure_ascii=False) + "\n" for row in rows).encode()
        try:
            self._append(data)
        except OSError as exc:
            if exc.errno not in _FULL or not self.release_reserve():
                raise
            log.warning("spool %s: the disk is full; its reserve %s is released for it", self.path,
                        self.reserve_path)
            self._append(data)

    def _append(self, data: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            start = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            except OSError:
                try:
                    os.ftruncate(fd, start)  # no torn line for the retry, or the next append, to follow
                except OSError:
                    pass
                raise
        finally:
            os.close(fd)

    def read(self) -> list[Row]:
        """Every complete row, in order. A torn last line (a crash mid-append) is skipped and logged."""
        try:
            with open(self.path, encoding="utf-8") as f:
                lines = f.readlines()
        except FileNotFoundError:
            return []
        rows: list[Row] = []
        for number, line in enumerate(lines, start=1):
            try:
                value = json.loads(line)
            except ValueError:
                log.error("spool %s: line %d is not a complete row; skipped", self.path, number)
                continue
            if isinstance(value, list):
                rows.append(tuple(value))
        return rows

    def clear(self) -> None:
        """Empty the spool once its rows are committed to the database."""
        fd = os.open(self.path, os.O_WRONLY | os.O_TRUNC | os.O_CREAT, 0o600)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_zeros(fd: int, size: int) -> None:
    block = b"\0" * 65536
    done = 0
    while done < size:
        done += os.write(fd, block[:min(len(block), size - done)])
