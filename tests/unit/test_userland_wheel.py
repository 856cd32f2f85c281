"""airlock-userland, the wheel code-location images install: the same bytes from the same sources, the files
userland needs, and a declared dependency for every third-party module userland reaches (a run worker on an
image without httpx failed with ModuleNotFoundError before this was checked)."""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import re
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "images"))

from userland_wheel import REQUIRES, build_wheel  # noqa: E402


def test_the_wheel_is_reproducible_and_holds_userland_and_protocol(tmp_path: Path) -> None:
    first, second = build_wheel(tmp_path / "a"), build_wheel(tmp_path / "b")
    assert hashlib.sha256(first.read_bytes()).digest() == hashlib.sha256(second.read_bytes()).digest()
    names = zipfile.ZipFile(first).namelist()
    assert "userland/storage.py" in names and "protocol/storage_codec.py" in names
    metadata = zipfile.ZipFile(first).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "Name: airlock-userland" in metadata and "Requires-Dist: httpx" in metadata


def _third_party_imports(module: str, seen: set[str]) -> set[str]:
    """Top-level third-party modules `module` imports, following the project's own imports."""
    if module in seen:
        return set()
    seen.add(module)
    path = ROOT / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
        for name in names:
            top = name.split(".")[0]
            if top in ("userland", "protocol"):
                target = name if (ROOT / Path(*name.split("."))).with_suffix(".py").exists() or \
                    (ROOT / Path(*name.split("."))).is_dir() else name.rsplit(".", 1)[0]
                found |= _third_party_imports(target, seen)
            elif top not in sys.stdlib_module_names and top != "__future__":
                found.add(top)
    return found


def test_every_third_party_module_userland_reaches_is_a_declared_dependency() -> None:
    reached = set()
    seen: set[str] = set()
    for path in (ROOT / "userland").glob("*.py"):
        reached |= _third_party_imports(f"userland.{path.stem}" if path.stem != "__init__" else "userland", seen)
    declared = {re.split(r"[<>=!~ ;\[]", r)[0].lower() for r in REQUIRES}
    through_dagster = {re.split(r"[<>=!~ ;\[]", r)[0].lower().replace("-", "_")
                       for r in importlib.metadata.requires("dagster") or [] if "extra ==" not in r}
    module_of = {"yaml": "pyyaml", "dagster_shared": "dagster-shared"}
    missing = sorted(m for m in reached if m not in declared and module_of.get(m, m).replace("-", "_")
                     not in through_dagster and m != "dagster")
    assert "httpx" in reached and not missing, f"userland imports {missing}, which the wheel does not require"
