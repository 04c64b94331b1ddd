"""Prometheus metrics: what each call adds, labels only when configured, bounded cardinality, /metrics."""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from proxy.core.record import CallRecord
from proxy.metering.metrics import OTHER, Metrics


def record(**fields: Any) -> CallRecord:
    values: dict[str, Any] = {
        "request_id": "r", "started_at": 1.0, "method": "POST", "endpoint": "/v1/chat/completions",
        "model": "gpt-4o", "status": 200, "prompt_tokens": 100, "completion_tokens": 20, "cached_tokens": 40,
        "reasoning_tokens": 5, "total_tokens": 120, "cost_usd": Decimal("0.00125"), "priced": True,
        "latency_ms": 350.0, "ttfb_ms": 80.0, "usage_source": "upstream", "key_id": "k1", "user": "alice",
    }  # fmt: skip
    values.update(fields)
    return CallRecord(**values)


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return samples(metrics).get((name, tuple(sorted(labels.items()))), 0.0)


def test_a_call_adds_requests_tokens_cost_and_latency() -> None:
    m = Metrics()
    m.observe_call(record())
    m.observe_call(record(status=429, prompt_tokens=0, completion_tokens=0, cached_tokens=0, reasoning_tokens=0,
                          total_tokens=0, cost_usd=Decimal(0), ttfb_ms=None, latency_ms=12.0))
    base = {"model": "gpt-4o", "endpoint": "/v1/chat/completions"}
    assert value(m, "meterproxy_requests_total", **base, status="200") == 1
    assert value(m, "meterproxy_requests_total", **base, status="429") == 1
    for kind, n in (("prompt", 100), ("completion", 20), ("cached", 40), ("reasoning", 5)):
        assert value(m, "meterproxy_tokens_total", **base, kind=kind) == n
    assert value(m, "meterproxy_cost_usd_total", **base) == pytest.approx(0.00125)
    assert value(m, "meterproxy_upstream_latency_seconds_count", **base) == 2
    assert value(m, "meterproxy_upstream_latency_seconds_sum", **base) == pytest.approx(0.362)
    assert value(m, "meterproxy_upstream_latency_seconds_bucket", **base, le="0.05") == 1  # the 12 ms one
    assert value(m, "meterproxy_upstream_ttfb_seconds_count", **base) == 1  # no first byte, no sample


def test_counted_and_reported_calls_and_unpriced_ones() -> None:
    m = Metrics()
    for source in ("upstream", "upstream", "counted", "none"):
        m.observe_call(record(usage_source=source))
    m.observe_call(record(model="mystery", priced=False, cost_usd=Decimal(0)))
    assert value(m, "meterproxy_calls_by_usage_source_total", source="upstream") == 3
    assert value(m, "meterproxy_calls_by_usage_source_total", source="counted") == 1
    assert value(m, "meterproxy_calls_by_usage_source_total", source="none") == 1
    assert value(m, "meterproxy_unpriced_calls_total", model="mystery", endpoint="/v1/chat/completions") == 1
    assert value(m, "meterproxy_unpriced_calls_total", model="gpt-4o", endpoint="/v1/chat/completions") == 0


@pytest.mark.parametrize(
    ("keys", "users", "labels"),
    [
        (False, False, {"endpoint", "model", "status"}),
        (True, False, {"endpoint", "model", "status", "key_id"}),
        (False, True, {"endpoint", "model", "status", "user"}),
        (True, True, {"endpoint", "model", "status", "key_id", "user"}),
    ],
)
def test_key_and_user_labels_only_when_configured(keys: bool, users: bool, labels: set[str]) -> None:
    m = Metrics(label_keys=keys, label_users=users)
    m.observe_call(record())
    found = [dict(k[1]) for k in samples(m) if k[0] == "meterproxy_requests_total"]
    assert len(found) == 1 and set(found[0]) == labels
    assert found[0].get("key_id", "k1") == "k1" and found[0].get("user", "alice") == "alice"
    latency = [dict(k[1]) for k in samples(m) if k[0] == "meterproxy_upstream_latency_seconds_count"]
    assert set(latency[0]) == {"model", "endpoint"}  # histograms never by key or user


def test_cardinality_is_bounded() -> None:
    m = Metrics(label_users=True, max_models=3, max_users=2)
    for i in range(50):
        m.observe_call(record(model=f"m{i}", user=f"u{i}", endpoint=f"/v1/files/file-{i}"))
    models = {dict(k[1])["model"] for k in samples(m) if k[0] == "meterproxy_requests_total"}
    users = {dict(k[1])["user"] for k in samples(m) if k[0] == "meterproxy_requests_total"}
    endpoints = {dict(k[1])["endpoint"] for k in samples(m) if k[0] == "meterproxy_requests_total"}
    assert models == {"m0", "m1", "m2", "other"} and users == {"u0", "u1", "other"} and endpoints == {"other"}
    assert len(m._children) <= 4 * 3  # the per-call cache is as bounded as the labels


def test_each_app_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.observe_call(record())
    assert value(a, "meterproxy_requests_total", model="gpt-4o", endpoint="/v1/chat/completions", status="200") == 1
    assert value(b, "meterproxy_requests_total", model="gpt-4o", endpoint="/v1/chat/completions", status="200") == 0


def test_ledger_queue_depth_and_commits() -> None:
    m = Metrics()
    m.queue_depth_from(lambda: 17)
    m.observe_commit(0.004, 32)
    m.observe_commit(0.5, 1000)
    assert value(m, "meterproxy_ledger_queue_depth") == 17
    assert value(m, "meterproxy_ledger_commit_seconds_count") == 2
    assert value(m, "meterproxy_ledger_batch_rows_bucket", le="50.0") == 1
    depth = [3]
    m.queue_depth_from(lambda: depth[0])
    depth[0] = 9
    assert value(m, "meterproxy_ledger_queue_depth") == 9  # read at scrape time


def test_a_malformed_record_is_ignored_not_raised() -> None:
    m = Metrics()
    m.observe_call(record(latency_ms=None))  # type: ignore[arg-type]
    m.observe_call(record())
    assert value(m, "meterproxy_requests_total", model="gpt-4o", endpoint="/v1/chat/completions", status="200") >= 1


def test_observe_call_is_cheap() -> None:
    m = Metrics(label_keys=True, label_users=True)
    rec = record()
    m.observe_call(rec)
    n = 20_000
    t0 = time.perf_counter()
    for _ in range(n):
        m.observe_call(rec)
    per_call = (time.perf_counter() - t0) / n
    assert per_call < 50e-6, f"{per_call * 1e6:.1f} µs per call"  # about 5 µs here; a wide margin for CI


async def test_metrics_endpoint_serves_prometheus_text() -> None:
    m = Metrics()
    m.observe_call(record())
    app = web.Application()
    app.router.add_get("/metrics", m.handler())
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/metrics")
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=")
        text = await resp.text()
        open_metrics = await client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        assert open_metrics.headers["Content-Type"].startswith("application/openmetrics-text")
        assert (await open_metrics.text()).rstrip().endswith("# EOF")
    assert 'meterproxy_requests_total{endpoint="/v1/chat/completions",model="gpt-4o",status="200"} 1.0' in text


# --- bounded cardinality (moved from tests/e2e/test_bounds.py) -----------------------------------
def _call(model: str, status: int) -> CallRecord:
    return CallRecord(request_id="r", started_at=0.0, method="POST", endpoint="/v1/chat/completions",
                      model=model, status=status, latency_ms=5.0, priced=True)


def test_junk_models_of_failed_calls_do_not_push_real_models_into_other() -> None:
    metrics = Metrics(max_models=5)
    for i in range(100):
        metrics.observe_call(_call(f"junk-{i}", 404))
    metrics.observe_call(_call("gpt-4o", 200))
    metrics.observe_call(_call("gpt-4o", 429))  # a model already labelled keeps its label when a call fails
    text = metrics.render().decode()
    assert 'model="gpt-4o",status="200"' in text and 'model="gpt-4o",status="429"' in text
    assert f'model="{OTHER}",status="404"}} 100.0' in text and "junk-" not in text
