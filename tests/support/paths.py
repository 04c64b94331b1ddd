"""Where tests find the repository and the team's shared reference data, on any machine."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout: pyproject.toml, config/, proxy/
SHIPPED_PRICING = ROOT / "config" / "pricing.yaml"


def _shared() -> Path:
    """The team's shared/ folder (reference captures): beside the checkout, else this machine's /work/shared
    (a clean clone elsewhere, as CI may make)."""
    for candidate in (ROOT.parent / "shared", Path("/work/shared")):
        if candidate.is_dir():
            return candidate
    return ROOT.parent / "shared"


SHARED = _shared()
CAPTURES = SHARED / "reference" / "streams" / "openai-python"  # real gpt-4o streams with their real usage
