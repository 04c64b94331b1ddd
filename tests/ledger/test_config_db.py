"""The `db` setting: a SQLite path or a postgresql:// URL; the spool of a URL is a local file named after it."""

from __future__ import annotations

import pytest

from proxy.config import ConfigError, Settings, load_settings, spool_path


def test_a_postgres_url_is_taken_and_its_spool_is_local_and_named_without_the_password() -> None:
    url = "postgresql://meter:s3cret@db.internal:5432/ledger"
    settings = load_settings(None, {"db": url}, environ={})
    assert settings.db == url
    spool = spool_path(settings)
    assert spool.startswith("./meterproxy-") and spool.endswith(".spool.jsonl") and "s3cret" not in spool
    # The name comes from the URL as shown (no password): the same database, whatever the password.
    other = load_settings(None, {"db": "postgresql://meter:changed@db.internal:5432/ledger"}, environ={})
    assert spool_path(other) == spool
    assert spool_path(load_settings(None, {"db": "postgresql://meter@db.internal:5432/other"},
                                    environ={})) != spool


def test_a_sqlite_path_keeps_its_spool_beside_it() -> None:
    assert spool_path(Settings(db="/var/lib/meter/l.db")) == "/var/lib/meter/l.db.spool.jsonl"


@pytest.mark.parametrize("value", ["mysql://u@h/db", "sqlite:///x.db", "postgresql://u:pw-secret@h:notaport/db"])
def test_other_urls_are_refused_in_one_line(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(None, {"db": value}, environ={})
    assert "\n" not in str(caught.value) and "db" in str(caught.value) and "pw-secret" not in str(caught.value)
