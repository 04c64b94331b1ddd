"""Several real meterproxy processes on one PostgreSQL ledger: start N, wait until healthy, kill -9 one, stop all.

`Replica` is one `meterproxy serve` process (its own port, its own spool file, the shared `--db` URL);
`ReplicaSet` starts N of them against one upstream (a `FakeUpstream`) and stops every one it started, also
when the test fails (use it as a context manager, or through the `replicas` fixture below). Each process
gets SIGTERM when the test process dies (PR_SET_PDEATHSIG), so none outlives a killed test run either.
`Replica(..., workers=N)` is `meterproxy serve --workers N`: one parent, N workers on one port.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Callable

import pytest

from proxy.cli.serving import die_with_parent
from tests.support import ADMIN_TOKEN
from tests.support.cli import free_port
from tests.support.paths import ROOT

HEARTBEAT = 0.5  # seconds: a killed replica shows as not alive after 1.5 s


def get_json(url: str, path: str, timeout: float = 10) -> tuple[int, Any]:
    req = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def _config(folder: Path, name: str, **settings: Any) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps({"heartbeat_interval": HEARTBEAT, "spool_reserve": 0,
                                "spool": str(folder / f"{name}.spool.jsonl"), **settings}))  # JSON is YAML
    return path


class Replica:
    """One `meterproxy serve` process."""

    def __init__(self, folder: Path, name: str, db: str, upstream: str, *extra: str,
                 port: int | None = None, workers: int = 1, settings: dict[str, Any] | None = None) -> None:
        self.name = name
        self.port = port or free_port()
        self.log = folder / f"{name}.log"
        config = _config(folder, name, **(settings or {}))
        argv = [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", str(self.port),
                "--db", db, "--upstream", upstream, *extra]
        if workers != 1:
            argv += ["--workers", str(workers)]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(argv, cwd=folder, stdout=log, stderr=subprocess.STDOUT,
                                         preexec_fn=die_with_parent,
                                         env={**os.environ, "PYTHONPATH": str(ROOT),
                                              "METERPROXY_ADMIN_TOKEN": ADMIN_TOKEN})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    def wait_healthy(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.output[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} not healthy after {timeout} s:\n{self.output[-3000:]}")
            time.sleep(0.05)

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then SIGKILL if it has not exited within `timeout`; its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return int(self.proc.returncode)


class ReplicaSet:
    """N replicas of meterproxy on one ledger URL and one upstream."""

    def __init__(self, folder: Path, db: str, upstream: str, count: int, *extra: str,
                 settings: dict[str, Any] | None = None) -> None:
        self.folder, self.db, self.upstream, self.extra = folder, db, upstream, extra
        self.settings = settings
        self.replicas: list[Replica] = []
        self.count = count

    def start(self, timeout: float = 60) -> ReplicaSet:
        try:
            for i in range(self.count):
                self.replicas.append(Replica(self.folder, f"replica-{len(self.replicas) + 1}", self.db,
                                             self.upstream, *self.extra, settings=self.settings))
            for replica in self.replicas:
                replica.wait_healthy(timeout)
        except BaseException:
            self.stop_all()
            raise
        return self

    def __enter__(self) -> ReplicaSet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def __getitem__(self, i: int) -> Replica:
        return self.replicas[i]

    def __iter__(self) -> Iterator[Replica]:
        return iter(self.replicas)

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    def alive(self) -> list[Replica]:
        return [r for r in self.replicas if r.proc.poll() is None]

    def stop_all(self) -> dict[str, int]:
        """SIGTERM to every replica still running (all at once), then wait for each; exit statuses by name."""
        for replica in self.replicas:
            if replica.proc.poll() is None:
                replica.proc.send_signal(signal.SIGTERM)
        return {replica.name: replica.stop() for replica in self.replicas}


@pytest.fixture(name="replicas")
def replicas_fixture(tmp_path: Path) -> Iterator[Callable[..., ReplicaSet]]:
    """`replicas(db_url, upstream_url, n, *extra_flags)`: a started ReplicaSet, stopped at teardown."""
    made: list[ReplicaSet] = []

    def start(db: str, upstream: str, count: int, *extra: str, **settings: Any) -> ReplicaSet:
        group = ReplicaSet(tmp_path, db, upstream, count, *extra, settings=settings)
        made.append(group)
        return group.start()

    try:
        yield start
    finally:
        for group in made:
            group.stop_all()


def pids_in(replicas_answer: Any, alive: bool = True) -> set[int]:
    return {r["pid"] for r in replicas_answer["replicas"] if r["alive"] or not alive}


def wait_for(check: Callable[[], bool], timeout: float = 20, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def spread(urls: Sequence[str], n: int) -> list[str]:
    """`n` base URLs taking turns over `urls`."""
    return [urls[i % len(urls)] for i in range(n)]
