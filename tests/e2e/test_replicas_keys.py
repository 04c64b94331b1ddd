"""Managed keys across replicas: two real proxies on one PostgreSQL database, the openai SDK as the client.

A key created through the admin API of one replica works on the other; revoked there (or with the
`meterproxy keys` CLI on the database URL), the other refuses it within a second — told by PostgreSQL's
LISTEN/NOTIFY, measured here (the delays are printed; run with -s to see them).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import openai
import pytest

from tests.support import ADMIN_TOKEN, FakeUpstream, ProxyServer, proxy_settings
from tests.support.cli import cli
from tests.support.http import request

USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}


def admin(proxy: ProxyServer, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    status, _, raw = request(proxy.url, method=method, path="/admin" + path,
                             body=None if body is None else json.dumps(body).encode(),
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    return status, json.loads(raw)


@pytest.fixture
def replicas(pg_url: str, tmp_path: Path, upstream: FakeUpstream) -> Iterator[list[ProxyServer]]:
    started: list[ProxyServer] = []
    try:
        for name in ("a", "b"):
            settings = proxy_settings(tmp_path, upstream.url, db=pg_url, keys="managed",
                                      upstream_api_key="sk-real-upstream",
                                      spool=str(tmp_path / f"{name}.spool.jsonl"))
            proxy = ProxyServer(settings)
            proxy.server.start()
            started.append(proxy)
        yield started
    finally:
        for proxy in started:
            proxy.server.stop()


def _chat(client: openai.OpenAI) -> Any:
    return client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=5)


def _refused_within(client: openai.OpenAI, since: float, timeout: float = 5.0) -> float:
    """Call until the key is refused (401); the seconds from `since` to the first refusal."""
    while True:
        try:
            _chat(client)
        except openai.AuthenticationError as exc:
            assert exc.code == "invalid_api_key" and "revoked" in str(exc)
            return time.monotonic() - since
        assert time.monotonic() - since < timeout, "the revoke never reached the other replica"


def test_a_key_made_on_one_replica_works_on_the_other_and_a_revoke_reaches_it(
        replicas: list[ProxyServer], upstream: FakeUpstream, sdk_client: Callable[..., openai.OpenAI]) -> None:
    a, b = replicas
    upstream.json({"id": "x", "object": "chat.completion", "model": "gpt-4o", "choices": [], "usage": USAGE})
    status, created = admin(a, "POST", "/keys", {"user": "alice", "team": "ml"})
    assert status == 201, created
    on_b = sdk_client(b, created["key"])
    _chat(on_b)  # b has never seen this key: read from the database, then cached
    _chat(on_b)
    assert upstream.seen[-1].headers["Authorization"] == "Bearer sk-real-upstream"

    status, _ = admin(a, "DELETE", f"/keys/{created['key_id']}")
    assert status == 200
    delay = _refused_within(on_b, time.monotonic())
    print(f"\nrevoke via the admin API of replica A refused by replica B after {delay * 1000:.0f} ms")
    assert delay < 1.0


def test_the_keys_cli_on_the_database_url_reaches_every_replica(
        replicas: list[ProxyServer], upstream: FakeUpstream, pg_url: str, capsys: pytest.CaptureFixture[str],
        sdk_client: Callable[..., openai.OpenAI]) -> None:
    a, b = replicas
    upstream.json({"id": "x", "object": "chat.completion", "model": "gpt-4o", "choices": [], "usage": USAGE})
    assert cli("keys", "create", "--db", pg_url, "--user", "bob", "--format", "json") == 0
    created = json.loads(capsys.readouterr().out)
    clients = [sdk_client(proxy, created["key"]) for proxy in (a, b)]
    for client in clients:
        _chat(client)  # cached on both replicas
    since = time.monotonic()
    assert cli("keys", "revoke", created["key_id"], "--db", pg_url) == 0
    delays = [_refused_within(client, since) for client in clients]
    print(f"\nrevoke via the CLI refused by replicas A and B after {delays[0] * 1000:.0f} ms and "
          f"{delays[1] * 1000:.0f} ms")
    assert max(delays) < 1.0
    rows = a.rows()
    assert [r["status"] for r in rows if r["key_id"] == created["key_id"]].count(200) == 2


@pytest.fixture
def sdk_client() -> Iterator[Callable[..., openai.OpenAI]]:
    made: list[openai.OpenAI] = []

    def make(proxy: ProxyServer, key: str) -> openai.OpenAI:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()
