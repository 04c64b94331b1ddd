"""Processes of a benchmark run: free loopback ports, start/await/stop servers, sample RSS, count ledger rows.

Every server is started here as a child process on 127.0.0.1 and stopped by its own handle (SIGTERM, then
SIGKILL after a grace period): this module must never stop a process it did not start, and never leave one
running when the run ends.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@dataclass
class Service:
    """A server the run started: its name, base URL, process, and where its output goes."""

    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, grace: float = 10.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def pinned(cpus: set[int] | None) -> Callable[[], None] | None:
    """A preexec_fn that pins the child (and every thread it will start) to `cpus`; None: no pinning."""
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def start(name: str, argv: list[str], url: str, *, logdir: Path, env: dict[str, str] | None = None,
          cwd: str | None = None, ready_timeout: float = 30.0, cpus: set[int] | None = None) -> Service:
    """Start `argv`, wait until GET {url}/healthz answers 200, and return it; raise if it never does."""
    log = logdir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                preexec_fn=pinned(cpus))
    service = Service(name, url, proc, log)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=1) as resp:
                if resp.status == 200:
                    return service
        except OSError:
            time.sleep(0.05)
    service.stop()
    raise RuntimeError(f"{name} did not become ready in {ready_timeout:.0f}s: {log.read_text()[-2000:]}")


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process in MB (VmRSS), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def open_fds(pid: int) -> int | None:
    """Open file descriptors of a process (entries of /proc/<pid>/fd), or None once it is gone."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def cpu_seconds(pid: int, tid: int | None = None) -> float | None:
    """User + system CPU seconds a process (or one of its threads: tid == pid is the main one) has used."""
    stat = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        fields = Path(stat).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and every live process below it (`serve --workers N`: the workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0.0, [pid]
    while todo:
        one = todo.pop()
        total += cpu_seconds(one) or 0.0
        todo.extend(children.get(one, []))
    return total


def named_cpu_seconds(name: str) -> dict[str, float]:
    """CPU seconds of every live process whose command name is `name` (e.g. the PostgreSQL server's,
    `postgres`), by its command line (a backend's names its database: `postgres: 15/main: postgres
    <db> 127.0.0.1(…) idle`, the port cut off), so a run can say what the database cost beside the proxy."""
    out: dict[str, float] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                if stat[stat.find("(") + 1:stat.rfind(")")] != name:
                    continue
                line = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            label = " ".join(line.split()[:6]).split("(")[0] + f" [{entry}]"
            out[label] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


@dataclass
class RssSampler:
    """Samples VmRSS of some processes every `interval` seconds in a thread; keeps each one's peak."""

    pids: dict[str, int]
    interval: float = 0.05
    peaks: dict[str, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            for name, pid in self.pids.items():
                value = rss_mb(pid)
                if value is not None and value > self.peaks.get(name, 0.0):
                    self.peaks[name] = value
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def count_rows(db: Path) -> int | None:
    """Rows in the ledger's `calls` table (read-only; WAL lets this run beside the writer)."""
    if not db.exists():
        return None
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return int(conn.execute("SELECT count(*) FROM calls").fetchone()[0])
    except sqlite3.Error:
        return None
    finally:
        conn.close()
