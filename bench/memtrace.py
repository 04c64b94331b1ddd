"""Where a benchmarked server's memory goes: run it under tracemalloc, snapshot on SIGUSR1, diff snapshots.

`python -m bench.memtrace --dir D [--frames N] -- MODULE ARG...` runs `python -m MODULE ARG...` in this
process with tracemalloc on. Each SIGUSR1 (sent with `request()`) collects garbage, then writes snapshot k
to D/snap-k.tm and, atomically after it, D/snap-k.json: live Python objects by type, gc counts and traced
memory. `diff()` compares two of them: the source lines whose allocations grew most, and the object
types whose counts grew. Tracing slows the server several times: use it in a separate, short run, never
for the measured figures. It must never change what the traced server does.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import runpy
import signal
import sys
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

_IGNORED = ("<frozen importlib._bootstrap>", "<frozen importlib._bootstrap_external>", tracemalloc.__file__,
            "<unknown>")


def _dump(directory: Path, index: int) -> None:
    gc.collect()  # what survives a full collection is what the process really holds
    tracemalloc.take_snapshot().dump(str(directory / f"snap-{index}.tm"))
    types = Counter(type(o).__qualname__ for o in gc.get_objects())
    current, peak = tracemalloc.get_traced_memory()
    info = {"objects": sum(types.values()), "types": dict(types.most_common(200)), "gc_count": gc.get_count(),
            "gc_stats": gc.get_stats(), "traced_mb": round(current / 2**20, 2),
            "traced_peak_mb": round(peak / 2**20, 2)}
    tmp = directory / f"snap-{index}.json.tmp"
    tmp.write_text(json.dumps(info))
    tmp.rename(directory / f"snap-{index}.json")


def request(pid: int, directory: Path, index: int, timeout: float = 120.0) -> dict[str, Any]:
    """Ask the traced process `pid` (one this run started) for snapshot `index`; wait for it and return its info."""
    os.kill(pid, signal.SIGUSR1)
    target = directory / f"snap-{index}.json"
    deadline = time.monotonic() + timeout
    while not target.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no snapshot {index} from pid {pid} in {timeout:.0f}s")
        time.sleep(0.1)
    return json.loads(target.read_text())


def diff(directory: Path, before: int, after: int, top: int = 15) -> dict[str, Any]:
    """What grew between two snapshots: source lines by bytes (with their stacks) and object types by count."""
    filters = [tracemalloc.Filter(False, name) for name in _IGNORED]
    old = tracemalloc.Snapshot.load(str(directory / f"snap-{before}.tm")).filter_traces(filters)
    new = tracemalloc.Snapshot.load(str(directory / f"snap-{after}.tm")).filter_traces(filters)
    lines = [{"where": str(s.traceback[0]), "size_diff_kb": round(s.size_diff / 1024, 1),
              "count_diff": s.count_diff, "size_kb": round(s.size / 1024, 1)}
             for s in new.compare_to(old, "lineno")[:top]]
    stacks = [{"size_diff_kb": round(s.size_diff / 1024, 1), "count_diff": s.count_diff,
               "stack": [str(f) for f in s.traceback[-8:]]}
              for s in new.compare_to(old, "traceback")[:5]]
    info_old = json.loads((directory / f"snap-{before}.json").read_text())
    info_new = json.loads((directory / f"snap-{after}.json").read_text())
    grown = Counter(info_new["types"])
    grown.subtract(info_old["types"])
    return {"traced_mb": [info_old["traced_mb"], info_new["traced_mb"]],
            "objects": [info_old["objects"], info_new["objects"]],
            "total_size_diff_kb": round(sum(s.size_diff for s in new.compare_to(old, "filename")) / 1024, 1),
            "lines": lines, "stacks": stacks,
            "types_grown": [[t, n] for t, n in grown.most_common(12) if n > 0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", required=True, help="where snapshots are written")
    # Each frame kept costs time on every allocation: here 25 frames made meterproxy ~35x slower, 4 ~9x.
    p.add_argument("--frames", type=int, default=4, help="stack frames kept per allocation")
    p.add_argument("module")
    p.add_argument("args", nargs=argparse.REMAINDER)
    a = p.parse_args()
    directory = Path(a.dir)
    directory.mkdir(parents=True, exist_ok=True)
    taken = [0]

    def on_signal(signum: int, frame: object) -> None:
        _dump(directory, taken[0])
        taken[0] += 1

    tracemalloc.start(a.frames)
    signal.signal(signal.SIGUSR1, on_signal)
    sys.argv = [a.module, *a.args]
    runpy.run_module(a.module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
