"""`.ci/run` runs the README's test command verbatim (the README says so): the two must not drift."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _command(lines: list[str], first: str) -> str:
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(first))
    out = []
    for line in lines[start:]:
        out.append(line.strip().removesuffix("\\").strip())
        if not line.rstrip().endswith("\\"):
            return " ".join(out)
    raise AssertionError("the command's last line is missing")


def test_ci_runs_the_readmes_test_command() -> None:
    readme = (ROOT / "README.md").read_text().splitlines()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    at = next(i for i, line in enumerate(readme) if "this is exactly what `.ci/run` runs" in line)
    documented = _command(readme[at + 1:], "python3 -m venv")
    assert documented == _command(ci, "python3 -m venv")
    for step in ("lint-imports", "ruff check proxy tests bench", "mypy", "python -m pytest -q"):
        assert f"&& {step}" in documented
