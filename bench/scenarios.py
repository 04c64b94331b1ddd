"""The scenarios, and how one scenario is run against one target while its process is watched.

A target is a base URL (direct, bare pass-through, meterproxy, or one given on the command line) and,
when this run started it, its process and ledger. Running a scenario measures the load (wrk or loadgen,
always in another process) and, around it, the target's peak RSS, CPU time, and ledger rows committed.
Nothing here may send load anywhere but the loopback URLs it is given.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import loadgen, payloads, procs, wrk


@dataclass(frozen=True)
class Scenario:
    name: str
    what: str  # one line for the table's legend
    concurrency: int
    duration: float  # seconds of measured load (an upper bound for count-bounded scenarios)
    requests: int  # upper bound on measured requests
    body: bytes
    stream: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    ramp: float = 0.0
    use_wrk: bool = True  # JSON only: wrk cannot time first bytes


@dataclass
class Target:
    name: str
    url: str
    pid: int | None = None
    db: Path | None = None


def build(*, quick: bool, json_seconds: float, stream_interval_ms: float, stream_chunks: int,
          streams: int, long_prompt_words: int) -> list[Scenario]:
    small = payloads.chat_request(stream=False)
    seconds = json_seconds if json_seconds > 0 else (1.0 if quick else 2.0)
    chunk_headers = {payloads.CHUNKS_HEADER: str(stream_chunks)}
    paced = {**chunk_headers, payloads.INTERVAL_HEADER: f"{stream_interval_ms:g}"}
    c1_requests = 150 if quick else 400
    return [
        Scenario("json-c1", "chat JSON with usage, 1 connection", 1, seconds, 10**7, small),
        Scenario("json-c32", "chat JSON with usage, 32 connections", 32, seconds, 10**7, small),
        Scenario("json-c256", "chat JSON with usage, 256 connections", 256, seconds, 10**7, small),
        # Starts spread over half a stream's length: arrivals are steady, and all are open at once after.
        Scenario(f"stream-c{streams}",
                 f"{streams} concurrent SSE streams of {stream_chunks} chunks every {stream_interval_ms:g} ms, "
                 "usage chunk + [DONE]", streams, 60.0, streams,
                 payloads.chat_request(stream=True, include_usage=True), stream=True, headers=paced,
                 ramp=min(5.0, stream_chunks * stream_interval_ms / 2000), use_wrk=False),
        Scenario("stream-nousage-c1", f"SSE stream of {stream_chunks} chunks, no usage, short prompt, 1 connection",
                 1, seconds * 2, c1_requests, payloads.chat_request(stream=True), stream=True,
                 headers=chunk_headers, use_wrk=False),
        Scenario("longprompt-nousage-c1",
                 f"SSE stream of {stream_chunks} chunks, no usage, {long_prompt_words}-token prompt, 1 connection",
                 1, seconds * 2, c1_requests, payloads.chat_request(stream=True, prompt_words=long_prompt_words),
                 stream=True, headers=chunk_headers, use_wrk=False),
    ]


class _Marks:
    """CPU seconds and ledger rows of the watched processes, taken when the measured phase starts."""

    def __init__(self, pids: dict[str, int], db: Path | None) -> None:
        self.pids, self.db = pids, db
        self.cpu: dict[str, float | None] = {}
        self.rows: int | None = None

    def cpu_now(self) -> dict[str, float | None]:
        cpu = {name: procs.cpu_seconds(pid) for name, pid in self.pids.items()}
        if "target" in self.pids:  # the event loop's own thread: what one process cannot spread
            cpu["target_loop"] = procs.cpu_seconds(self.pids["target"], self.pids["target"])
        return cpu

    def take(self) -> None:
        self.cpu = self.cpu_now()
        self.rows = procs.count_rows(self.db) if self.db else None


def _loadgen(sc: Scenario, url: str, workdir: Path, marks: _Marks, cpus: set[int] | None) -> dict[str, object]:
    body_file = workdir / f"{sc.name}.body"
    body_file.write_bytes(sc.body)
    warm_file = workdir / "warm.body"
    warm_file.write_bytes(payloads.chat_request(stream=False))
    argv = [sys.executable, "-m", "bench.loadgen", "--url", url, "--body-file", str(body_file),
            "--warmup-body-file", str(warm_file), "--concurrency", str(sc.concurrency),
            "--requests", str(sc.requests), "--duration", str(sc.duration), "--ramp", str(sc.ramp),
            "--warmup", "1"]
    for name, value in sc.headers.items():
        argv += ["--header", f"{name}:{value}"]
    if sc.stream:
        argv.append("--stream")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parent.parent, preexec_fn=procs.pinned(cpus))
    assert proc.stderr is not None
    # The client says when its warm-up is over; CPU and rows are counted from there.
    early: list[str] = []
    for line in proc.stderr:
        if line.strip() == loadgen.MEASURE_MARK:
            break
        early.append(line)
    marks.take()
    try:
        out, err = proc.communicate(timeout=sc.duration + sc.ramp + 180)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError(f"loadgen did not finish: {url}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen failed ({proc.returncode}): {(''.join(early) + err)[-2000:]}")
    return json.loads(out)


def _load(sc: Scenario, url: str, workdir: Path, have_wrk: bool, marks: _Marks,
          warm: bool, cpus: set[int] | None) -> dict[str, object]:
    if not (sc.use_wrk and have_wrk):
        return _loadgen(sc, url, workdir, marks, cpus)
    script = wrk.write_script(workdir / f"{sc.name}.lua", sc.body, payloads.request_headers(sc.headers))
    if warm:  # one unmeasured second fills the proxy's upstream pool and caches at this concurrency
        wrk.run(url, script, concurrency=sc.concurrency, duration=1, cpus=cpus)
    marks.take()
    return wrk.run(url, script, concurrency=sc.concurrency, duration=sc.duration, cpus=cpus)


def run(sc: Scenario, target: Target, *, upstream_pid: int, workdir: Path, have_wrk: bool,
        warm: bool = True, load_cpus: set[int] | None = None) -> dict[str, object]:
    """Measure one scenario against one target; returns the load's figures plus the process's."""
    url = target.url.rstrip("/") + payloads.CHAT_PATH
    pids = {"upstream": upstream_pid}
    if target.pid is not None:
        pids["target"] = target.pid
    marks = _Marks(pids, target.db)
    with procs.RssSampler(pids) as sampler:
        result = _load(sc, url, workdir, have_wrk, marks, warm, load_cpus)
    result["stream"] = sc.stream
    ok = int(result["ok"]) or 1  # type: ignore[call-overload]
    for name, after in marks.cpu_now().items():
        before = marks.cpu.get(name)
        if before is not None and after is not None:
            result[f"{name}_cpu_us_per_req"] = round((after - before) / ok * 1e6, 1)
    result["rss_peak_mb"] = round(sampler.peaks["target"], 1) if "target" in sampler.peaks else None
    result["upstream_rss_peak_mb"] = round(sampler.peaks.get("upstream", 0.0), 1)
    if target.db is not None and marks.rows is not None:
        time.sleep(0.3)  # rows of requests cut off at the end commit a moment later
        rows_after = procs.count_rows(target.db)
        if rows_after is not None:
            result["ledger_rows"] = rows_after - marks.rows
            wall = float(result["wall_s"]) or 1e-9  # type: ignore[arg-type]
            result["ledger_rows_per_s"] = round((rows_after - marks.rows) / wall, 1)
    return result
