"""The README's shell examples, run as written against a real `meterproxy serve` and the fake upstream.

Every ```sh block of README.md runs in bash (`set -e`), in a fresh directory where the proxy keeps its
ledger at ./meterproxy.db, with `meterproxy` on PATH. The only changes made to a block: `localhost:8080` is the
test proxy's port, `<key_id>` is a managed key made for the purpose, and curl fails on an HTTP error (`-f`),
so an example that answers 4xx fails here. The proxy runs `keys: managed` (the README's managed examples need
it); `OPENAI_API_KEY` in a block's environment is a managed key, so client examples are admitted.

A block that cannot run here must be listed in SKIPPED with the reason; a new block is run by default, so
one that cannot run fails this test loudly instead of being ignored.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from tests.support import FakeUpstream, Reply

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TOKEN = "change-me"  # the README's own value

# First line of a block -> why it is not run here.
SKIPPED = {
    "docker build -t meterproxy .": "needs Docker and the network to build the image",
}


def sh_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, body) of every ```sh block."""
    blocks, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() in ("```sh", "```bash", "```shell"):
            start, body = i + 1, []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            blocks.append((start + 1, "\n".join(body)))
        i += 1
    return blocks


def _first_line(body: str) -> str:
    return next((line.strip() for line in body.splitlines() if line.strip()), "")


BLOCKS = sh_blocks(README.read_text(encoding="utf-8"))
RUNNABLE = [(line, body) for line, body in BLOCKS if _first_line(body) not in SKIPPED]


def test_every_skipped_block_is_still_in_the_readme() -> None:
    firsts = {_first_line(body) for _, body in BLOCKS}
    assert set(SKIPPED) <= firsts, f"SKIPPED names blocks the README no longer has: {set(SKIPPED) - firsts}"
    assert len(RUNNABLE) >= 5  # the parser found the blocks at all


def _answer(body: bytes) -> Reply:
    usage = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
    data = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-mini",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                    "finish_reason": "stop"}], "usage": usage}).encode()
    return Reply(headers={"Content-Type": "application/json"}, chunks=[data], content_length=True)


class Served:
    def __init__(self, folder: Path, port: int, env: dict[str, str]) -> None:
        self.folder, self.port, self.env = folder, port, env

    def admin(self, method: str, path: str, body: dict[str, object] | None = None) -> dict[str, object]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.load(resp)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from tests.test_cli import free_port

    upstream = FakeUpstream()
    upstream.handler = _answer
    upstream.server.start()
    folder = tmp_path_factory.mktemp("readme")
    port = free_port()
    (folder / "proxy.yaml").write_text(f"keys: managed\nupstream: {upstream.url}\nport: {port}\n"
                                       "db: ./meterproxy.db\n")
    env = {**os.environ, "METERPROXY_ADMIN_TOKEN": TOKEN, "OPENAI_API_KEY": "sk-upstream-for-readme-tests",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", "proxy.yaml"], cwd=folder,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                    break
            except OSError:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "the proxy did not become ready"
                time.sleep(0.1)
        yield Served(folder, port, env)
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
        upstream.server.stop()


def _prepared(body: str, port: int, key_id: str) -> str:
    body = body.replace("localhost:8080", f"127.0.0.1:{port}").replace("<key_id>", key_id)
    return re.sub(r"\bcurl ", "curl -fS ", body)


@pytest.mark.parametrize(("line", "body"), RUNNABLE, ids=[f"README.md:{line}" for line, _ in RUNNABLE])
def test_readme_shell_block_runs(served: Served, line: int, body: str) -> None:
    client = served.admin("POST", "/admin/keys", {"user": "readme-client"})
    target = served.admin("POST", "/admin/keys", {"user": "readme-target"})
    env = {**served.env, "OPENAI_API_KEY": str(client["key"])}
    script = "set -e\n" + _prepared(body, served.port, str(target["key_id"]))
    result = subprocess.run(["bash", "-c", script], cwd=served.folder, env=env, capture_output=True, text=True,
                            timeout=120)
    where = f"README.md block at line {line}"
    assert result.returncode == 0, f"{where} failed ({result.returncode}):\n{script}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, f"{where}:\n{result.stderr}"
