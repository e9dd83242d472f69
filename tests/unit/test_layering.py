"""The package's layers, checked from the source with ``ast`` so they stay apart.

* ``forkserver.http`` is a pure protocol library: stdlib and httptools only,
  and no I/O modules, so it can be tested (and fuzzed) without sockets.
* ``forkserver.wsgi`` builds environs and responses; it never touches sockets.
* The master and its pool supervise processes; they never speak HTTP.
* Only ``cli.py`` decides the process exit status.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "forkserver"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file, relative imports made absolute."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base)
                targets = [f"{prefix}.{node.module}"] if node.module else [f"{prefix}.{a.name}" for a in node.names]
            else:
                targets = [node.module or ""]
                # ``from pkg import mod`` may import a submodule: count both spellings.
                targets += [f"{node.module}.{a.name}" for a in node.names]
            found.update(targets)
    return found


def top(name: str) -> str:
    return name.split(".")[0]


def is_within(name: str, module: str) -> bool:
    return name == module or name.startswith(module + ".")


HTTP_FILES = sorted((PACKAGE / "http").glob("*.py"))
FORBIDDEN_IN_HTTP = ("socket", "os", "select", "selectors", "asyncio", "forkserver.config", "forkserver.worker")


def test_imports_helper_resolves_relative_imports():
    found = imports(PACKAGE / "http" / "parser.py")
    assert "httptools" in found
    assert any(is_within(name, "forkserver.http") for name in found)


@pytest.mark.parametrize("path", HTTP_FILES, ids=lambda p: p.name)
def test_http_imports_only_stdlib_and_httptools(path):
    for name in imports(path):
        if is_within(name, "forkserver.http"):
            continue
        assert top(name) in sys.stdlib_module_names or top(name) == "httptools", f"{path.name} imports {name}"
        for forbidden in FORBIDDEN_IN_HTTP:
            assert not is_within(name, forbidden), f"{path.name} imports {name}"


def test_wsgi_does_not_import_socket():
    found = imports(PACKAGE / "wsgi.py")
    assert not any(is_within(name, "socket") or is_within(name, "selectors") for name in found), found


@pytest.mark.parametrize("filename", ["master.py", "pool.py"])
def test_supervisor_does_not_speak_http(filename):
    for name in imports(PACKAGE / filename):
        for layer in ("forkserver.http", "forkserver.wsgi", "forkserver.connection"):
            assert not is_within(name, layer), f"{filename} imports {name}"


def exits(path: Path) -> list[str]:
    """Places in ``path`` that end the process through Python's exit machinery."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr == "exit" and isinstance(func.value, ast.Name) \
                    and func.value.id == "sys":
                found.append(f"sys.exit at line {node.lineno}")
            elif isinstance(func, ast.Name) and func.id in ("exit", "quit"):
                found.append(f"{func.id}() at line {node.lineno}")
        elif isinstance(node, ast.ImportFrom) and node.module == "sys" and any(a.name == "exit" for a in node.names):
            found.append(f"from sys import exit at line {node.lineno}")
        elif isinstance(node, ast.Name) and node.id == "SystemExit":
            found.append(f"SystemExit at line {node.lineno}")
    return found


def test_exits_helper_sees_sys_exit():
    assert exits(PACKAGE / "cli.py")


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_cli_calls_sys_exit(path):
    if path == PACKAGE / "cli.py":
        return
    assert exits(path) == [], f"{path.relative_to(PACKAGE)} exits the process; only cli.py may"
