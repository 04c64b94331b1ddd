"""Profiles of meterproxy under load: py-spy attached to its process, and a summary of where time goes.

py-spy samples the proxy's process from outside (no change to its code) and writes collapsed stacks
(`--format raw`, one line per stack; speedscope.app and flamegraph.pl read them). The summary splits the
event-loop thread from the helper threads (SQLite writer, executor), drops helper-thread samples that are
only waiting on a queue (py-spy counts those as busy), and for the loop thread gives: the innermost proxy/
function each sample was under (so json.loads called by a meter is charged to that meter's function), the
functions where samples landed (self), the library areas, and the proxy/ functions on the stack. With the
loop thread's CPU time per request, each share also reads as microseconds per request.
This module must never attach to a process the run did not start.
"""

from __future__ import annotations

import linecache
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
_WAIT = re.compile(r"\.(get|acquire|wait)\(")  # a helper thread parked on its queue or lock
OUTSIDE = "(outside proxy code: event loop, aiohttp server/client, transports)"
_ENTRY = ("proxy/cli.py", "proxy/__main__.py")
_AREAS = (("proxy/", "proxy"), ("aiohttp/", "aiohttp"), ("asyncio/", "asyncio"), ("selectors", "asyncio"),
          ("json/", "json"), ("multidict/", "multidict/yarl"), ("yarl/", "multidict/yarl"),
          ("aiosqlite/", "aiosqlite"), ("sqlite3/", "aiosqlite"), ("uuid", "uuid"), ("hashlib", "hashlib"),
          ("decimal", "decimal"))


def py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


class Recorder:
    """py-spy record attached to `pid` until stop(); the raw collapsed stacks land in `out`."""

    def __init__(self, pid: int, out: Path, rate: int = 250) -> None:
        exe = py_spy()
        if exe is None:
            raise RuntimeError("py-spy is not installed (pip install py-spy)")
        self.out = out
        self._log = out.with_suffix(".log")
        with self._log.open("wb") as log:
            self._proc = subprocess.Popen([exe, "record", "--pid", str(pid), "--rate", str(rate),
                                           "--format", "raw", "--threads", "--output", str(out)],
                                          stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> Path:
        self._proc.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
        try:
            self._proc.wait(60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if not self.out.exists():
            raise RuntimeError(f"py-spy wrote nothing: {self._log.read_text()[-1000:]}")
        return self.out


def _source_line(file: str, line: str | None) -> str:
    if not line:
        return ""
    for base in sys.path:
        text = linecache.getline(str(Path(base) / file), int(line)) if base else ""
        if text:
            return text
    return ""


def _frame(text: str) -> tuple[str, str, str, str | None]:
    """(function, short file for display, file as py-spy printed it, line)."""
    m = _FRAME.match(text)
    if not m:
        return text, "", "", None
    path = m.group("file").replace("\\", "/")
    # Our own files keep their whole path (proxy/counting/output.py); libraries their last two parts.
    short = path if path.startswith(("proxy/", "bench/")) else "/".join(path.split("/")[-2:])
    return m.group("func"), short, path, m.group("line")


def _area(file: str) -> str:
    return next((name for prefix, name in _AREAS if file.startswith(prefix) or prefix in file), "other")


def summarise(raw: Path, top: int = 15) -> dict[str, object]:
    """Shares (% of busy samples) from a py-spy raw file; see the module docstring."""
    threads: Counter[str] = Counter()
    helper_self: Counter[str] = Counter()
    owner: Counter[str] = Counter()
    modules: Counter[str] = Counter()
    self_: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    waiting = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        head, *frames = stack.split(";")
        thread = head.split(": ", 1)[-1]
        parsed = [_frame(f) for f in frames]
        if not parsed:
            continue
        func, file, path, lineno = parsed[-1]
        leaf = f"{func} ({file})"
        if thread != "MainThread":
            if _WAIT.search(_source_line(path, lineno)):
                waiting += count
                continue
            threads[thread.split(" (")[0] if thread.startswith("Thread-") else thread] += count
            helper_self[f"{thread.split(' ')[0]}: {leaf}"] += count
            continue
        threads["MainThread (event loop)"] += count
        self_[leaf] += count
        areas[_area(file)] += count
        ours = [(fn, fl) for fn, fl, _, _ in parsed if fl.startswith("proxy/") and fl not in _ENTRY]
        proxy = [f"{fn} ({fl})" for fn, fl in ours]
        owner[proxy[-1] if proxy else OUTSIDE] += count
        modules[ours[-1][1] if ours else OUTSIDE] += count
        for name in set(proxy):
            inclusive[name] += count
    main = threads["MainThread (event loop)"]
    busy = sum(threads.values())

    def share(counter: Counter[str], base: int) -> list[tuple[str, float]]:
        return [(name, round(100 * n / base, 1)) for name, n in counter.most_common(top)] if base else []

    return {"busy_samples": busy, "main_samples": main, "helper_wait_samples_dropped": waiting,
            "threads": share(threads, busy), "helper_self": share(helper_self, busy),
            "main_by_proxy_module": share(modules, main), "main_by_proxy_function": share(owner, main), "main_self": share(self_, main),
            "main_areas": share(areas, main), "main_inclusive": share(inclusive, main)}


def _loop_self(raw: Path) -> tuple[Counter[str], Counter[str], int]:
    """Loop-thread samples by leaf function and by library area, and their total."""
    by_func: Counter[str] = Counter()
    by_area: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        head, *frames = stack.split(";")
        if not frames or not count_text.isdigit() or head.split(": ", 1)[-1] != "MainThread":
            continue
        func, file, _, _ = _frame(frames[-1])
        by_func[f"{func} ({file})"] += int(count_text)
        by_area[_area(file)] += int(count_text)
    return by_func, by_area, sum(by_func.values())


def compare(raw: Path, us_per_req: float, base_raw: Path, base_us_per_req: float,
            top: int = 15) -> dict[str, list[tuple[str, float, float, float]]]:
    """Loop-thread µs per request, this profile against a baseline's (meterproxy vs bare), by library area
    and by function where the sample landed: (name, this, baseline, difference), largest difference first."""
    out: dict[str, list[tuple[str, float, float, float]]] = {}
    (fa, aa, na), (fb, ab, nb) = _loop_self(raw), _loop_self(base_raw)
    if not na or not nb:
        return out
    for key, a, b in (("areas", aa, ab), ("functions", fa, fb)):
        rows = []
        for name in set(a) | set(b):
            x, y = a[name] / na * us_per_req, b[name] / nb * base_us_per_req
            rows.append((name, round(x, 1), round(y, 1), round(x - y, 1)))
        rows.sort(key=lambda r: -r[3])
        out[key] = rows if key == "areas" else rows[:top]
    return out


def render_compare(name: str, diff: dict[str, list[tuple[str, float, float, float]]]) -> str:
    lines = [f"### {name}: loop-thread µs per request, meterproxy vs bare pass-through (where samples landed)"]
    for key in ("areas", "functions"):
        lines.append(f"by {'library' if key == 'areas' else 'function (largest extra cost first)'}:")
        lines += [f"  {d:+7.1f}  ({a:7.1f} vs {b:7.1f})  {n}" for n, a, b, d in diff.get(key, [])]
    return "\n".join(lines)


def render(name: str, summary: dict[str, object], main_us_per_req: float | None = None) -> str:
    unit = f"; loop thread {main_us_per_req:.0f} µs CPU per request" if main_us_per_req else ""
    lines = [f"### profile: {name} ({summary['busy_samples']} busy samples{unit})",
             "threads (% of busy samples of all threads):"]
    lines += [f"  {p:5.1f}%  {n}" for n, p in summary["threads"]]  # type: ignore[attr-defined]
    lines += ["helper threads, where their samples landed (% of all busy samples):"]
    lines += [f"  {p:5.1f}%  {n}" for n, p in summary["helper_self"][:5]]  # type: ignore[index]
    for key, title in (("main_areas", "loop thread by library (self)"),
                       ("main_by_proxy_module", "loop thread by innermost proxy/ module"),
                       ("main_by_proxy_function", "loop thread by innermost proxy/ function"),
                       ("main_self", "loop thread, self (where the sample landed)"),
                       ("main_inclusive", "loop thread, proxy/ functions inclusive (on the stack)")):
        lines.append(f"{title} (% of loop-thread samples{', ~µs/req' if main_us_per_req else ''}):")
        for fn, p in summary[key]:  # type: ignore[attr-defined]
            us = f" {p * main_us_per_req / 100:6.0f}" if main_us_per_req else ""
            lines.append(f"  {p:5.1f}%{us}  {fn}")
    return "\n".join(lines)
