"""Faults on the ledger side, each with each policy: the database locked by another process, the disk full,
the file system read-only, the file deleted. `spool` keeps serving and replays; `reject` answers 503 and
forwards nothing until the ledger records again. Nothing is lost either way."""

from __future__ import annotations

import http.client
import json
import logging
import os
import sqlite3
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from proxy.ledger import Ledger
from proxy.record import CallRecord
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


# --- the spool on the database's own disk, a lock held long, the file deleted under load ----------------

def mode_of(path: Path | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_disk_full_with_the_spool_on_the_same_disk_uses_its_reserve(
        mount: Mount, upstream: FakeUpstream, start_proxy: Callable[..., ProxyServer],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    db = str(mount.where / "ledger.db")  # the spool by default beside it: the same small tmpfs
    proxy = start_proxy(db=db, spool_reserve=256 * 1024, ledger_busy_timeout=0.2)
    assert "on the same file system" in caplog.text  # said at start
    spool, reserve = Path(db + ".spool.jsonl"), Path(db + ".spool.jsonl.reserve")
    assert reserve.stat().st_size == 256 * 1024 and reserve.stat().st_blocks * 512 >= 256 * 1024  # not sparse
    assert mode_of(reserve) == 0o600
    upstream.json({"model": "gpt-4o", "usage": USAGE})
    assert call(proxy, 0)[0] == 200
    filler = mount.fill()
    try:
        for n in (1, 2):  # the database is full; the spool takes the reserve's room
            status, body = call(proxy, n)
            assert status == 200 and body["usage"] == USAGE
        assert not reserve.exists()
        assert [row[7] for row in spooled(spool)] == ["op-1", "op-2"]
        assert mode_of(spool) == 0o600
    finally:
        filler.unlink()
    wait_for(lambda: db_operations(db) == ["op-0", "op-1", "op-2"])
    wait_for(lambda: reserve.exists() and reserve.stat().st_size == 256 * 1024)  # made again once replayed


@pytest.mark.parametrize("kind", ["json", "stream"])
def test_a_row_neither_committed_nor_spooled_never_completes(
        kind: str, mount: Mount, upstream: FakeUpstream, start_proxy: Callable[..., ProxyServer]) -> None:
    db = str(mount.where / "ledger.db")
    proxy = start_proxy(db=db, spool_reserve=0, ledger_busy_timeout=0.2)  # no reserve: the spool fills too
    stream = kind == "stream"
    done = b"data: [DONE]\n\n"
    if stream:
        sse = (b'data: {"model":"gpt-4o","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
               b'data: {"model":"gpt-4o","choices":[],"usage":' + json.dumps(USAGE).encode() + b"}\n\n" + done)
        upstream.sse(sse, splits=[40])
    else:
        upstream.json({"model": "gpt-4o", "usage": USAGE})
    body = json.dumps({"model": "gpt-4o", "stream": stream}).encode()
    assert request(proxy.url, body=body)[0] == 200
    filler = mount.fill()
    try:
        forwarded = len(upstream.seen)
        conn = http.client.HTTPConnection(proxy.url.removeprefix("http://").split(":")[0],
                                          int(proxy.url.rsplit(":", 1)[1]), timeout=30)
        got = b""
        with pytest.raises((http.client.HTTPException, ConnectionError)) as broken:
            conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            got = resp.read()
        conn.close()
        assert len(upstream.seen) == forwarded + 1  # it was forwarded; its row could not be stored
        partial = getattr(broken.value, "partial", got)
        assert done not in partial  # the held end was never sent: the stream's [DONE], the body's last bytes
        if not stream:
            assert partial == b""
        status, _, refused = request(proxy.url, body=body)
        assert status == 503 and json.loads(refused)["error"]["code"] == "ledger_unavailable"
        assert len(upstream.seen) == forwarded + 1  # nothing forwarded that could not be recorded
    finally:
        filler.unlink()
    wait_for(lambda: request(proxy.url, body=body)[0] == 200)  # the retry found room: calls are taken again
    wait_for(lambda: len(db_operations(db)) >= 2)


def test_a_locked_database_holds_up_one_batch_not_every_one(
        upstream: FakeUpstream, start_proxy: Callable[..., ProxyServer]) -> None:
    busy = 4.0
    proxy = start_proxy(ledger_busy_timeout=busy)
    db = proxy.settings.db
    upstream.json({"model": "gpt-4o", "usage": USAGE})
    assert call(proxy, 0)[0] == 200
    lock = Lock(db)
    try:
        assert call(proxy, 1)[0] == 200  # waits out the busy timeout once, then goes to the spool
        started = time.monotonic()
        for n in range(2, 6):
            assert call(proxy, n)[0] == 200
        # Four calls; before, each waited the whole busy timeout for an inline replay (16 s).
        assert time.monotonic() - started < busy
    finally:
        lock.release()
    # Replayed in the background: no further call is needed to bring the rows in.
    wait_for(lambda: db_operations(db) == [f"op-{n}" for n in range(6)])


def test_database_deleted_while_calls_run_loses_no_completed_call(
        upstream: FakeUpstream, start_proxy: Callable[..., ProxyServer]) -> None:
    proxy = start_proxy()
    db = proxy.settings.db
    upstream.json({"model": "gpt-4o", "usage": USAGE})
    assert call(proxy, 0)[0] == 200  # warmed up
    for attempt in range(3):
        deleted, stop = threading.Event(), threading.Event()
        before: list[str] = []
        after: list[str] = []  # calls that started once the files were gone, and completed

        def worker(w: int) -> None:
            n = 0
            while not stop.is_set():
                op, n = f"a{attempt}-w{w}-{n}", n + 1
                began_after = deleted.is_set()
                status, _, _ = request(proxy.url, body=b'{"model":"gpt-4o"}', headers={"X-Meter-Operation": op})
                if status == 200:
                    (after if began_after else before).append(op)

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: len(before) >= 20)
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(db + suffix):
                    os.unlink(db + suffix)
            deleted.set()
            wait_for(lambda: len(after) >= 20)
        finally:
            stop.set()
            for t in threads:
                t.join()
        missing = set(after) - set(db_operations(db))
        assert not missing, f"attempt {attempt}: {len(missing)} completed call(s) have no row"


async def test_database_deleted_during_a_commit_keeps_the_row(tmp_path: Path) -> None:
    # The deletion lands inside the transaction (from a hook that runs in it): deterministically the moment
    # between the writer's "file replaced?" check and its commit, which a deletion under load hits now and then.
    path = tmp_path / "ledger.db"
    ledger = Ledger(path, spool_path=tmp_path / "spool.jsonl")
    await ledger.open()
    armed = False

    def delete_midway(conn: sqlite3.Connection, rows: list[Any]) -> None:
        nonlocal armed
        if armed:
            armed = False
            for suffix in ("", "-wal", "-shm"):
                os.unlink(f"{path}{suffix}")

    ledger.db.after_insert.append(delete_midway)
    try:
        await ledger.record(CallRecord(request_id="a", started_at=1.0, method="POST", endpoint="/v1/x"))
        armed = True
        await ledger.record(CallRecord(request_id="b", started_at=2.0, method="POST", endpoint="/v1/x"))
        await ledger.record(CallRecord(request_id="c", started_at=3.0, method="POST", endpoint="/v1/x"))
    finally:
        await ledger.close()
    conn = sqlite3.connect(path)
    try:
        # "a" went with the file deleted; "b" was committed as it was deleted: it must be in the new one.
        assert [r[0] for r in conn.execute("SELECT request_id FROM calls ORDER BY id")] == ["b", "c"]
    finally:
        conn.close()
