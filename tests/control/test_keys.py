"""Managed keys: issued random and stored as a hash, looked up from memory, changed and revoked anywhere.

Real SQLite in tmp_path; the CLI is run in-process through its own parser.
"""

from __future__ import annotations

import json
import sqlite3
from decimal import Decimal
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from proxy.control.db import ControlDB
from proxy.control.keys import KeyStore, parse_key_fields
from proxy.control.limits import FieldError
from proxy.core.credentials import key_id_of
from tests.support.cli import cli


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[ControlDB]:
    control = ControlDB(tmp_path / "ledger.db")
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
    raw = Path(db.path).read_bytes() + Path(db.path + "-wal").read_bytes()
    assert key.encode() not in raw and key[3:].encode() not in raw
    assert "key" not in record.public()
    assert key not in json.dumps(record.public())


async def test_lookup_is_served_from_memory_until_a_change_anywhere(store: KeyStore, db: ControlDB) -> None:
    key, record = await store.create({"user": "alice"})
    assert (await store.lookup(key)) == record
    # Another process (the CLI) revokes it: the cache still answers until the change counter is polled.
    other = sqlite3.connect(db.path)
    other.execute("UPDATE api_keys SET revoked_at = 1 WHERE key_id = ?", (record.key_id,))
    other.commit()
    other.close()
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
    with pytest.raises(FieldError) as err:
        parse_key_fields(data, creating=True)
    assert err.value.param == param


async def test_expiry_and_allowed_models(store: KeyStore) -> None:
    _, record = await store.create(parse_key_fields(
        {"user": "dan", "expires_at": "2026-01-01T00:00:00Z", "models": ["gpt-4o-mini", "o3*"]}, creating=True))
    assert record.expires_at == 1767225600.0
    assert record.status(1767225599.0) == "active" and record.status(1767225600.0) == "expired"
    assert [record.allows(m) for m in ("gpt-4o-mini", "o3-mini", "gpt-4o", None)] == [True, True, False, False]


def test_cli_create_list_update_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "cli.db")
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
def test_cli_mistakes_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...],
                                   message: str) -> None:
    db = str(tmp_path / "cli.db")
    assert cli("keys", "create", "--db", db, "--user", "seed") == 0
    capsys.readouterr()
    assert cli(*argv, "--db", db) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_cli_on_a_missing_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("keys", "list", "--db", str(tmp_path / "none.db")) == 2
    assert "none.db" in capsys.readouterr().err
