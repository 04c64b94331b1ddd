"""What a new user and an operator meet first (issue 12): the CLI as a Unix tool, messages that say what
to fix, /healthz and logs that tell the truth, and the bugs they hit. Real processes, real HTTP on loopback."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import pkgutil
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

import proxy
from proxy.cli import main as cli
from proxy.core.record import CallRecord
from proxy.counting import count_text, get_encoding
from proxy.metering.logs import CallLogs
from tests.support import ADMIN_TOKEN, FakeUpstream, ProxyServer
from tests.support.cli import free_port, run_cli
from tests.support.http import request
from tests.support.ledger import call, write_calls
from tests.support.paths import ROOT

USAGE = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}


def http(method: str, url: str, token: str | None = ADMIN_TOKEN, body: bytes | None = None
         ) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(url, method=method, data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


class Served:
    """`meterproxy serve` in its own process; stop() returns what it wrote on stderr."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--port", str(self.port), *args],
                                     cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": str(ROOT), "METERPROXY_ADMIN_TOKEN": ADMIN_TOKEN,
                                          **(env or {})})
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                assert self.proc.poll() is None, self.proc.communicate()
                assert time.monotonic() < deadline, "the proxy did not start"
                time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> str:
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=30)
        return err


def big_ledger(path: Path, n: int = 20000) -> str:
    write_calls(path, [call(i, "2026-11-23 12:00:00", user=f"user-{i}", cost_usd=Decimal("0.001"))
                       for i in range(1, n + 1)])
    return str(path)


# --- bugs ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [["export"], ["export", "--format", "csv"], ["report", "--group-by", "user",
                                                                            "--format", "json"]])
def test_a_closed_pipe_ends_the_command_quietly(tmp_path: Path, args: list[str]) -> None:
    db = big_ledger(tmp_path / "big.db")
    proc = subprocess.Popen([sys.executable, "-m", "proxy", *args, "--db", db], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline()  # read one line, as `| head -1` does, and go away
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=60) == cli.SIGPIPE_STATUS, err
    assert err == ""  # no traceback, no "Cannot operate on a closed database"


def test_read_only_commands_need_no_upstream_key_under_managed_keys(tmp_path: Path) -> None:
    db = big_ledger(tmp_path / "ledger.db", n=3)
    cfg = tmp_path / "managed.yaml"
    cfg.write_text(f"keys: managed\ndb: {db}\n")
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    for args in (["report"], ["export"], ["accuracy"], ["reprice", "--dry-run"], ["keys", "list"],
                 ["budgets", "list"]):
        result = subprocess.run([sys.executable, "-m", "proxy", *args, "--config", str(cfg)], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, (args, result.stderr)
    served = subprocess.run([sys.executable, "-m", "proxy", "serve", "--config", str(cfg)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert served.returncode == 2 and "OPENAI_API_KEY" in served.stderr  # serving does need it


def test_accuracy_of_a_non_streamed_responses_call(start_proxy: Callable[..., ProxyServer],
                                                   upstream: FakeUpstream) -> None:
    proxy_ = start_proxy(accuracy_sample_rate=1.0)
    text = "The capital of France is Paris, a city on the Seine."
    upstream.json({"id": "resp_1", "object": "response", "status": "completed", "model": "gpt-4o",
                   "output": [{"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
                               "content": [{"type": "output_text", "text": text, "annotations": []}]}],
                   "usage": {"input_tokens": 12, "output_tokens": 13, "total_tokens": 25}})
    status, _, _ = request(proxy_.url, path="/v1/responses", body=b'{"model": "gpt-4o", "input": "Capital?"}')
    assert status == 200
    (row,) = proxy_.rows()
    assert row["usage_source"] == "upstream" and row["completion_tokens"] == 13
    assert row["counted_completion_tokens"] == count_text(get_encoding("o200k_base"), text) > 0


def test_a_failed_start_leaves_no_database_behind(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "--port", str(port), "--db", str(tmp_path / "new.db"))
    assert result.returncode == 2 and str(port) in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("meterproxy: "), result.stderr
    assert "address already in use" in result.stderr.strip().splitlines()[-1]
    assert sorted(os.listdir(tmp_path)) == []  # no new.db, -wal, -shm, spool or spool reserve


def test_a_failed_start_keeps_an_existing_database(tmp_path: Path) -> None:
    db = big_ledger(tmp_path / "old.db", n=2)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert run_cli("serve", "--port", str(taken.getsockname()[1]), "--db", db).returncode == 2
    assert os.path.getsize(db) > 0 and json.loads(run_cli("report", "--db", db, "--format", "json").stdout)[
        "totals"]["calls"] == 2


def _immutable(*paths: Path) -> None:
    result = subprocess.run(["chattr", "+i", *map(str, paths)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot make files immutable here ({result.stderr.strip()})")


def test_a_read_only_ledger_is_said_at_start_and_on_healthz(tmp_path: Path, upstream: FakeUpstream) -> None:
    db = tmp_path / "ro.db"
    Served(["--db", str(db), "--upstream", upstream.url], cwd=tmp_path).stop()  # a ledger made by a proxy
    _immutable(db)
    served = None
    try:
        served = Served(["--db", str(db), "--upstream", upstream.url], cwd=tmp_path)
        status, health = http("GET", f"{served.url}/healthz", token=None)
        assert status == 200 and health["status"] == "degraded" and health["ledger"] == "spooling"
        assert "readonly" in health["reason"] and "spool" in health["reason"]
        upstream.json({"model": "gpt-4o", "usage": USAGE})
        assert request(served.url)[0] == 200
        assert http("GET", f"{served.url}/healthz", token=None)[1]["spool_depth"] == 1
        metrics_req = urllib.request.Request(f"{served.url}/metrics",
                                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        with urllib.request.urlopen(metrics_req, timeout=10) as resp:
            metrics = resp.read().decode()
        assert "meterproxy_ledger_spool_depth 1.0" in metrics and "meterproxy_ledger_accepting 0.0" in metrics
    finally:
        err = served.stop() if served is not None else ""
        subprocess.run(["chattr", "-i", str(db)], check=True)
    start_lines = [line for line in err.splitlines() if "does not accept writes" in line]
    assert len(start_lines) == 1 and "WARNING" in start_lines[0] and str(db) in start_lines[0]
    assert any("WARNING" in line and "spooled" in line for line in err.splitlines()), err


def test_healthz_is_ok_while_the_ledger_takes_rows(proxy: ProxyServer) -> None:
    assert http("GET", f"{proxy.url}/healthz", token=None) == (
        200, {"status": "ok", "backend": "sqlite", "db": proxy.settings.db})


# --- the CLI as a Unix tool -----------------------------------------------------------------------------
def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"meterproxy {proxy.__version__}"


@pytest.mark.parametrize("args,usage", [
    (["report", "--bogus"], "usage: meterproxy report"),
    (["keys", "list", "--bogus"], "usage: meterproxy keys list"),
    (["keys", "create", "--user", "a", "--bogus"], "usage: meterproxy keys create"),
    (["budgets", "set", "user", "a", "--bogus"], "usage: meterproxy budgets set"),
    (["export", "--bogus"], "usage: meterproxy export"),
])
def test_an_unknown_flag_prints_its_subcommands_usage(args: list[str], usage: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2 and result.stderr.startswith(usage), result.stderr
    assert "unrecognized arguments: --bogus" in result.stderr


def _parsers(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield parser.prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_help_is_plain_and_complete() -> None:
    top = run_cli("--help").stdout
    assert "`" not in top
    parser = cli._parser()
    for prog, sub in _parsers(parser):
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    assert choice.help and "`" not in choice.help, f"{prog} {choice.dest}"
                continue
            assert action.help, f"{prog} {action.option_strings or action.dest} has no help"
            assert "`" not in action.help, f"{prog} {action.dest}"
            said = re.findall(r"\(default|default:", action.help.lower())
            assert len(said) <= 1, f"{prog} {action.dest}: {action.help}"
    for name in ("serve", "report", "keys", "budgets", "reprice", "export", "accuracy"):
        assert f"\n    {name} " in top, f"--help does not name {name}"


def test_budgets_commands_mirror_the_admin_api(tmp_path: Path, upstream: FakeUpstream) -> None:
    db = str(tmp_path / "b.db")
    made = run_cli("budgets", "set", "team", "search", "--budget-usd", "500.25", "--budget-period", "day",
                   "--rpm", "60", "--db", db, "--format", "json")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["budget_usd"] == "500.25"
    served = Served(["--db", db, "--upstream", upstream.url], cwd=tmp_path)
    try:
        status, listed = http("GET", f"{served.url}/admin/budgets")
        assert status == 200
        assert [(b["kind"], b["name"], b["budget_usd"], b["period"], b["rpm"]) for b in listed["budgets"]] == [
            ("team", "search", "500.25", "day", 60)]
        assert http("PUT", f"{served.url}/admin/budgets/user/alice", body=b'{"budget_usd": "5"}')[0] == 200
        table = run_cli("budgets", "list", "--db", db)
        assert table.returncode == 0 and "alice" in table.stdout and "500.25" in table.stdout
        assert run_cli("budgets", "delete", "team", "search", "--db", db).returncode == 0
        # The running proxy polls the file: the deletion reaches it within about a second.
        deadline = time.monotonic() + 15
        while len(http("GET", f"{served.url}/admin/budgets")[1]["budgets"]) != 1:
            assert time.monotonic() < deadline, "the proxy did not pick up the CLI's change"
            time.sleep(0.2)
        assert http("DELETE", f"{served.url}/admin/budgets/user/alice")[0] == 200
        assert http("DELETE", f"{served.url}/admin/budgets/user/alice")[0] == 404
    finally:
        served.stop()
    again = run_cli("budgets", "delete", "team", "search", "--db", db)
    assert again.returncode == 2 and "no limits" in again.stderr
    bad = run_cli("budgets", "set", "user", "bob", "--budget-usd", "lots", "--db", db)
    assert bad.returncode == 2 and "budget_usd" in bad.stderr and "Traceback" not in bad.stderr


def test_keys_create_warns_under_a_passthrough_config(tmp_path: Path) -> None:
    passthrough, managed = tmp_path / "p.yaml", tmp_path / "m.yaml"
    passthrough.write_text(f"db: {tmp_path / 'k.db'}\n")
    managed.write_text(f"db: {tmp_path / 'k.db'}\nkeys: managed\n")
    warned = run_cli("keys", "create", "--user", "alice", "--config", str(passthrough))
    assert warned.returncode == 0 and "mp-" in warned.stdout
    assert "keys: passthrough" in warned.stderr and "keys: managed" in warned.stderr
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    quiet = subprocess.run([sys.executable, "-m", "proxy", "keys", "create", "--user", "bob", "--config",
                            str(managed)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_accuracy_with_nothing_sampled_says_so(tmp_path: Path) -> None:
    db = big_ledger(tmp_path / "a.db", n=2)
    result = run_cli("accuracy", "--db", db)
    assert result.returncode == 0 and "no calls sampled" in result.stdout
    assert "accuracy_sample_rate" in result.stdout


# --- messages that say what to fix ----------------------------------------------------------------------
@pytest.mark.parametrize("args", [["serve"], ["keys", "create", "--user", "a"], ["budgets", "set", "user", "a"]])
def test_a_missing_database_directory_is_named(tmp_path: Path, args: list[str]) -> None:
    result = run_cli(*args, "--db", str(tmp_path / "nowhere" / "ledger.db"))
    assert result.returncode == 2
    assert f"the directory {tmp_path / 'nowhere'} does not exist" in result.stderr, result.stderr


def test_an_upstream_ending_in_v1_is_warned_about(tmp_path: Path, upstream: FakeUpstream) -> None:
    served = Served(["--db", str(tmp_path / "v.db"), "--upstream", f"{upstream.url}/v1"], cwd=tmp_path)
    err = served.stop()
    assert any("WARNING" in line and "/v1/v1/" in line for line in err.splitlines()), err
    clean = Served(["--db", str(tmp_path / "v.db"), "--upstream", upstream.url], cwd=tmp_path)
    assert "/v1/v1/" not in clean.stop()


@pytest.mark.parametrize("path,param", [
    ("/admin/usage?groupby=model", "groupby"),
    ("/admin/usage?group_by=model&sinse=2026-01-01", "sinse"),
    ("/admin/calls?limt=5", "limt"),
    ("/admin/accuracy?modle=gpt-4o", "modle"),
    ("/admin/budgets?kind=user", "kind"),
    ("/admin/budgets/user/alice?full=1", "full"),
    ("/admin/pricing?verbose=1", "verbose"),
    ("/meter/usage?from=2026-01-01", "from"),
])
def test_admin_reads_refuse_an_unknown_parameter(proxy: ProxyServer, path: str, param: str) -> None:
    status, body = http("GET", f"{proxy.url}{path}", token=ADMIN_TOKEN if path.startswith("/admin") else None)
    if path.startswith("/meter"):
        req = urllib.request.Request(f"{proxy.url}{path}", headers={"Authorization": "Bearer sk-some-client-key"})
        try:
            urllib.request.urlopen(req, timeout=10)
            raise AssertionError("accepted")
        except urllib.error.HTTPError as exc:
            status, body = exc.code, json.load(exc)
    assert status == 400 and body["error"]["param"] == param and param in body["error"]["message"]
    assert body["error"]["code"] == "unknown_parameter"


def test_known_parameters_still_work(proxy: ProxyServer) -> None:
    assert http("GET", f"{proxy.url}/admin/usage?group_by=model&since=2026-01-01&format=json")[0] == 200
    assert http("GET", f"{proxy.url}/admin/calls?limit=5")[0] == 200
    assert http("GET", f"{proxy.url}/admin/calls?limit=5&key=k&user=a&model=m&status=200&usage_source=upstream"
                )[0] == 200
    assert http("GET", f"{proxy.url}/admin/accuracy?since=2026-01-01&until=2026-02-01&model=m")[0] == 200
    assert http("GET", f"{proxy.url}/admin/budgets")[0] == 200 and http("GET", f"{proxy.url}/admin/pricing")[0] == 200


def test_every_404_is_openai_shaped_and_names_its_port(tmp_path: Path, upstream: FakeUpstream) -> None:
    cfg = tmp_path / "p.yaml"
    admin_port = free_port()
    cfg.write_text(f"admin_port: {admin_port}\ndb: {tmp_path / 'n.db'}\nupstream: {upstream.url}\n")
    served = Served(["--config", str(cfg)], cwd=tmp_path)
    try:
        admin = f"http://127.0.0.1:{admin_port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(urllib.request.Request(
                    f"{admin}/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}), timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        for url, token, names in [
            (f"{served.url}/nope", None, "the proxy forwards /v1/"),
            (f"{served.url}/admin", ADMIN_TOKEN, "admin port"),
            (f"{served.url}/admin/usage", ADMIN_TOKEN, "admin port"),
            (f"{admin}/nope", None, "the admin port serves /admin/"),
            (f"{admin}/admin/nope", ADMIN_TOKEN, "/admin/usage"),
            (f"{admin}/admin", None, "/admin/usage"),
        ]:
            status, body = http("GET", url, token=token)
            assert status == 404, url
            assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["code"] == "not_found"
            assert names in body["error"]["message"], (url, body)
            assert "the proxy forwards" not in body["error"]["message"] or url.startswith(served.url), url
    finally:
        served.stop()


# --- logs ----------------------------------------------------------------------------------------------
def test_every_logger_is_under_meterproxy() -> None:
    for module in pkgutil.walk_packages(proxy.__path__, "proxy."):
        if module.name != "proxy.__main__":
            importlib.import_module(module.name)
    stray = [name for name in logging.Logger.manager.loggerDict if name == "proxy" or name.startswith("proxy.")]
    assert stray == []


def test_access_log_is_one_json_line_per_call_without_secrets(tmp_path: Path, upstream: FakeUpstream) -> None:
    secret = "sk-never-in-a-log-0123456789"
    served = Served(["--db", str(tmp_path / "a.db"), "--upstream", upstream.url, "--access-log",
                     "--log-level", "ERROR"], cwd=tmp_path)
    try:
        upstream.json({"model": "gpt-4o-mini", "usage": USAGE, "choices": [{"message": {"content": "SECRET-BODY"}}]})
        for _ in range(3):
            status, _, _ = request(served.url, headers={"Authorization": f"Bearer {secret}", "X-Meter-User": "alice"})
            assert status == 200
    finally:
        err = served.stop()
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert len(lines) == 3, err
    first = lines[0]
    assert {"request_id", "key_id", "user", "model", "status", "latency_ms", "cost_usd"} <= first.keys()
    assert (first["user"], first["model"], first["status"], first["cost_usd"]) == ("alice", "gpt-4o-mini", 200,
                                                                                  "0.00000495")
    assert secret not in err and secret[-4:] + '"' not in err and "SECRET-BODY" not in err


def test_access_log_is_off_by_default(tmp_path: Path, upstream: FakeUpstream) -> None:
    served = Served(["--db", str(tmp_path / "a.db"), "--upstream", upstream.url], cwd=tmp_path)
    try:
        upstream.json({"model": "gpt-4o-mini", "usage": USAGE})
        assert request(served.url)[0] == 200
    finally:
        err = served.stop()
    assert not [line for line in err.splitlines() if line.startswith("{")]


def test_an_unreachable_upstream_is_warned_once_per_burst(start_proxy: Callable[..., ProxyServer],
                                                          caplog: pytest.LogCaptureFixture) -> None:
    proxy_ = start_proxy(upstream=f"http://127.0.0.1:{free_port()}")
    with caplog.at_level(logging.WARNING, logger="meterproxy"):
        for _ in range(5):
            assert request(proxy_.url)[0] == 502
    said = [r for r in caplog.records if r.getMessage().startswith("Upstream unreachable")
            and r.levelno == logging.WARNING]
    assert len(said) == 1 and said[0].name.startswith("meterproxy")


def test_an_unpriced_model_is_warned_once(proxy: ProxyServer, upstream: FakeUpstream,
                                          caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="meterproxy"):
        for model in ("mystery-model", "mystery-model", "mystery-model", "other-mystery"):
            upstream.json({"model": model, "usage": USAGE})
            assert request(proxy.url, body=json.dumps({"model": model}).encode())[0] == 200
    said = [r.getMessage() for r in caplog.records if "has no price" in r.getMessage()]
    assert len(said) == 2 and '"mystery-model"' in said[0] and '"other-mystery"' in said[1]


def _record(error: str | None = None, answered: bool = False, priced: bool = True) -> CallRecord:
    rec = CallRecord(request_id="r", started_at=0.0, method="POST", endpoint="/v1/chat/completions",
                     status=502 if error else 200, error=error, priced=priced, model="m")
    rec.ttfb_ms = 1.0 if answered else None
    return rec


def test_call_logs_say_a_long_outage_once_a_minute_and_its_end(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    logs = CallLogs(clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="meterproxy"):
        for second in range(0, 150, 5):  # a call every 5 s for 150 s, all failing
            now[0] = float(second)
            logs.observe(_record(error="Upstream unreachable: Cannot connect to host"))
        now[0] = 151.0
        logs.observe(_record(answered=True))
        logs.observe(_record(answered=True))
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 4, said  # at 0 s, 60 s, 120 s, and once when it answers
    assert "still unreachable: 13 call(s)" in said[1] and "answers again after 30 failed call(s)" in said[3]


def test_call_logs_say_an_unpriced_model_again_after_an_hour(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    logs = CallLogs(clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="meterproxy"):
        for at in (0.0, 10.0, 3599.0, 3600.0):
            now[0] = at
            logs.observe(_record(priced=False))
        for i in range(5000):  # made-up names: memory stays bounded
            logs.observe(CallRecord(request_id="r", started_at=0.0, method="POST", endpoint="/v1/x", status=200,
                                    model=f"junk-{i}"))
    assert sum("'m'" in r.getMessage() or '"m"' in r.getMessage() for r in caplog.records) == 2
    assert len(logs._unpriced) <= 1000


def test_404s_on_a_shared_port(proxy: ProxyServer) -> None:
    for path, token, names in [("/admin", None, "/admin/usage"), ("/nope", None, "/admin/..."),
                               ("/admin/nope", ADMIN_TOKEN, "/admin/budgets/{kind}/{name}")]:
        status, body = http("GET", f"{proxy.url}{path}", token=token)
        assert status == 404 and body["error"]["code"] == "not_found" and names in body["error"]["message"], body
        assert "/admin/admin" not in body["error"]["message"]


def test_the_ledgers_write_probe_keeps_the_schema_version(tmp_path: Path) -> None:
    """The probe the writer runs while rows wait (`replay([])`) once wrote `PRAGMA user_version =
    user_version`, which SQLite reads as 0: it reset the schema version of the ledger it probed."""
    import sqlite3

    from proxy.ledger.db import LedgerDB

    db = LedgerDB(str(tmp_path / "v.db"), 5000)
    db.open()
    try:
        (before,) = sqlite3.connect(db.path).execute("PRAGMA user_version").fetchone()
        assert before > 0 and db.refuses_writes() is None
        db.replay([])
        assert sqlite3.connect(db.path).execute("PRAGMA user_version").fetchone() == (before,)
    finally:
        db.close()
