"""The OpenAPI 3.1 document of the admin API, `/meter/usage`, `/healthz` and `/metrics`, kept as data.

`GET /admin/openapi.json` serves `document()`, behind the admin token like every other /admin route.
tests/test_openapi.py validates it, compares its (method, path) pairs with the routes the app really
serves (a route without an entry fails), and runs schemathesis over it against a live server. So this
module must describe every route and every status a route can answer, and nothing it does not serve.

`x-served-on` on each path says which listener serves it: "proxy" (always the proxy's port) or "admin"
(`admin_host`:`admin_port` when `admin_port` is set, else the proxy's port too).
"""

from __future__ import annotations

import copy
from typing import Any

from proxy import __version__
from proxy.admin.keys import MAX_BODY
from proxy.control.limits import MAX_COUNT, MAX_NAME, MAX_QUERY_VALUE, MAX_TIME, MAX_TIME_TEXT, PERIODS
from proxy.forwarding.routes import MAX_ROUTES
from proxy.reports.queries import MAX_LIMIT

__all__ = ["document"]

_REF = "#/components/schemas/"
_ADMIN_AUTH: list[dict[str, list[str]]] = [{"adminToken": []}]
_KEY_AUTH: list[dict[str, list[str]]] = [{"apiKey": []}]


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": _REF + name}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _obj(properties: dict[str, Any], *, required: list[str] | None = None, extra: Any = False,
         description: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": properties,
                           "required": list(properties) if required is None else required,
                           "additionalProperties": extra}
    if description:
        out["description"] = description
    return out


_TEXT = {"type": "string"}
_TIME = {"type": "string", "pattern": r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z$",
         "description": "ISO 8601, UTC, to the millisecond (2026-11-23T14:00:00.250Z)"}
_INT = {"type": "integer"}
_MONEY = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$", "description": "USD, an exact decimal string"}
_NAME = {"type": "string", "minLength": 1, "maxLength": MAX_NAME, "pattern": r"\S"}
_COUNT = {"type": "integer", "minimum": 1, "maximum": MAX_COUNT}
_MONEY_IN = {"description": "USD, 0 to 10^12: a JSON number (read exactly) or a decimal string",
             "anyOf": [{"type": "number", "minimum": 0, "maximum": 10**12},
                       {"type": "string", "pattern": r"^\s*[0-9]+(\.[0-9]+)?\s*$"}]}
_TIME_IN = {"description": f"ISO 8601 (naive means UTC) or unix seconds from 0 to {MAX_TIME} (year 9999)",
            "anyOf": [{"type": "number", "minimum": 0, "maximum": MAX_TIME},
                      {"type": "string", "minLength": 1, "maxLength": MAX_TIME_TEXT}]}

_COUNTERS = {
    "calls": _INT, "errors": _INT, "unpriced_calls": _INT, "prompt_tokens": _INT, "completion_tokens": _INT,
    "cached_tokens": _INT, "reasoning_tokens": _INT, "total_tokens": _INT, "cost_usd": _MONEY,
    "counted_calls": _INT, "counted_tokens": _INT,
}  # fmt: skip
_BUDGET_STATE = {
    "kind": {"type": "string", "enum": ["key", "user", "team"]}, "name": _TEXT,
    "period": {"type": "string", "enum": list(PERIODS)}, "period_start": _TIME,
    "budget_usd": _nullable(_MONEY), "spent_usd": _MONEY, "reserved_usd": _MONEY, "left_usd": _nullable(_MONEY),
}  # fmt: skip
_KEY_FIELDS_IN = {
    "user": _NAME, "team": _nullable(_NAME), "name": _nullable(_NAME), "budget_usd": _nullable(_MONEY_IN),
    "budget_period": {"type": "string", "enum": list(PERIODS)}, "expires_at": _nullable(_TIME_IN),
    "models": _nullable({"type": "array", "minItems": 1, "maxItems": 100, "items": _NAME,
                         "description": "model names or globs (fnmatch); null: any model"}),
    "rpm": _nullable(_COUNT), "tpm": _nullable(_COUNT),
    "routes": _nullable({"type": "array", "minItems": 1, "maxItems": MAX_ROUTES,
                         "items": {"type": "string", "minLength": 1, "maxLength": MAX_NAME},
                         "description": "'METHOD /v1/path' specs ('*' a segment, '**' the rest) or 'default'; "
                                        "null: the default inference routes"}),
    "organization": _nullable({**_NAME, "description": "sent upstream as OpenAI-Organization"}),
    "project": _nullable({**_NAME, "description": "sent upstream as OpenAI-Project"}),
}  # fmt: skip
_KEY_VIEW = {
    "key_id": _TEXT, "key_hint": _TEXT, "user": _TEXT, "team": _nullable(_TEXT), "name": _nullable(_TEXT),
    "status": {"type": "string", "enum": ["active", "expired", "revoked"]}, "budget_usd": _nullable(_MONEY),
    "budget_period": {"type": "string", "enum": list(PERIODS)}, "expires_at": _nullable(_TIME),
    "models": _nullable({"type": "array", "items": _TEXT}), "rpm": _nullable(_INT), "tpm": _nullable(_INT),
    "routes": _nullable({"type": "array", "items": _TEXT}), "organization": _nullable(_TEXT),
    "project": _nullable(_TEXT), "created_at": _TIME, "updated_at": _TIME, "revoked_at": _nullable(_TIME), "period_start": _TIME,
    "spent_usd": _MONEY, "reserved_usd": _MONEY, "left_usd": _nullable(_MONEY),
}  # fmt: skip
_PRICE = {"type": "object", "additionalProperties": True,
          "description": "USD per 1M tokens as decimal strings (input, cached_input, output, ...), with "
                         "long_context, tiers, max_output and audio_minute where the table has them"}
_PRICING_SUMMARY = {"version": _TEXT, "source": _TEXT, "loaded_at": _TIME,
                    "error": _nullable(_obj({"message": _TEXT, "at": _TIME}))}
_ACCURACY_SIDE = _obj({"calls": _INT, "mean_error": _nullable({"type": "number"}),
                       "mean_abs_error": _nullable({"type": "number"}), "worst_abs_error": _nullable(_INT),
                       "mean_abs_error_pct": _nullable({"type": "number"})})
_CALL = _obj({
    "request_id": _TEXT, "ts": _TIME, "key_id": _nullable(_TEXT), "key_hint": _nullable(_TEXT),
    "user": _nullable(_TEXT), "session": _nullable(_TEXT), "operation": _nullable(_TEXT),
    "tags": {"type": "object"}, "method": _TEXT, "endpoint": _TEXT, "model": _nullable(_TEXT),
    "requested_model": _nullable(_TEXT), "stream": {"type": "boolean"}, "status": _INT, "error": _nullable(_TEXT),
    "latency_ms": {"type": "number"}, "ttfb_ms": _nullable({"type": "number"}), "prompt_tokens": _INT,
    "completion_tokens": _INT, "cached_tokens": _INT, "reasoning_tokens": _INT, "total_tokens": _INT,
    "usage_source": {"type": "string", "enum": ["upstream", "counted", "none"]}, "priced": {"type": "boolean"},
    "cost_usd": _MONEY, "approximate": {"type": "boolean"}, "lower_bound": {"type": "boolean"},
    "usage_note": _nullable(_TEXT), "counted_prompt_tokens": _nullable(_INT),
    "counted_completion_tokens": _nullable(_INT),
})  # fmt: skip

_SCHEMAS: dict[str, Any] = {
    "Error": _obj({"error": _obj({"message": _TEXT, "type": _TEXT, "param": _nullable(_TEXT),
                                  "code": _nullable(_TEXT)})},
                  description="OpenAI's error shape; `param` names the bad parameter"),
    "Counters": _obj(_COUNTERS),
    "UsageRow": _obj(_COUNTERS, extra={"type": ["string", "integer", "null"]},
                     description="the counters, and one member per group_by field (key_id for key)"),
    "UsageReport": _obj({
        "since": _nullable(_TIME), "until": _nullable(_TIME), "group_by": {"type": "array", "items": _TEXT},
        "tz": _TEXT, "rows": {"type": "array", "items": _ref("UsageRow")}, "totals": _ref("Counters"),
        "pruned_before": {**_TIME, "description": "raw calls before this time are pruned (retention_days)"},
    }, required=["since", "until", "group_by", "tz", "rows", "totals"]),
    "Call": _CALL,
    "CallDetail": {**_CALL, "required": ["request_id", "ts", "started_at", "ended_at", "method", "endpoint",
                                          "status", "usage_source", "priced", "cost_usd"],
                   "properties": {**_CALL["properties"], "started_at": {"type": "number"},
                                  "ended_at": {"type": "number"}, "id": _INT},
                   "additionalProperties": True,
                   "description": "what a listed call has, and every other column of the row (pricing_version, "
                                  "service_tier, audio tokens, original_cost_usd, repriced_at, ...)"},
    "CallPage": _obj({"calls": {"type": "array", "items": _ref("Call")},
                      "next": _nullable({**_TEXT, "description": "pass as `before` for the next page"})}),
    "AccuracyReport": _obj({"since": _nullable(_TIME), "until": _nullable(_TIME), "models": {
        "type": "array", "items": _obj({"model": _nullable(_TEXT), "calls_sampled": _INT,
                                        "prompt": _ACCURACY_SIDE, "completion": _ACCURACY_SIDE})}}),
    "KeyCreate": _obj(_KEY_FIELDS_IN, required=["user"]),
    "KeyUpdate": _obj({k: v for k, v in _KEY_FIELDS_IN.items()}, required=[],
                      description="only the fields given change; null clears one"),
    "Key": _obj(_KEY_VIEW, description="a managed key (never the key itself), its spend and budget left"),
    "CreatedKey": _obj({"key": {**_TEXT, "description": "the key: shown in this answer only"}, **_KEY_VIEW}),
    "KeyList": _obj({"keys": {"type": "array", "items": _ref("Key")}}),
    "Limits": _obj({"budget_usd": _nullable(_MONEY_IN), "budget_period": {"type": "string", "enum": list(PERIODS)},
                    "rpm": _nullable(_COUNT), "tpm": _nullable(_COUNT)}, required=[],
                   description="the whole of a subject's limits: a field left out is none"),
    "BudgetState": _obj(_BUDGET_STATE),
    "Budget": _obj({**_BUDGET_STATE, "source": {"type": "string", "enum": ["api", "config"]},
                    "rpm": _nullable(_INT), "tpm": _nullable(_INT)}),
    "BudgetList": _obj({"budgets": {"type": "array", "items": _ref("Budget")}}),
    "BudgetDeleted": _obj({"kind": _TEXT, "name": _TEXT, "deleted": {"const": True}}),
    "Pricing": _obj({**_PRICING_SUMMARY, "models": {"type": "object", "additionalProperties": _PRICE},
                     "default": _nullable(_PRICE)}),
    "PricingReload": _obj({"reloaded": {"type": "boolean"}, **_PRICING_SUMMARY}),
    "MeterUsage": _obj({
        "key_id": _TEXT, "user": _nullable(_TEXT), "team": _nullable(_TEXT), "since": _nullable(_TIME),
        "until": _nullable(_TIME), "budgets": {"type": "array", "items": _ref("BudgetState")},
        "rows": {"type": "array", "items": _ref("UsageRow")}, "totals": _ref("Counters"),
    }),  # fmt: skip
    "Health": _obj({
        "status": {"enum": ["ok", "slow", "degraded"], "description": "slow: ledger writes or budget admissions "
                   "take longer than slow_database (still serving); degraded: rows go to the spool, or calls are "
                   "refused (then 503)"},
        "backend": {"enum": ["sqlite", "postgres"]},
        "db": {"type": "string", "description": "the ledger: a path, or a URL without its password"},
        "reason": _TEXT, "ledger": {"enum": ["spooling", "rejecting", "unavailable"]},
        "spool_depth": _INT}, required=["status", "backend", "db"]),
    "Replica": _obj({
        "id": _TEXT, "host": _TEXT, "pid": _INT, "version": _TEXT, "pricing_version": _nullable(_TEXT),
        "started_at": _TIME, "last_seen": _TIME, "seen_seconds_ago": {"type": "number", "minimum": 0},
        "interval_seconds": {"type": "number"},
        "alive": {"type": "boolean", "description": "seen within 3 of its heartbeat intervals"},
    }),  # fmt: skip
    "ReplicaList": _obj({
        "replicas": {"type": "array", "items": _ref("Replica")}, "alive": _INT,
        "warnings": {"type": "array", "items": _TEXT,
                     "description": "live replicas pricing with different pricing versions (or running "
                                    "different meterproxy versions)"},
    }),  # fmt: skip
}

_ERRORS = {
    400: "a bad parameter or body (`param` names it)",
    401: "no admin token, a wrong one, or the admin API is disabled (no METERPROXY_ADMIN_TOKEN)",
    404: "no such key, subject or call",
    409: "the subject is a managed key: change its limits on the key",
    503: "the ledger cannot be read",
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _responses(ok: int, schema: str, description: str, *errors: int) -> dict[str, Any]:
    out: dict[str, Any] = {str(ok): _json(_ref(schema), description)}
    for status in (400, 401, *errors):
        out[str(status)] = _json(_ref("Error"), _ERRORS[status])
    return out


def _query(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": schema or {"type": "string", "maxLength": MAX_QUERY_VALUE}}


def _path(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description,
            "schema": schema or {"type": "string", "minLength": 1, "maxLength": MAX_NAME}}


def _body(schema: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(schema)}}}


_TIME_QUERY = {"type": "string", "minLength": 1, "maxLength": MAX_TIME_TEXT}
_SINCE = _query("since", "inclusive; ISO 8601 (a date or a datetime) or unix seconds, 1970 to 9999-12-30",
                _TIME_QUERY)
_UNTIL = _query("until", "exclusive; ISO 8601 or unix seconds, later than since", _TIME_QUERY)
_KIND = _path("kind", "whose limits", {"type": "string", "enum": ["key", "user", "team"]})
_SUBJECT = _path("name", "a key_id, a user or a team")
_KEY_ID = _path("key_id", "the key's key_id (16 hex characters)")


def _op(summary: str, responses: dict[str, Any], *, tag: str, params: list[dict[str, Any]] | None = None,
        body: str | None = None, security: list[Any] | None = None, op_id: str) -> dict[str, Any]:
    if security is None:  # behind the admin guard: it answers 401, and 400 for a query value past its bound
        security = _ADMIN_AUTH
        responses = {**responses}
        for status in (400, 401):
            responses.setdefault(str(status), _json(_ref("Error"), _ERRORS[status]))
    out: dict[str, Any] = {"operationId": op_id, "summary": summary, "tags": [tag], "responses": responses,
                           "security": security}
    if params:
        out["parameters"] = params
    if body:
        out["requestBody"] = _body(body)
        responses.setdefault("413", _json(_ref("Error"), f"the body is larger than {MAX_BODY} bytes"))
    return out


def _paths() -> dict[str, Any]:
    usage_ok = {"description": "counters per group; CSV with format=csv", "content": {
        "application/json": {"schema": _ref("UsageReport")}, "text/csv": {"schema": {"type": "string"}}}}
    return {
        "/admin/openapi.json": {"x-served-on": "admin", "get": _op(
            "This document", {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {
                "schema": {"type": "object"}}}}, "401": _json(_ref("Error"), _ERRORS[401])},
            tag="meta", op_id="openapi")},
        "/admin/usage": {"x-served-on": "admin", "get": _op(
            "Usage report: counters and exact cost per group",
            {**_responses(200, "UsageReport", ""), "200": usage_ok, "503": _json(_ref("Error"), _ERRORS[503])},
            tag="reports", op_id="usage", params=[
                _query("group_by", "comma-separated: key, model, user, session, operation, endpoint, status, "
                       "hour, day, week, month, tag:<name>"),
                _SINCE, _UNTIL, _query("key", "only this key_id"), _query("user", "only this user"),
                _query("model", "only this model"),
                _query("tz", "IANA zone where hours, days, weeks and months begin (default UTC)"),
                _query("format", "json (default) or csv", {"type": "string", "enum": ["json", "csv"]}),
            ])},
        "/admin/calls": {"x-served-on": "admin", "get": _op(
            "Ledger rows, newest first, a page at a time", _responses(200, "CallPage", "a page", 503),
            tag="reports", op_id="calls", params=[
                _query("key", "only this key_id"), _query("user", "only this user's"),
                _query("model", "only this model"),
                _query("status", "only this HTTP status", {"type": "string", "pattern": "^[1-9][0-9]{2}$"}),
                _query("usage_source", "only calls whose usage came from there",
                       {"type": "string", "enum": ["upstream", "counted", "none"]}),
                _query("limit", f"rows per page, 1 to {MAX_LIMIT} (default 50)",
                       {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}),
                _query("before", "the `next` cursor of the previous page",
                       {"type": "string", "pattern": "^[1-9][0-9]{0,17}$"}),
            ])},
        "/admin/calls/{request_id}": {"x-served-on": "admin", "get": _op(
            "One call: every column of its ledger row", _responses(200, "CallDetail", "the call", 404, 503),
            tag="reports", op_id="getCall", params=[
                _path("request_id", "the call's request_id", {"type": "string", "minLength": 1, "maxLength": 200})])},
        "/admin/accuracy": {"x-served-on": "admin", "get": _op(
            "Counting accuracy per model, from the sampled calls",
            _responses(200, "AccuracyReport", "per model", 503), tag="reports", op_id="accuracy",
            params=[_SINCE, _UNTIL, _query("model", "only this model")])},
        "/admin/keys": {
            "x-served-on": "admin",
            "post": _op("Issue a managed key (the answer holds it, this once)",
                        _responses(201, "CreatedKey", "the key and its record"), tag="keys", op_id="createKey",
                        body="KeyCreate"),
            "get": _op("Every managed key, with spend and budget left", _responses(200, "KeyList", "the keys"),
                       tag="keys", op_id="listKeys", params=[
                           _query("user", "only this user's"), _query("team", "only this team's"),
                           _query("revoked", "include revoked keys (default true)",
                                  {"type": "string", "enum": ["true", "false"]})]),
        },
        "/admin/keys/{key_id}": {
            "x-served-on": "admin", "parameters": [_KEY_ID],
            "get": _op("One key", _responses(200, "Key", "the key", 404), tag="keys", op_id="getKey"),
            "patch": _op("Change a key's fields (null clears one)", _responses(200, "Key", "the key", 404),
                         tag="keys", op_id="updateKey", body="KeyUpdate"),
            "delete": _op("Revoke a key (its row stays, for reports)", _responses(200, "Key", "the key", 404),
                          tag="keys", op_id="revokeKey"),
        },
        "/admin/budgets": {"x-served-on": "admin", "get": _op(
            "Limits of every subject (config and API), with spend", _responses(200, "BudgetList", "the subjects"),
            tag="budgets", op_id="listBudgets")},
        "/admin/budgets/{kind}/{name}": {
            "x-served-on": "admin", "parameters": [_KIND, _SUBJECT],
            "get": _op("One subject's limits and spend", _responses(200, "Budget", "the subject", 404),
                       tag="budgets", op_id="getBudget"),
            "put": _op("Set a subject's limits (replacing those set through the API)",
                       _responses(200, "Budget", "the subject", 409), tag="budgets", op_id="putBudget",
                       body="Limits"),
            "delete": _op("Remove the limits set through the API (config limits stay)",
                          _responses(200, "BudgetDeleted", "removed", 404), tag="budgets", op_id="deleteBudget"),
        },
        "/admin/pricing": {"x-served-on": "admin", "get": _op(
            "The price table in force, and the last refused edit",
            {"200": _json(_ref("Pricing"), "the table"), "401": _json(_ref("Error"), _ERRORS[401])},
            tag="pricing", op_id="pricing")},
        "/admin/pricing/reload": {"x-served-on": "admin", "post": _op(
            "Read the pricing file now",
            {"200": _json(_ref("PricingReload"), "whether a new table is in force"),
             "400": _json(_ref("Error"), "the edit is refused; the old table stays in force"),
             "401": _json(_ref("Error"), _ERRORS[401])},
            tag="pricing", op_id="reloadPricing")},
        "/admin/replicas": {"x-served-on": "admin", "get": _op(
            "The running proxies on this ledger (their heartbeats), which are alive, and version mismatches",
            _responses(200, "ReplicaList", "every replica's row", 503), tag="meta", op_id="replicas")},
        "/metrics": {"x-served-on": "admin", "get": _op(
            "Prometheus metrics (OpenMetrics when the scraper asks for it); without the token when "
            "metrics_public is set",
            {"200": {"description": "Prometheus text", "content": {
                "text/plain": {"schema": {"type": "string"}},
                "application/openmetrics-text": {"schema": {"type": "string"}}}}},
            tag="meta", op_id="metrics")},
        "/meter/usage": {"x-served-on": "proxy", "get": _op(
            "The presenting key's own usage per day and model, and its budgets left (this month by default)",
            {"200": _json(_ref("MeterUsage"), "the key's usage"), "400": _json(_ref("Error"), _ERRORS[400]),
             "401": _json(_ref("Error"), "no key, or (managed mode) an unknown, revoked or expired one"),
             "503": _json(_ref("Error"), _ERRORS[503])},
            tag="meter", op_id="meterUsage", security=_KEY_AUTH, params=[_SINCE, _UNTIL])},
        "/healthz": {"x-served-on": "proxy", "get": _op(
            "Readiness", {"200": _json(_ref("Health"), "serving (ok, slow, or degraded: spooling)"),
                          "503": _json(_ref("Health"), "degraded: calls are refused (rejecting, or nowhere to store rows)")}, tag="meta", op_id="healthz", security=[])},
    }  # fmt: skip


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document (a fresh copy: callers may change it)."""
    return copy.deepcopy({
        "openapi": "3.1.0",
        "info": {
            "title": "meterproxy admin API", "version": __version__,
            "description": "Usage reports, call listings, managed keys, budgets and pricing of a meterproxy, "
                           "and a key holder's own usage. Every error is in OpenAI's shape. `x-served-on` says "
                           "which listener serves a path: `admin` is admin_host:admin_port when admin_port is "
                           "set (else the proxy's port), `proxy` is always the proxy's port. The proxied "
                           "OpenAI API itself (/v1/...) is OpenAI's, forwarded unchanged, and not described here; nor are the "
                           "dashboard's HTML pages (/admin/ui/, /meter/ui/), a browser's view of this API. "
                           "A request line past 8190 bytes or a header past 8190 bytes is refused by the HTTP "
                           "server before any route (400, plain text).",
        },
        "paths": _paths(),
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {
                "adminToken": {"type": "http", "scheme": "bearer",
                               "description": "METERPROXY_ADMIN_TOKEN, as `Authorization: Bearer <token>`"},
                "apiKey": {"type": "http", "scheme": "bearer",
                           "description": "the client's own API key (a managed key in keys: managed)"},
            },
        },
    })  # fmt: skip
