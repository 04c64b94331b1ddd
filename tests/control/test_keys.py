"""Managed keys: issued random and stored as a hash, looked up from memory, changed and revoked anywhere.

On both backends (`ledger_target`: real SQLite in tmp_path, then a real PostgreSQL schema); the CLI is run
in-process through its own parser.
"""

from __future__ import annotations

import asyncio
import json
import time
from decimal import Decimal
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from proxy.control.budgets import Budgets
from proxy.control.db import ControlDB, ControlDBError
from proxy.control.gate import Gate, Refusal
from proxy.control.keys import KeyStore, parse_key_fields
from proxy.control.limits import LimitStore
from proxy.control.ratelimit import RateLimiter
from proxy.core.credentials import key_id_of
from proxy.core.errors import ParameterError
from proxy.counting.counter import CountPolicy
from proxy.pricing.table import PriceTable
from tests.support.cli import cli
from tests.support.control import other_process, query, stored_bytes
from tests.support.relay import Relay


@pytest.fixture
async def db(ledger_target: str) -> AsyncIterator[ControlDB]:
    control = ControlDB(ledger_target)
    await control.open()
    yield control
    await control.close()


@pytest.fixture
def store(db: ControlDB) -> KeyStore:
    return KeyStore(db)


async def test_a_key_is_random_shown_once_and_stored_only_as_its_hash(store: KeyStore, db: ControlDB) -> None:
    key, record = await store.create({"user": "alice", "team": "search"})
    other, _ = await store.create({"user": "alice"})
    assert key.startswith("mp-") and len(key) >= 3 + 43 and key != other  # 32 random bytes, base64url
    assert record.key_id == key_id_of(key) and record.key_hint == key[-4:]
    raw = stored_bytes(db.path)
    assert record.key_id.encode() in raw  # what is stored is there to be seen
    assert key.encode() not in raw and key[3:].encode() not in raw
    assert "key" not in record.public()
    assert key not in json.dumps(record.public())


async def test_lookup_is_served_from_memory_until_a_change_anywhere(store: KeyStore, db: ControlDB) -> None:
    key, record = await store.create({"user": "alice"})
    assert (await store.lookup(key)) == record
    # Another process (the CLI) revokes it: the cache still answers until the change counter is polled.
    other_process(db.path, "UPDATE api_keys SET revoked_at = 1 WHERE key_id = ?", (record.key_id,))
    cached = await store.lookup(key)
    assert cached is not None and cached.revoked_at is None
    assert await db.check_changes() is True
    found = await store.lookup(key)
    assert found is not None and found.status(0) == "revoked"
    assert await db.check_changes() is False


async def test_unknown_keys_are_none_and_a_revoke_here_is_seen_at_once(store: KeyStore) -> None:
    assert await store.lookup("mp-not-a-key") is None
    key, record = await store.create({"user": "bob"})
    assert (await store.lookup(key)) is not None
    revoked = await store.revoke(record.key_id, now=100.0)
    assert revoked is not None and revoked.revoked_at == 100.0
    again = await store.revoke(record.key_id, now=200.0)
    assert again is not None and again.revoked_at == 100.0  # the first revocation stands
    looked = await store.lookup(key)
    assert looked is not None and looked.status(150.0) == "revoked"
    assert await store.revoke("0" * 16) is None


async def test_update_changes_limits_and_null_clears(store: KeyStore) -> None:
    key, record = await store.create(parse_key_fields(
        {"user": "carol", "budget_usd": "10", "budget_period": "day", "rpm": 5, "models": ["gpt-4o*"]},
        creating=True))
    assert (record.budget_usd, record.budget_period, record.rpm, record.models) == (
        Decimal("10"), "day", 5, ("gpt-4o*",))
    updated = await store.update(record.key_id, parse_key_fields({"budget_usd": None, "tpm": 1000,
                                                                  "models": None}, creating=False))
    assert updated is not None
    assert (updated.budget_usd, updated.budget_period, updated.rpm, updated.tpm, updated.models) == (
        None, "day", 5, 1000, None)
    looked = await store.lookup(key)
    assert looked is not None and looked.tpm == 1000  # the cache dropped the old record
    assert await store.update("f" * 16, {"rpm": 1}) is None


@pytest.mark.parametrize("given,expected", [
    ('{"user": "a", "budget_usd": 0.1}', Decimal("0.1")),
    ('{"user": "a", "budget_usd": 12.3456789012345678901}', Decimal("12.3456789012345678901")),
    ('{"user": "a", "budget_usd": "2.50"}', Decimal("2.50")),
    ('{"user": "a", "budget_usd": 5}', Decimal(5)),
    ('{"user": "a", "budget_usd": 1e2}', Decimal(100)),
])
def test_money_is_read_exactly_from_json(given: str, expected: Decimal) -> None:
    fields = parse_key_fields(json.loads(given, parse_float=Decimal), creating=True)
    assert fields["budget_usd"] == expected and str(fields["budget_usd"]) == format(expected, "f")


@pytest.mark.parametrize("data,param", [
    ({"team": "x"}, "user"),
    ({"user": ""}, "user"),
    ({"user": "a", "budget_usd": True}, "budget_usd"),
    ({"user": "a", "budget_usd": "-1"}, "budget_usd"),
    ({"user": "a", "budget_usd": "NaN"}, "budget_usd"),
    ({"user": "a", "budget_usd": "ten"}, "budget_usd"),
    ({"user": "a", "budget_period": "week"}, "budget_period"),
    ({"user": "a", "rpm": 0}, "rpm"),
    ({"user": "a", "tpm": 1.5}, "tpm"),
    ({"user": "a", "models": []}, "models"),
    ({"user": "a", "models": "gpt-4o"}, "models"),
    ({"user": "a", "expires_at": "next week"}, "expires_at"),
    ({"user": "a", "colour": "red"}, "colour"),
    ({"user": None}, "user"),
    ({"user": "a\ud800b"}, "user"),  # a lone surrogate from JSON cannot be stored
    ({"user": "a" * 257}, "user"),
])
def test_bad_fields_name_the_field(data: dict[str, Any], param: str) -> None:
    with pytest.raises(ParameterError) as err:
        parse_key_fields(data, creating=True)
    assert err.value.param == param


async def test_expiry_and_allowed_models(store: KeyStore) -> None:
    _, record = await store.create(parse_key_fields(
        {"user": "dan", "expires_at": "2026-01-01T00:00:00Z", "models": ["gpt-4o-mini", "o3*"]}, creating=True))
    assert record.expires_at == 1767225600.0
    assert record.status(1767225599.0) == "active" and record.status(1767225600.0) == "expired"
    assert [record.allows(m) for m in ("gpt-4o-mini", "o3-mini", "gpt-4o", None)] == [True, True, False, False]


def test_cli_create_list_update_revoke(ledger_target: str, capsys: pytest.CaptureFixture[str]) -> None:
    db = ledger_target
    assert cli("keys", "create", "--db", db, "--user", "erin", "--team", "ml", "--budget-usd", "25.50",
               "--budget-period", "month", "--model", "gpt-4o*", "--rpm", "60", "--format", "json") == 0
    created = json.loads(capsys.readouterr().out)
    key, key_id = created["key"], created["key_id"]
    assert key_id == key_id_of(key) and created["budget_usd"] == "25.50" and created["spent_usd"] == "0"
    assert created["models"] == ["gpt-4o*"] and created["left_usd"] == "25.50"

    assert cli("keys", "update", key_id, "--db", db, "--budget-usd", "none", "--tpm", "5000",
               "--format", "json") == 0
    updated = json.loads(capsys.readouterr().out)
    assert updated["budget_usd"] is None and updated["tpm"] == 5000 and updated["rpm"] == 60
    assert "key" not in updated

    assert cli("keys", "revoke", key_id, "--db", db) == 0
    assert "revoked" in capsys.readouterr().out
    assert cli("keys", "list", "--db", db, "--active") == 0
    assert key_id not in capsys.readouterr().out
    assert cli("keys", "list", "--db", db) == 0
    table = capsys.readouterr().out
    assert key_id in table and key not in table


@pytest.mark.parametrize("argv,message", [
    (("keys", "show", "0123456789abcdef"), "no key"),
    (("keys", "create", "--user", "x", "--budget-usd", "lots"), "budget_usd"),
    (("keys", "create", "--user", "x", "--rpm", "-3"), "rpm"),
])
def test_cli_mistakes_are_one_line(ledger_target: str, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...],
                                   message: str) -> None:
    db = ledger_target
    assert cli("keys", "create", "--db", db, "--user", "seed") == 0
    capsys.readouterr()
    assert cli(*argv, "--db", db) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_cli_on_a_missing_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("keys", "list", "--db", str(tmp_path / "none.db")) == 2
    assert "none.db" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [("keys", "list"), ("keys", "show", "k1"), ("keys", "revoke", "k1"),
                                  ("budgets", "list")])
def test_cli_reads_on_an_empty_postgres_refuse_without_creating_the_schema(
        pg_url: str, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...]) -> None:
    assert cli(*argv, "--db", pg_url) == 2
    err = capsys.readouterr().err
    assert err.startswith("meterproxy: no meterproxy schema at ") and err.endswith("; run meterproxy migrate\n")
    assert err.count("\n") == 1
    assert query(pg_url, "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()")[0][0] == 0


async def test_money_and_times_are_stored_exactly(store: KeyStore) -> None:
    _, record = await store.create(parse_key_fields(
        {"user": "fay", "budget_usd": "12.3456789012345678901", "expires_at": 1767225600.25}, creating=True))
    again = await store.get(record.key_id)
    assert again is not None and again.budget_usd == Decimal("12.3456789012345678901")
    assert again.public()["budget_usd"] == "12.3456789012345678901" and again.expires_at == 1767225600.25
    _, cents = await store.create(parse_key_fields({"user": "fay", "budget_usd": "2.50"}, creating=True))
    assert (await store.get(cents.key_id)).public()["budget_usd"] == "2.50"  # type: ignore[union-attr]


# --- several replicas on one PostgreSQL ------------------------------------------------------------
async def _until(check: Any, timeout: float = 5.0) -> float:
    """Seconds until `await check()` is true (fails after `timeout`)."""
    start = time.monotonic()
    while not await check():
        assert time.monotonic() - start < timeout, "not seen in time"
        await asyncio.sleep(0.005)
    return time.monotonic() - start


async def test_a_revoke_on_one_replica_reaches_another_at_once_by_listen(pg_url: str) -> None:
    a, b = ControlDB(pg_url), ControlDB(pg_url)
    await a.open()
    await b.open()
    try:
        b.start_watch(interval=3600)  # no poll in the test's time: only the LISTEN connection can tell b
        await _until(lambda: _true(b.listening))
        keys_a, keys_b = KeyStore(a), KeyStore(b)
        key, record = await keys_a.create({"user": "alice"})
        assert (await keys_b.lookup(key)) is not None  # cached on b now
        await keys_a.revoke(record.key_id)

        async def revoked_on_b() -> bool:
            found = await keys_b.lookup(key)
            return found is not None and found.revoked_at is not None

        delay = await _until(revoked_on_b)
        assert delay < 1.0
        print(f"revoke seen by the other replica after {delay * 1000:.1f} ms")
    finally:
        await a.close()
        await b.close()


async def _true(value: bool) -> bool:
    return value


async def test_lost_connections_are_opened_again(pg_url: str, caplog: pytest.LogCaptureFixture) -> None:
    a, b = ControlDB(pg_url), ControlDB(pg_url)
    await a.open()
    await b.open()
    try:
        b.start_watch(interval=3600)
        await _until(lambda: _true(b.listening))
        keys_a, keys_b = KeyStore(a), KeyStore(b)
        key, record = await keys_a.create({"user": "alice"})
        assert await keys_b.lookup(key) is not None
        # The server ends every connection of b (as a restart or a network cut would).
        pids = [c.raw.info.backend_pid for c in (b._reader, b._writer) if c is not None]
        query(pg_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = ANY(?)"
                      " OR application_name = 'meterproxy control listen'", (pids,))
        await _until(lambda: _true(not b.listening))
        # A read and a write meet the dead connections: each is run again on a new one.
        assert (await keys_b.get(record.key_id)) is not None and b.down is None
        assert (await keys_b.update(record.key_id, {"rpm": 7})) is not None
        assert any("terminating connection" in r.getMessage() for r in caplog.records)
        # The LISTEN connection is back too: a revoke on a reaches b at once.
        await _until(lambda: _true(b.listening))
        await keys_a.revoke(record.key_id)

        async def revoked_on_b() -> bool:
            found = await keys_b.lookup(key)
            return found is not None and found.revoked_at is not None

        assert await _until(revoked_on_b) < 1.0
    finally:
        await a.close()
        await b.close()


async def test_an_unreachable_server_is_one_line_without_the_password() -> None:
    db = ControlDB("postgresql://meter:s3cret-pw@127.0.0.1:9/ledger", connect_timeout=2)
    with pytest.raises(ControlDBError) as err:
        await db.open()
    message = str(err.value)
    assert "s3cret-pw" not in message and "\n" not in message and "127.0.0.1" in message


async def test_while_the_database_is_down_cached_keys_work_and_the_rest_is_a_clear_error(
        pg_url: str, caplog: pytest.LogCaptureFixture) -> None:
    relay = Relay.to(pg_url)
    db = ControlDB(relay.url(pg_url), connect_timeout=1)
    await db.open()
    try:
        db.start_watch(interval=0.2)
        keys = KeyStore(db)
        gate = Gate(managed=True, keys=keys, limits=LimitStore(db), budgets=Budgets(db.path), rates=RateLimiter(),
                    prices=PriceTable.from_mapping({"models": {}}), counting=CountPolicy(),
                    upstream_key="sk-real")
        known, _ = await keys.create({"user": "alice"})
        other, _ = await keys.create({"user": "bob"})
        await asyncio.sleep(0.3)  # our own writes' notifications and the next poll drop the caches once more
        await db.check_changes()
        assert await keys.lookup(known) is not None
        relay.cut()
        # A cached key is still answered from memory; an uncached one is a 503, not a 500.
        assert not isinstance(await gate.resolve({"Authorization": f"Bearer {known}"}), Refusal)
        refused = await gate.resolve({"Authorization": f"Bearer {other}"})
        assert isinstance(refused, Refusal) and refused.status == 503, refused
        assert refused.body.startswith(b'{"error": {"message": "The key store is unreachable')
        with pytest.raises(ControlDBError) as err:
            await keys.create({"user": "carol"})
        assert "\n" not in str(err.value) and db.down is not None
        assert "Traceback" not in db.down
        relay.restore()
        # Back: the next statements reconnect.
        assert await keys.lookup(other) is not None
        assert db.down is None
        assert any("reachable again" in r.getMessage() for r in caplog.records)
    finally:
        await db.close()
        relay.close()


@pytest.mark.parametrize("command", [("keys", "list"), ("keys", "create", "--user", "a"), ("budgets", "list")])
def test_cli_on_an_unreachable_server_is_one_line_without_the_password(
        capsys: pytest.CaptureFixture[str], command: tuple[str, ...]) -> None:
    assert cli(*command, "--db", "postgresql://meter:s3cret-pw@127.0.0.1:9/ledger") == 2
    err = capsys.readouterr().err
    assert "s3cret-pw" not in err and "Traceback" not in err
    assert [line for line in err.splitlines() if "127.0.0.1" in line] == [err.splitlines()[-1]]  # one line says it
