"""The package layering DESIGN.md promises, read from the source: who may import whom, and the one error tree.

- protocol/ is the only code the sides share: it imports none of appliance/, controlplane/, userland/.
- appliance/ and controlplane/ never import each other; neither do appliance/ and userland/.
- appliance/ never imports dagster, not even through a protocol module it uses (the appliance image has none).
- Every exception class the project defines derives from protocol.errors.AirlockError.

Imports are read with `ast`, function-level ones included, so a lazy import cannot hide a crossing.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("appliance", "controlplane", "userland", "protocol")
FORBIDDEN = {
    "protocol": {"appliance", "controlplane", "userland"},
    "appliance": {"controlplane", "userland", "dagster", "dagster_shared", "dagster_webserver", "dagster_graphql"},
    "controlplane": {"appliance"},
    "userland": {"appliance", "controlplane"},
}
DAGSTER = {"dagster", "dagster_shared", "dagster_webserver", "dagster_graphql", "dagster_postgres"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module name this file imports, absolute, at any nesting level."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module_name(path).rsplit(".", 0 if path.name == "__init__.py" else 1)[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            out.add(stem)
            out.update(f"{stem}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return out


def _graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    return {_module_name(p): _imports(p) for p in files}


GRAPH = _graph()


def _top(name: str) -> str:
    return name.split(".", 1)[0]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_package_imports_across_the_boundary(package: str) -> None:
    crossings = sorted(f"{module} imports {name}" for module, names in GRAPH.items() if _top(module) == package
                       for name in names if _top(name) in FORBIDDEN[package])
    assert not crossings, "\n".join(crossings)


def test_the_appliance_reaches_no_dagster_module_even_through_protocol() -> None:
    """Follow every project import the appliance makes; none of the modules reached may import dagster."""
    seen: set[str] = set()
    todo = [m for m in GRAPH if _top(m) == "appliance"]
    offenders: list[str] = []
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        for name in GRAPH.get(module, ()):
            if _top(name) in DAGSTER:
                offenders.append(f"{module} imports {name}")
            elif name in GRAPH:
                todo.append(name)
    assert not offenders, "\n".join(sorted(offenders))


def test_the_layering_check_sees_a_crossing() -> None:
    """The reader is not vacuous: it finds the imports a module really makes, lazy ones included."""
    assert "protocol.errors" in GRAPH["appliance.policy.loader"] or any(
        n.startswith("protocol.") for n in GRAPH["appliance.policy.loader"])
    assert "dagster._serdes" in GRAPH["protocol.storage_codec"]
    assert any(_top(n) == "appliance" for n in GRAPH["appliance.cli"])


def _project_exceptions() -> list[type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for package in PACKAGES:
        pkg = importlib.import_module(package)
        for info in pkgutil.walk_packages(pkg.__path__, f"{package}."):
            if info.name.endswith("__main__"):
                continue
            module = importlib.import_module(info.name)
            for _, obj in inspect.getmembers(module, inspect.isclass):
                if issubclass(obj, BaseException) and obj.__module__ == info.name:
                    found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return list(found.values())


def test_every_exception_the_project_defines_is_an_airlock_error() -> None:
    from protocol.errors import AirlockError, PermanentError, TemporaryError

    classes = _project_exceptions()
    assert len(classes) >= 25, "the walk found too few exception classes to be reading the tree"
    outside = sorted(f"{c.__module__}.{c.__qualname__}" for c in classes if not issubclass(c, AirlockError))
    assert not outside, "not under AirlockError:\n" + "\n".join(outside)
    both = sorted(c.__qualname__ for c in classes if issubclass(c, PermanentError) and issubclass(c, TemporaryError))
    assert not both, f"both temporary and permanent: {both}"
