"""docs/architecture.md and the tree agree: every module it names exists, every module is named."""

from __future__ import annotations

import re

import pytest
from harness import ROOT

pytestmark = pytest.mark.unit

PACKAGE = ROOT / "procmqtt"


def test_architecture_names_every_module_and_only_real_ones() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    named = {m for m in re.findall(r"`((?:[a-z_]+/)?[a-z_0-9]+\.py)`", text) if not m.startswith("tests/")}
    modules = {
        str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")
    }
    assert not (named - modules), f"docs/architecture.md names modules that do not exist: {sorted(named - modules)}"
    assert not (modules - named), f"modules docs/architecture.md does not name: {sorted(modules - named)}"


def test_no_module_is_over_about_400_lines() -> None:
    long = {
        str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 430
    }
    assert not long, f"modules over ~400 lines: {long}"
