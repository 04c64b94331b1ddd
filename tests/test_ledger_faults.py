"""Faults on the ledger side, each with each policy: the database locked by another process, the disk full,
the file system read-only, the file deleted. `spool` keeps serving and replays; `reject` answers 503 and
forwards nothing until the ledger records again. Nothing is lost either way."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.support import FakeUpstream, ProxyServer
from tests.test_forwarding import request

USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}


def call(proxy: ProxyServer, n: int) -> tuple[int, dict[str, Any]]:
    status, _, body = request(proxy.url, body=json.dumps({"model": "gpt-4o", "n": n}).encode(),
                              headers={"X-Meter-Operation": f"op-{n}"})
    return status, json.loads(body)


def db_operations(db: str) -> list[str]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return [r[0] for r in conn.execute("SELECT operation FROM calls ORDER BY id")]
    finally:
        conn.close()


def wait_for(predicate: Callable[[], bool], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def spooled(path: Path) -> list[list[Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class Mount:
    """A small tmpfs of our own, to fill up for real (needs root and mount)."""

    def __init__(self, where: Path) -> None:
        self.where = where
        where.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}): disk-full and read-only "
                        "faults need one")

    def fill(self) -> Path:
        filler = self.where / "filler"
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        return filler

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.where)], capture_output=True)


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Mount]:
    m = Mount(tmp_path / "mnt")
    yield m
    m.unmount()


class Lock:
    """Another process's connection holding the database's write lock."""

    def __init__(self, db: str) -> None:
        self.conn = sqlite3.connect(db, timeout=10, isolation_level=None)
        self.conn.execute("BEGIN EXCLUSIVE")

    def release(self) -> None:
        self.conn.execute("ROLLBACK")
        self.conn.close()


def lock_fault(db: str, mount: Mount | None) -> Callable[[], None]:
    lock = Lock(db)
    return lock.release


def full_fault(db: str, mount: Mount | None) -> Callable[[], None]:
    assert mount is not None
    filler = mount.fill()
    return filler.unlink


def readonly_fault(db: str, mount: Mount | None) -> Callable[[], None]:
    # A remount would be refused while the proxy holds the files open for writing; an immutable flag
    # makes every write to them fail at once, open descriptors included (ext4, xfs, btrfs).
    files = [db + suffix for suffix in ("", "-wal") if os.path.exists(db + suffix)]
    result = subprocess.run(["chattr", "+i", *files], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot make files immutable here ({result.stderr.strip()})")
    return lambda: subprocess.run(["chattr", "-i", *files], check=True)


FAULTS = {"locked": (lock_fault, False), "disk full": (full_fault, True), "read-only": (readonly_fault, False)}


@pytest.mark.parametrize("policy", ["spool", "reject"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_then_recovery(fault: str, policy: str, upstream: FakeUpstream, tmp_path: Path,
                             start_proxy: Callable[..., ProxyServer], request_fixture: Any) -> None:
    make_fault, needs_mount = FAULTS[fault]
    mnt = request_fixture.getfixturevalue("mount") if needs_mount else None
    db = str((mnt.where if mnt else tmp_path) / "ledger.db")
    spool = tmp_path / "spool.jsonl"  # on another file system than a faulty tmpfs, as the README advises
    proxy = start_proxy(db=db, spool=str(spool), on_ledger_error=policy, ledger_busy_timeout=0.2)
    upstream.json({"model": "gpt-4o", "usage": USAGE})
    assert call(proxy, 0)[0] == 200

    heal = make_fault(db, mnt)
    try:
        status, body = call(proxy, 1)  # under way when the ledger fails: answered, and its row spooled
        assert status == 200 and body["usage"] == USAGE
        assert [row[7] for row in spooled(spool)] == ["op-1"]  # operation column: durable in the spool
        forwarded = len(upstream.seen)
        status, body = call(proxy, 2)
        if policy == "reject":
            assert status == 503 and body["error"]["code"] == "ledger_unavailable"
            assert len(upstream.seen) == forwarded  # nothing forwarded: no unrecorded spend
        else:
            assert status == 200
            assert [row[7] for row in spooled(spool)] == ["op-1", "op-2"]
    finally:
        heal()
    expected = ["op-0", "op-1"] if policy == "reject" else ["op-0", "op-1", "op-2"]
    wait_for(lambda: db_operations(db) == expected)  # replayed, in order
    wait_for(lambda: spooled(spool) == [])
    assert call(proxy, 3)[0] == 200
    assert db_operations(db) == [*expected, "op-3"]


@pytest.fixture
def request_fixture(request: pytest.FixtureRequest) -> pytest.FixtureRequest:
    return request


@pytest.mark.parametrize("policy", ["spool", "reject"])
def test_deleted_database_is_recreated(policy: str, upstream: FakeUpstream, tmp_path: Path,
                                       start_proxy: Callable[..., ProxyServer]) -> None:
    proxy = start_proxy(on_ledger_error=policy)
    db = proxy.settings.db
    upstream.json({"model": "gpt-4o", "usage": USAGE})
    assert call(proxy, 0)[0] == 200
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(db + suffix):
            os.unlink(db + suffix)
    assert call(proxy, 1)[0] == 200
    assert call(proxy, 2)[0] == 200
    assert db_operations(db) == ["op-1", "op-2"]  # a new ledger at the same path, nothing written into the void
