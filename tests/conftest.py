from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.support import FakeUpstream, ProxyServer, Reply, proxy_settings, split
from tests.support.paths import CAPTURES, SHARED  # noqa: F401  (re-exported: older imports name conftest)
from tests.support.pg import ledger_target, pg_database, pg_url  # noqa: F401  (fixtures for every test)
from tests.support.streams import openai_like


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream()
    fake.server.start()
    yield fake
    fake.server.stop()


@pytest.fixture
def start_proxy(tmp_path: Path, upstream: FakeUpstream) -> Iterator[Callable[..., ProxyServer]]:
    started: list[ProxyServer] = []

    def start(**overrides: Any) -> ProxyServer:
        settings = proxy_settings(tmp_path, overrides.pop("upstream", upstream.url), **overrides)
        proxy = ProxyServer(settings)
        proxy.server.start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.server.stop()


@pytest.fixture
def proxy(start_proxy: Callable[..., ProxyServer]) -> ProxyServer:
    return start_proxy()


# The upstream answers as OpenAI does (tests/e2e/test_inject.py, test_bounds.py): usage only when asked.
@pytest.fixture
def openai_upstream(upstream: FakeUpstream) -> FakeUpstream:
    upstream.handler = lambda body: Reply(headers={"Content-Type": "text/event-stream"},
                                          chunks=split(openai_like(body), 7))
    return upstream
