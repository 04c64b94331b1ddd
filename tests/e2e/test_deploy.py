"""docker-compose.yml: PostgreSQL with a volume and a health check, two meterproxy replicas on it, every secret
from the environment. `docker compose config` is not available here (no compose plugin), so the file is read
with PyYAML (which resolves the `<<` merge keys as compose does) and held to what deploying needs."""

from __future__ import annotations

import re
from typing import Any

import yaml

from proxy.cli.main import _parser
from proxy.config import load_settings
from proxy.ledger.target import parse_target
from tests.support.paths import ROOT


def compose() -> dict[str, Any]:
    loaded = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def replicas() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose()["services"].items() if name.startswith("meterproxy")}


def test_postgres_keeps_its_data_in_a_volume_and_has_a_health_check() -> None:
    doc = compose()
    pg = doc["services"]["postgres"]
    assert pg["image"].startswith("postgres:")
    (volume,) = pg["volumes"]
    name, path = volume.split(":")[:2]
    assert path == "/var/lib/postgresql/data" and name in doc["volumes"]
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert pg["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")


def test_two_replicas_on_the_database_each_with_a_health_check_on_healthz() -> None:
    services = replicas()
    assert len(services) >= 2
    ports = set()
    for name, service in services.items():
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy", name
        assert "/healthz" in " ".join(service["healthcheck"]["test"]), name
        assert service["build"] == "." and (ROOT / "Dockerfile").is_file()
        ports |= {p.rsplit(":", 1)[0] for p in service["ports"]}
        args = _parser().parse_args(service["command"][1:])  # the real `meterproxy serve` parser takes it
        assert args.command == "serve" and args.port == "8080" and args.host == "0.0.0.0"
        target = parse_target(args.db)
        assert target.is_postgres and "@postgres:" in target.where, name
        assert target.shown == target.where, f"{name}: a password written in the URL"
        mounts = dict(v.split(":")[1::-1] for v in service["volumes"])  # container path -> source
        config = mounts[args.config]
        settings = load_settings(str(ROOT / config), {"db": args.db})
        assert settings.spool is not None and settings.spool.startswith("/data/"), name
        assert "/data" in mounts and not mounts["/data"].startswith("."), f"{name}: the spool on a volume"
        assert service["stop_grace_period"] and int(service["stop_grace_period"].rstrip("s")) > (
            settings.shutdown_grace or 0), f"{name}: docker would kill it before in-flight calls finish"
    assert len(ports) == len(services), "each replica on a port of its own"
    spools = {next(v for v in s["volumes"] if v.endswith(":/data")) for s in services.values()}
    assert len(spools) == len(services), "each replica has a spool volume of its own"


def test_secrets_come_from_the_environment_only() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    for service in replicas().values():
        env = service["environment"]
        assert env["METERPROXY_ADMIN_TOKEN"] == "${METERPROXY_ADMIN_TOKEN:?set METERPROXY_ADMIN_TOKEN}"
        assert env["PGPASSWORD"].startswith("${POSTGRES_PASSWORD:?")
        for value in env.values():
            assert re.fullmatch(r"\$\{[A-Z_]+(:[?-][^}]*)?\}", value), value
    assert not re.search(r"postgres(ql)?://[^@\s]*:[^@\s]*@", text), "a password in a URL"
