"""The layout is the architecture: dependencies point one way (DESIGN §2)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("cityops", "ingest", "rules", "gateway", "control_api", "device_sim")
ALLOWED = {
    "cityops": set(),
    "ingest": {"cityops"},
    "rules": {"cityops"},
    "gateway": {"cityops", "ingest", "rules"},
    "control_api": {"cityops", "rules"},
    "device_sim": {"cityops"},
}


def imported_packages(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top in PACKAGES and top != package:
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_dependencies_point_one_way(package: str) -> None:
    forbidden = {k: v for k, v in imported_packages(package).items() if k not in ALLOWED[package]}
    assert forbidden == {}
