"""Running the meterproxy command line in tests: as a subprocess, or in-process for `keys` and `budgets`."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys

from proxy.cli.budgets import add_budgets_parser, run_budgets
from proxy.cli.keys import add_keys_parser, run_keys
from tests.support.paths import ROOT


def run_cli(*args: str, timeout: float = 30, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, **(env or {})})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the CLI --------------------------------------------------------------------------------------
def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="meterproxy")
    commands = parser.add_subparsers(dest="command", required=True)
    add_keys_parser(commands)
    add_budgets_parser(commands)
    args = parser.parse_args(list(argv))
    return run_keys(args) if args.command == "keys" else run_budgets(args)
