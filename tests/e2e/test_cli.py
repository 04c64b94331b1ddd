"""The `meterproxy` command as an operator meets it: start-up, bad config, and `report`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from proxy.config import SETTINGS, ConfigError, load_settings
from tests.support import ADMIN_TOKEN, FakeUpstream, ProxyServer
from tests.support.cli import ROOT, free_port, run_cli


def test_flags_override_file_override_defaults(tmp_path: Path) -> None:
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text("port: 9001\nupstream: https://example.test/openai/\nidle_timeout: 5\n")
    settings = load_settings(str(cfg), {"port": "9002", "host": None},
                             environ={"METERPROXY_ADMIN_TOKEN": "s3cr3t-admin"})
    assert (settings.port, settings.upstream, settings.idle_timeout) == (9002, "https://example.test/openai", 5.0)
    assert settings.host == "127.0.0.1" and settings.admin_token == "s3cr3t-admin"
    assert "s3cr3t-admin" not in repr(settings)  # the token is kept out of logs that print settings


@pytest.mark.parametrize("content,problem", [
    ("colour: blue\n", "unknown setting 'colour'"),
    ("upstream: ftp://x\n", "must be an http(s) URL with a host"),
    ("port: 99999\n", "setting 'port' must be a whole number"),
    ("port: [1\n", "YAML error at line"),
    ("- a\n- b\n", "must be a mapping"),
])
def test_bad_config_is_one_clear_line(tmp_path: Path, content: str, problem: str) -> None:
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text(content)
    with pytest.raises(ConfigError, match=re.escape(problem)):
        load_settings(str(cfg))
    result = run_cli("serve", "--config", str(cfg))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(cfg) in lines[0] and problem in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args,needle", [
    (["--pricing", "/nonexistent/pricing.yaml"], "/nonexistent/pricing.yaml"),
    (["--db", "/nonexistent/dir/ledger.db"], "/nonexistent/dir/ledger.db"),
    (["--config", "/nonexistent/proxy.yaml"], "/nonexistent/proxy.yaml"),
])
def test_unusable_files_stop_startup_with_one_line(args: list[str], needle: str) -> None:
    result = run_cli("serve", "--port", str(free_port()), *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_serve_runs_until_sigterm(tmp_path: Path, upstream: FakeUpstream) -> None:
    port = free_port()
    db = tmp_path / "served.db"
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--port", str(port), "--db", str(db),
                             "--upstream", upstream.url], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "METERPROXY_ADMIN_TOKEN": ADMIN_TOKEN})
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
                    assert json.load(resp)["status"] == "ok"
                    break
            except OSError:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "proxy did not become ready"
                time.sleep(0.1)
        upstream.json({"model": "gpt-4o", "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}})
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", method="POST",
                                     data=b'{"model": "gpt-4o"}', headers={"Authorization": "Bearer sk-abcdefgh"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "sk-abcdefgh" not in err
    report = run_cli("report", "--db", str(db), "--format", "json")
    assert json.loads(report.stdout)["totals"]["total_tokens"] == 3


def test_report_formats(proxy: ProxyServer, upstream: FakeUpstream) -> None:
    from tests.support.http import request

    for key, model, tokens in [("sk-aaaa-1111", "gpt-4o", 100), ("sk-bbbb-2222", "gpt-4o-mini", 1000),
                               ("sk-aaaa-1111", "gpt-4o-mini", 10)]:
        upstream.json({"model": model, "usage": {"prompt_tokens": tokens, "completion_tokens": tokens,
                                                 "total_tokens": 2 * tokens}})
        request(proxy.url, headers={"Authorization": f"Bearer {key}"}, body=json.dumps({"model": model}).encode())
    db = proxy.settings.db
    as_json = json.loads(run_cli("report", "--db", db, "--group-by", "key,model", "--format", "json").stdout)
    assert len(as_json["rows"]) == 3
    # 100 * 2.5 + 100 * 10 + (1000 + 10) * 0.15 + (1000 + 10) * 0.6 per 1M
    assert as_json["totals"]["cost_usd"] == "0.0020075"
    table = run_cli("report", "--db", db, "--group-by", "model")
    assert table.returncode == 0 and "gpt-4o-mini" in table.stdout and "0.0020075" in table.stdout
    csv_text = run_cli("report", "--db", db, "--group-by", "key", "--format", "csv").stdout
    assert csv_text.splitlines()[0].startswith("key_id") and len(csv_text.splitlines()) == 4
    bad = run_cli("report", "--db", db, "--group-by", "colour")
    assert bad.returncode == 2 and "group_by" in bad.stderr and "Traceback" not in bad.stderr
    missing = run_cli("report", "--db", "/nonexistent/x.db")
    assert missing.returncode == 2 and "/nonexistent/x.db" in missing.stderr


def test_every_setting_is_documented() -> None:
    readme = (ROOT / "README.md").read_text()
    shipped = (ROOT / "config" / "proxy.yaml").read_text()
    for setting in SETTINGS:
        assert f"`{setting.name}`" in readme, f"README does not document {setting.name}"
        assert f"# {setting.name}:" in shipped, f"config/proxy.yaml does not show {setting.name}"


def test_admin_api_on_its_own_address(tmp_path: Path) -> None:
    port, admin_port = free_port(), free_port()
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text(f"port: {port}\nadmin_port: {admin_port}\ndb: {tmp_path / 'a.db'}\n")
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(cfg)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "METERPROXY_ADMIN_TOKEN": ADMIN_TOKEN})

    def get(p: int, path: str) -> int:
        req = urllib.request.Request(f"http://127.0.0.1:{p}{path}",
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        try:
            with urllib.request.urlopen(req, timeout=2) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                assert get(admin_port, "/admin/usage") == 200
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        assert get(port, "/admin/usage") == 404  # not on the proxy's port
        assert get(port, "/metrics") == 404  # metrics (models, costs) go with the admin API
        assert get(admin_port, "/metrics") == 200
        assert get(admin_port, "/admin/ui/login") == 200  # the dashboard is where the admin API is
        assert get(port, "/admin/ui/login") == 404
        assert get(port, "/meter/ui/login") == 200  # a key holder's page stays on the proxy's port
        assert get(port, "/healthz") == 200
    finally:
        proc.terminate()
        proc.communicate(timeout=20)
