"""proxy/config.py: every setting's default is written once (in SETTINGS), and every setting still works as a
config key and, when it is one, as a `serve` flag."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

import proxy.config
from proxy.config import SETTINGS, ConfigError, Settings, load_settings
from tests.support.cli import run_cli

NOT_SETTINGS = {"admin_token"}  # from the environment only


def test_every_setting_has_one_default_written_in_settings() -> None:
    tree = ast.parse(inspect.getsource(proxy.config))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Settings")
    fields = [n for n in cls.body if isinstance(n, ast.AnnAssign)]
    derived = {}
    for node in fields:
        assert isinstance(node.target, ast.Name)
        name = node.target.id
        if name in NOT_SETTINGS:
            continue
        value = node.value
        # the field's default is `_default("<its own name>")`: no literal restates the one in SETTINGS
        assert (isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "_default"
                and isinstance(value.args[0], ast.Constant) and value.args[0].value == name), name
        derived[name] = value
    assert sorted(derived) == sorted(s.name for s in SETTINGS)
    assert [f.name for f in dataclasses.fields(Settings)] == [n.target.id for n in fields]
    assert len({s.name for s in SETTINGS}) == len(SETTINGS)
    defaults = Settings()
    for setting in SETTINGS:
        assert getattr(defaults, setting.name) == setting.default, setting.name


def _yaml_value(value: object) -> object:
    if isinstance(value, tuple):
        return [_yaml_value(v) for v in value]
    if isinstance(value, Decimal):
        return float(value)
    return value


def test_every_setting_is_a_config_key_that_takes_its_default(tmp_path: Path) -> None:
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text(yaml.safe_dump({s.name: _yaml_value(s.default) for s in SETTINGS}))
    assert load_settings(str(cfg), environ={}) == Settings()
    cfg.write_text("port: 9191\nretention_days: 3\nstream_usage: inject\n")
    loaded = load_settings(str(cfg), {"port": "9292"}, environ={})
    assert (loaded.port, loaded.retention_days, loaded.stream_usage) == (9292, 3.0, "inject")
    assert loaded.host == Settings().host


def test_every_flag_setting_is_a_serve_flag() -> None:
    shown = run_cli("serve", "--help").stdout
    flags = [s for s in SETTINGS if s.flag]
    assert len(flags) >= 5
    for setting in flags:
        assert f"--{setting.name} " in shown, setting.name


@pytest.mark.parametrize(("content", "expected"), [
    ("rollup_pairs: ['model,user', [tag:team, operation], 'key, model', [user, model]]\n",
     (("model", "user"), ("operation", "team"), ("key_id", "model"))),
    ("rollup_pairs: []\n", ()),
    ("report_zones: [Asia/Kolkata, UTC, Asia/Kolkata]\n", ("Asia/Kolkata",)),
])  # fmt: skip
def test_rollup_pairs_and_report_zones(tmp_path: Path, content: str, expected: tuple[Any, ...]) -> None:
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text(content)
    loaded = load_settings(str(cfg), environ={})
    assert (loaded.report_zones if content.startswith("report_zones") else loaded.rollup_pairs) == expected


@pytest.mark.parametrize(("content", "problem"), [
    ("rollup_pairs: [user]\n", "'user' is not a pair of two of: key, model"),
    ("rollup_pairs: ['user,user']\n", "is not a pair"),
    ("rollup_pairs: ['user,session']\n", "is not a pair"),
    ("rollup_pairs: user,model\n", "must be a list of pairs"),
    ("report_zones: [Mars/Olympus]\n", "'Mars/Olympus' is not an IANA time zone name"),
    ("report_zones: Europe/Berlin\n", "must be a list of IANA time zone names"),
])  # fmt: skip
def test_bad_rollup_pairs_and_report_zones_are_one_clear_line(tmp_path: Path, content: str, problem: str) -> None:
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text(content)
    with pytest.raises(ConfigError, match=re.escape(problem)):
        load_settings(str(cfg), environ={})
