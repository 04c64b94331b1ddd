"""Generated paths and output limits against the admission rules (docs/security.md)."""
from __future__ import annotations

import json
import math
import posixpath
import re
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.counter import CountPolicy
from proxy.gate import Gate, output_limit
from proxy.budgets import Budgets
from proxy.limits import Limits, Subject
from proxy.meters import meter_for
from proxy.pricing import PriceTable
from proxy.ratelimit import RateLimiter
from proxy.routes import METERED_POLICY, canonical_problem
from tests.support import FakeUpstream, ProxyServer
from tests.test_admission import raw_exchange

SEGMENTS = ["v1", "chat", "completions", "embeddings", "responses", "images", "generations", "audio",
            "transcriptions", "files", "models", "Chat", "COMPLETIONS", "%63hat", "%43hat", "chat%2Fcompletions",
            "chat%2fcompletions", "", ".", "..", "%2e", "chat;v=1", "completions;x", "a", "%3A", "ft%3Ax", "%25",
            "%7E", "~", "Embeddings", "embeddings%00", "chat%5Ccompletions", "chat\\completions"]
paths = st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=5).map(lambda s: "/v1/" + "/".join(s))


def normalisations(path: str) -> set[str]:
    """What an upstream, a framework or a CDN in front of it might make of a path."""
    out = {path}
    for _ in range(2):
        for p in list(out):
            out.add(unquote(p))
            out.add(re.sub("/+", "/", p))
            out.add(re.sub(";[^/]*", "", p))
            out.add(p.lower())
            out.add(p.rstrip("/") or "/")
            out.add(p.replace("\\", "/"))
            out.add(posixpath.normpath(p))
    return out


@settings(max_examples=3000, deadline=None)
@given(paths)
def test_a_canonical_path_never_reaches_another_metered_route(raw: str) -> None:
    if canonical_problem(raw) is not None:
        return  # refused with 400, never forwarded
    metered_as = unquote(raw)  # aiohttp's request.path: what the proxy meters and polices
    for reached in normalisations(raw):
        if METERED_POLICY.allows("POST", reached):
            assert reached == metered_as, (raw, reached)
            assert type(meter_for("POST", metered_as)) is type(meter_for("POST", reached))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(paths)
def test_what_is_forwarded_is_metered_as_the_route_it_reaches(start_proxy: Callable[..., ProxyServer],
                                                              upstream: FakeUpstream, raw: str) -> None:
    proxy = getattr(test_what_is_forwarded_is_metered_as_the_route_it_reaches, "proxy", None)
    if proxy is None or proxy.settings.upstream != upstream.url:
        proxy = start_proxy()
        test_what_is_forwarded_is_metered_as_the_route_it_reaches.proxy = proxy  # type: ignore[attr-defined]
    upstream.json({"model": "gpt-4o", "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
                   "data": [], "text": ""})
    before = len(upstream.seen)
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "input": "x"}).encode()
    status, _ = raw_exchange(proxy.url, raw.encode("latin-1"), b"Authorization: Bearer sk-fuzz-0001\r\n", body)
    if len(upstream.seen) == before:
        return
    forwarded = upstream.seen[-1].path_qs
    row = proxy.rows()[-1]
    for reached in normalisations(forwarded):
        if METERED_POLICY.allows("POST", reached):
            assert row["endpoint"] == reached and row["prompt_tokens"] == 10, (raw, forwarded, row["endpoint"])


# --- output limits --------------------------------------------------------------------------------

def _honoured(value: object) -> int | None:
    """The output limit an upstream could read from a value: an independent oracle (float parsing)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip().replace("_", ""))
        except ValueError:
            return None
    else:
        return None
    return math.ceil(number) if math.isfinite(number) and number > 0 else None


values = st.one_of(
    st.integers(-5, 200_000), st.floats(-5, 200_000), st.sampled_from([math.nan, math.inf, -math.inf]),
    st.integers(1, 200_000).map(str), st.integers(1, 2000).map(lambda i: f" {i}.5 "),
    st.sampled_from(["lots", "", "1e3", "NaN", "Infinity", "-4", "0"]), st.booleans(), st.none(),
    st.just([100]), st.just({"tokens": 100}),
)
bodies = st.fixed_dictionaries({}, optional={
    "max_tokens": values, "max_completion_tokens": values, "max_output_tokens": values,
    "n": st.one_of(st.integers(-1, 8), st.integers(1, 8).map(str), st.none()),
})
PRICES = PriceTable.from_mapping({"models": {"gpt-4o": {"input": "2.50", "output": "10.00", "max_output": 16384}}})


@pytest.fixture(scope="module")
def gate(tmp_path_factory: pytest.TempPathFactory) -> Gate:
    return Gate(managed=False, keys=None, limits=None, budgets=Budgets(str(tmp_path_factory.mktemp("g") / "x.db")),  # type: ignore[arg-type]
                rates=RateLimiter(), prices=PRICES, counting=CountPolicy())


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bodies)
def test_the_reservation_is_never_less_than_any_honoured_limit(gate: Gate, fields: dict[str, Any]) -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], **fields}
    choices = max(1, _honoured(fields.get("n")) or 1)
    present = [fields[f] for f in ("max_tokens", "max_completion_tokens", "max_output_tokens")
               if fields.get(f) is not None]
    honoured = [h for h in map(_honoured, present) if h is not None]
    # A field an upstream could not read as a limit might be ignored: then the model's maximum may be produced.
    floor = max(honoured + ([16384] if len(honoured) < len(present) or not present else []))
    limit, n = output_limit("/v1/chat/completions", body, 16384)
    assert n >= choices
    reserved_output = limit * n
    assert reserved_output >= floor * choices
    tokens, worst = gate.estimate("/v1/chat/completions", body, "gpt-4o")
    assert tokens - reserved_output >= 0
    assert worst >= Decimal(floor * choices) * Decimal(10) / 1_000_000
