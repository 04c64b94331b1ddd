"""Settings: what can be configured, with its default and help, and loading them from YAML and flags.

Settings are data (name, default, help, parser) so that the docs, the shipped config/proxy.yaml and the
tests can walk them. Precedence: command-line flags, then the config file, then the defaults.
Every problem is a `ConfigError` whose message names the file and the problem in one line.
"""

from __future__ import annotations

import hashlib
import os
from copy import copy
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

import yaml
from yarl import URL

from proxy.control.limits import Limits, Subject, parse_limits_setting, parse_thresholds
from proxy.core.errors import MeterproxyError
from proxy.forwarding.routes import RouteError, parse_routes
from proxy.ledger.target import parse_target, redact_url

SHIPPED_PRICING = Path(__file__).resolve().parent / "pricing" / "pricing.yaml"


class ConfigError(MeterproxyError):
    """A setting or config file is unusable; the message is one line for the operator."""


def _text(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty string")
    return value


def _db(value: object) -> str:
    """A SQLite path, or a postgresql:// (postgres://) URL: a URL is never taken for a path."""
    text = _text(value)
    scheme = text.split("://", 1)[0].lower() if "://" in text else None
    if scheme is None:
        return text
    if scheme not in ("postgresql", "postgres"):
        raise ValueError(f"must be a SQLite path or a postgresql:// URL, not a {scheme}:// URL")
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as exc:
        raise ValueError(f"is not a valid PostgreSQL URL ({exc}): {redact_url(text)}") from None
    return text


def _port(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError("must be a whole number from 0 to 65535")
    try:
        port = int(value)
    except ValueError:
        raise ValueError("must be a whole number from 0 to 65535") from None
    if not 0 <= port <= 65535:
        raise ValueError("must be a whole number from 0 to 65535")
    return port


def _url(value: object) -> str:
    text = _text(value)
    url = URL(text)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"must be an http(s) URL with a host, not {text!r}")
    if url.query_string or url.fragment:
        raise ValueError(f"must not carry a query or fragment: {text!r}")
    return text.rstrip("/")


def _required(value: float | None) -> float:
    if value is None:
        raise ValueError("must be a number of seconds, not null")
    return value


def _seconds(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("must be a number of seconds")
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError("must be a number of seconds") from None
    if not seconds > 0:
        raise ValueError("must be more than 0 seconds")
    return seconds


def _size(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("must be a whole number of bytes, at least 1")
    return value


def _positive_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("must be a whole number, at least 1")
    return value


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, not {value!r}")
    return value


def _size0(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("must be a whole number of bytes (0 for none)")
    return value


def _choice(*allowed: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        if value not in allowed:
            raise ValueError(f"must be {' or '.join(allowed)}, not {value!r}")
        return str(value)
    return parse


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, not {value!r}")
    return value


def _optional_text(value: object) -> str | None:
    return None if value is None else _text(value)


def _rate(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError("must be a number from 0 to 1")
    return float(value)


_ENCODINGS = ("o200k_base", "cl100k_base")


def _encoding_map(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and v in _ENCODINGS for k, v in value.items()):
        raise ValueError(f"must map model globs to one of {', '.join(_ENCODINGS)}")
    return dict(value)


def _globs(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError("must be a list of model globs")
    return tuple(value)


def _positive_days(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError("must be a number of days, more than 0")
    return float(value)


def _metric_labels(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not set(value) <= {"key", "user"}:
        raise ValueError("must be a list of: key, user")
    return tuple(value)


# A pair's names, as reports name them, to the rollup dimensions (rollups.DIMS) they are.
_PAIR_NAMES = {"key": "key_id", "model": "model", "user": "user", "operation": "operation",
               "endpoint": "endpoint", "status": "status", "tag:team": "team"}  # fmt: skip
_DIM_ORDER = ("key_id", "model", "user", "operation", "endpoint", "status", "team")  # rollups.DIMS
_DIM_NAMES = {**_PAIR_NAMES, "key_id": "key_id", "team": "team"}  # the dimensions' own names too


def _pairs(value: object) -> tuple[tuple[str, str], ...]:
    """rollup_pairs: a list of pairs, each "a,b" or [a, b], of the names in _PAIR_NAMES."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ValueError("must be a list of pairs such as 'user,model'")
    out: list[tuple[str, str]] = []
    for item in value:
        names = [n.strip() for n in item.split(",")] if isinstance(item, str) else item
        if (not isinstance(names, list) or len(names) != 2 or not all(isinstance(n, str) for n in names)
                or not set(names) <= set(_DIM_NAMES) or len({_DIM_NAMES[n] for n in names}) != 2):
            raise ValueError(f"{item!r} is not a pair of two of: {', '.join(_PAIR_NAMES)}")
        a, b = sorted((_DIM_NAMES[n] for n in names), key=_DIM_ORDER.index)
        if (a, b) not in out:
            out.append((a, b))
    return tuple(out)


def _zones(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(z, str) for z in value):
        raise ValueError("must be a list of IANA time zone names, e.g. [Europe/Berlin]")
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    for zone in value:
        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{zone!r} is not an IANA time zone name") from None
    return tuple(dict.fromkeys(z for z in value if z != "UTC"))


def _route_list(value: object) -> tuple[str, ...]:
    if value is None or value == []:
        return ()
    try:
        return parse_routes(value, "unmetered_routes")
    except RouteError as exc:
        raise ValueError(str(exc)) from None


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting: its name (the config key, and `--name` when `flag`), its one default, help and parser."""

    name: str
    default: Any
    help: str
    parse: Callable[[object], Any]
    flag: bool = False  # also a `serve` command-line flag


SETTINGS: tuple[Setting, ...] = (
    Setting("host", "127.0.0.1", "address the proxy listens on", _text, flag=True),
    Setting("port", 8080, "port the proxy listens on", _port, flag=True),
    Setting("upstream", "https://api.openai.com",
            "base URL of the real API; may carry a path prefix (https://host/openai)", _url, flag=True),
    Setting("db", "./meterproxy.db", "the ledger: a SQLite path (created if missing) or a postgresql:// URL "
            "(password best in PGPASSWORD or ~/.pgpass)", _db, flag=True),
    Setting("pricing", str(SHIPPED_PRICING),
            "path of the pricing table (USD per 1M tokens); default: the shipped config/pricing.yaml",
            _text, flag=True),
    Setting("admin_host", "127.0.0.1", "address of the admin API when it has its own port", _text),
    Setting("admin_port", None, "a port of its own for the admin API (then /admin is not served on the proxy's "
            "port); null: /admin on the proxy's port", lambda v: None if v is None else _port(v)),
    Setting("ui_session_ttl", 28800.0, "seconds a dashboard login (/admin/ui/, /meter/ui/) lasts; then log in again",
            lambda v: _required(_seconds(v))),
    Setting("connect_timeout", 10.0, "seconds to connect to the upstream; then 504", _seconds),
    Setting("first_byte_timeout", 600.0,
            "seconds to wait for the upstream's response headers (a non-streamed call sends them when it is "
            "done); then 504", _seconds),
    Setting("idle_timeout", 300.0,
            "seconds a response body may stall between two chunks; then the call ends as broken off", _seconds),
    Setting("total_timeout", None, "seconds a whole upstream call may take; null: no limit", _seconds),
    Setting("shutdown_grace", 30.0,
            "on SIGTERM: seconds in-flight calls get to finish (no new ones are accepted); those still running "
            "are then cut off and recorded (status 499, 'proxy shut down', tokens counted so far), the ledger is "
            "flushed and the process exits 0", _seconds),
    Setting("heartbeat_interval", 5.0, "seconds between a running proxy's heartbeats in the ledger's replicas "
            "table (GET /admin/replicas); a replica not seen for 3 intervals is shown as not alive",
            lambda v: _required(_seconds(v))),
    Setting("max_request_bytes", 32 * 1024 * 1024, "largest request body accepted; larger gets 413", _size),
    Setting("max_meter_bytes", 64 * 1024 * 1024,
            "most bytes of a response's decoded copy the meter reads per call (decompression stops there); "
            "past it the client still gets every byte, metering stops and the row's usage_note says so", _size),
    Setting("header_timeout", 30.0, "seconds a client connection has to send a request's complete headers; "
            "then it is closed; null: no limit", _seconds),
    Setting("keepalive_timeout", 75.0, "seconds an idle keep-alive client connection stays open; null: no limit",
            _seconds),
    Setting("on_ledger_error", "spool",
            "when the database refuses a row (locked, disk full, read-only): keep serving and 'spool' rows to a "
            "fsynced file replayed later, or 'reject' new calls with 503 until it works again (rows of calls "
            "already under way are spooled either way)", _choice("spool", "reject")),
    Setting("spool", None, "path of the spool file; null: the db path plus '.spool.jsonl' (a PostgreSQL db: "
            "./meterproxy-<hash of the URL>.spool.jsonl; best on another disk than a SQLite db)", _optional_text),
    Setting("spool_reserve", 8 * 1024 * 1024,
            "bytes of disk held beside the spool (<spool>.reserve) and released to it when the disk fills, so "
            "that a full disk shared with the db still leaves the spool room; 0: none", _size0),
    Setting("ledger_busy_timeout", 5.0, "seconds a write waits for a database locked by another process",
            _seconds),
    Setting("ledger_write_timeout", 15.0,
            "seconds a ledger write may go unanswered (a network dropping packets, a stalled server) before it "
            "is interrupted and its rows go to the spool", _seconds),
    Setting("slow_database", 0.5,
            "seconds above which the median of the last ledger writes (or budget admissions on PostgreSQL), or "
            "the one under way, makes /healthz say status 'slow' (still 200); null: never", _seconds),
    Setting("accuracy_sample_rate", 0.01,
            "share of calls that carry the provider's usage to count as well, to measure counting's accuracy",
            _rate),
    Setting("count_encoding", "o200k_base",
            "tokenizer for models tiktoken does not know (Llama, Mistral...); such counts are flagged approximate",
            _choice(*_ENCODINGS)),
    Setting("count_encoding_overrides", {}, "model glob -> tokenizer, for models whose tokenizer you know",
            _encoding_map),
    Setting("reasoning_models", (), "model globs that reason in hidden tokens, beyond OpenAI's o-series and "
            "gpt-5: their counted completions are flagged as lower bounds", _globs),
    Setting("keys", "passthrough",
            "'passthrough': clients send their own upstream keys; 'managed': the proxy issues its own keys "
            "(POST /admin/keys, meterproxy keys) and sends the real upstream key (OPENAI_API_KEY) itself",
            _choice("passthrough", "managed")),
    Setting("upstream_api_key", None, "the real upstream key for keys: managed (OPENAI_API_KEY in the "
            "environment wins)", _optional_text),
    Setting("limits", {}, "budgets and rate limits for passthrough subjects: {key|user|team: {name: "
            "{budget_usd, budget_period: day|month|total, rpm, tpm}}}", parse_limits_setting),
    Setting("reserve_max_tokens", 4096, "output tokens a budget or tpm limit reserves for a call that sets no "
            "output limit, when its model has no max_output in the price table", _size),
    Setting("pg_pool_size", 2, "PostgreSQL: connections for budget and rate-limit admissions, so that "
            "concurrent calls' admissions run side by side", _positive_int),
    Setting("pg_pool_timeout", 5.0, "PostgreSQL: seconds an admission waits for a free connection before the "
            "call is answered 503 budget_unavailable", lambda v: _required(_seconds(v))),
    Setting("reservation_lease_seconds", 60.0, "PostgreSQL: seconds a call's budget reservation outlives its "
            "replica's last renewal (a replica that died holds nothing for longer)", lambda v: _required(_seconds(v))),
    Setting("unmetered_routes", (), "routes allowed under a budget or tpm limit although the proxy cannot meter "
            "them (they reserve nothing), e.g. ['GET /v1/files', 'POST /v1/files']", _route_list),
    Setting("alert_webhook", None, "URL that gets a JSON POST when spend crosses an alert threshold",
            lambda v: None if v is None else _url(v)),
    Setting("alert_thresholds", (Decimal("0.8"), Decimal(1)), "shares of a budget at which to alert, once per "
            "period and threshold", parse_thresholds),
    Setting("retention_days", None, "days raw call rows are kept (rollups are kept for good); null: forever",
            lambda v: None if v is None else _positive_days(v)),
    Setting("rollup_pairs", (("key_id", "model"), ("model", "user"), ("operation", "team")),
            "pairs of report dimensions (key, model, user, operation, endpoint, status, tag:team) that get day "
            "and month rows of their own, for reports grouped or filtered by exactly such a pair; [] for none",
            _pairs),
    Setting("report_zones", (), "IANA time zones that get day and month rows of their own (local days), for "
            "reports with tz= one of them over whole local days and months, e.g. [Europe/Berlin, Asia/Kolkata]",
            _zones),
    Setting("metrics_labels", (), "extra labels on /metrics: any of key, user (each key or user is a new series)",
            _metric_labels),
    Setting("metrics_public", False, "serve /metrics without the admin token (e.g. a scraper on a private "
            "network); false: /metrics needs 'Authorization: Bearer <METERPROXY_ADMIN_TOKEN>'", _bool),
    Setting("access_log", False, "one JSON line per call on the meterproxy.access logger (request id, key id, "
            "user, model, status, latency, cost; never a key or a body)", _flag),
    Setting("stream_usage", "count",
            "a stream the client asked without usage: count its tokens (the request is never changed), or "
            "inject include_usage upstream and take out of the client's stream exactly what that added",
            _choice("count", "inject")),
)
_BY_NAME = {s.name: s for s in SETTINGS}
ADMIN_TOKEN_ENV = "METERPROXY_ADMIN_TOKEN"
UPSTREAM_KEY_ENV = "OPENAI_API_KEY"


def _default(name: str, *, shown: bool = True) -> Any:
    """The dataclass field of setting `name`: its default is the one written in SETTINGS, never restated."""
    default = _BY_NAME[name].default
    if isinstance(default, (dict, list, set)):
        return field(default_factory=lambda: copy(default), repr=shown)
    return field(default=default, repr=shown)


@dataclass(frozen=True, slots=True)
class Settings:
    """The settings in force: every default is the one in SETTINGS (`_default`), written there once."""

    host: str = _default("host")
    port: int = _default("port")
    upstream: str = _default("upstream")
    db: str = _default("db")
    pricing: str = _default("pricing")
    admin_host: str = _default("admin_host")
    admin_port: int | None = _default("admin_port")
    ui_session_ttl: float = _default("ui_session_ttl")
    connect_timeout: float | None = _default("connect_timeout")
    first_byte_timeout: float | None = _default("first_byte_timeout")
    idle_timeout: float | None = _default("idle_timeout")
    total_timeout: float | None = _default("total_timeout")
    max_request_bytes: int = _default("max_request_bytes")
    max_meter_bytes: int = _default("max_meter_bytes")
    header_timeout: float | None = _default("header_timeout")
    keepalive_timeout: float | None = _default("keepalive_timeout")
    shutdown_grace: float | None = _default("shutdown_grace")
    heartbeat_interval: float = _default("heartbeat_interval")
    on_ledger_error: str = _default("on_ledger_error")
    spool: str | None = _default("spool")
    spool_reserve: int = _default("spool_reserve")
    ledger_busy_timeout: float | None = _default("ledger_busy_timeout")
    ledger_write_timeout: float | None = _default("ledger_write_timeout")
    slow_database: float | None = _default("slow_database")
    accuracy_sample_rate: float = _default("accuracy_sample_rate")
    count_encoding: str = _default("count_encoding")
    count_encoding_overrides: dict[str, str] = _default("count_encoding_overrides")
    reasoning_models: tuple[str, ...] = _default("reasoning_models")
    keys: str = _default("keys")
    upstream_api_key: str | None = _default("upstream_api_key", shown=False)
    limits: dict[Subject, Limits] = _default("limits")
    reserve_max_tokens: int = _default("reserve_max_tokens")
    pg_pool_size: int = _default("pg_pool_size")
    pg_pool_timeout: float = _default("pg_pool_timeout")
    reservation_lease_seconds: float = _default("reservation_lease_seconds")
    unmetered_routes: tuple[str, ...] = _default("unmetered_routes")
    alert_webhook: str | None = _default("alert_webhook")
    alert_thresholds: tuple[Decimal, ...] = _default("alert_thresholds")
    retention_days: float | None = _default("retention_days")
    rollup_pairs: tuple[tuple[str, str], ...] = _default("rollup_pairs")
    report_zones: tuple[str, ...] = _default("report_zones")
    metrics_labels: tuple[str, ...] = _default("metrics_labels")
    metrics_public: bool = _default("metrics_public")
    stream_usage: str = _default("stream_usage")
    access_log: bool = _default("access_log")
    admin_token: str | None = field(default=None, repr=False)  # from the environment only; never logged




def _apply(values: dict[str, Any], source: Mapping[str, object], where: str) -> None:
    for name, raw in source.items():
        setting = _BY_NAME.get(name) if isinstance(name, str) else None
        if setting is None:
            known = ", ".join(_BY_NAME)
            raise ConfigError(f"{where}: unknown setting {name!r} (known: {known})")
        try:
            values[name] = setting.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{where}: setting {name!r} {exc}") from None


def read_config_file(path: str | os.PathLike[str]) -> dict[str, object]:
    where = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"{where}: cannot read config file: {reason}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{where}: YAML error{line}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the config file must be a mapping of setting: value")
    return data


def load_settings(config_path: str | None = None, flags: Mapping[str, object] | None = None,
                  environ: Mapping[str, str] | None = None, *, serving: bool = True) -> Settings:
    """Defaults, overridden by the config file, overridden by flags (None values are 'not given').

    `serving`: the settings are for a proxy that will forward calls, so `keys: managed` needs the upstream
    key. Commands that only read or edit the ledger pass False: they never call the upstream."""
    values: dict[str, Any] = {s.name: s.default for s in SETTINGS}
    if config_path is not None:
        _apply(values, read_config_file(config_path), config_path)
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    _apply(values, given, "command line")
    env = os.environ if environ is None else environ
    token = env.get(ADMIN_TOKEN_ENV) or None
    values["upstream_api_key"] = env.get(UPSTREAM_KEY_ENV) or values["upstream_api_key"]
    if serving and values["keys"] == "managed" and not values["upstream_api_key"]:
        raise ConfigError(f"{config_path or 'command line'}: keys: managed needs the upstream key: set "
                          f"{UPSTREAM_KEY_ENV} (or upstream_api_key)")
    return Settings(**values, admin_token=token)


def spool_path(settings: Settings) -> str:
    """The spool: `spool`, else beside a SQLite ledger; for a PostgreSQL ledger a local file named after the
    URL (without its password), so that proxies on different databases never share one."""
    if settings.spool:
        return settings.spool
    target = parse_target(settings.db)
    if target.is_postgres:
        digest = hashlib.sha256(target.shown.encode()).hexdigest()[:10]
        return f"./meterproxy-{digest}.spool.jsonl"
    return f"{settings.db}.spool.jsonl"
