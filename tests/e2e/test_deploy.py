"""docker-compose.yml: PostgreSQL with a volume and a health check, two meterproxy replicas on it, every secret
from the environment. The file is read with PyYAML (which resolves the `<<` merge keys as compose does) and
held to what deploying needs; and `docker-compose config` (Debian's docker-compose, installed by .ci/run)
resolves it as compose itself does: it skips where the command is absent, except under CI=true."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import Any

import pytest
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


def test_docker_compose_config_resolves_it_and_requires_the_secrets() -> None:
    command = shutil.which("docker-compose")
    if command is None:
        if os.environ.get("CI") == "true":
            pytest.fail("docker-compose not found: under CI the deploy check must run (.ci/run installs it)")
        pytest.skip("docker-compose not installed (apt-get install -y docker-compose)")
    env = {k: v for k, v in os.environ.items() if k not in ("POSTGRES_PASSWORD", "METERPROXY_ADMIN_TOKEN")}
    secrets = {"POSTGRES_PASSWORD": "pg-secret-1234", "METERPROXY_ADMIN_TOKEN": "admin-secret-5678"}
    run = subprocess.run([command, "-f", "docker-compose.yml", "config"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, env={**env, **secrets})
    assert run.returncode == 0, run.stderr
    resolved = yaml.safe_load(run.stdout)
    services = resolved["services"]
    names = sorted(n for n in services if n.startswith("meterproxy"))
    assert len(names) >= 2 and "postgres" in services
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == secrets["POSTGRES_PASSWORD"]
    for name in names:
        service = services[name]
        assert service["environment"]["METERPROXY_ADMIN_TOKEN"] == secrets["METERPROXY_ADMIN_TOKEN"], name
        assert service["environment"]["PGPASSWORD"] == secrets["POSTGRES_PASSWORD"], name
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy", name
        assert secrets["POSTGRES_PASSWORD"] not in " ".join(service["command"]), f"{name}: password in argv"
        assert any(v.endswith(":/data:rw") or v.endswith(":/data") for v in service["volumes"]), name
    assert {"pgdata", "spool-1", "spool-2"} <= set(resolved["volumes"]), "named volumes for the data and spools"
    # Without the secrets compose refuses, naming the one missing.
    missing = subprocess.run([command, "-f", "docker-compose.yml", "config"], cwd=ROOT, capture_output=True,
                             text=True, timeout=60, env={**env, "METERPROXY_ADMIN_TOKEN": "x"})
    assert missing.returncode != 0 and "POSTGRES_PASSWORD" in missing.stderr
