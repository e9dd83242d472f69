"""The package's layers, checked from the source with ``ast`` so they stay apart.

The tree is laid out by role: ``master/`` (supervises processes), ``worker/``
(serves requests), ``http/`` (the protocol), ``tools/`` (operator tools), and
at the top the shared core both sides load.

* ``forkserver.http`` is a pure protocol library: stdlib and httptools only,
  no I/O modules and no I/O calls, so it can be tested (and fuzzed) without
  sockets; it reaches nothing of forkserver outside itself.
* ``forkserver.worker.wsgi`` builds environs and responses; it never touches sockets.
* ``master/`` never speaks HTTP and loads nothing of ``worker/`` or ``http/``,
  directly or through a shared module.  The entry point (``cli.py``) loads
  the worker before the master forks and hands the master its entry
  function, so the worker's code is still shared with every worker instead
  of loaded again by each: importing it in the child instead cost each
  worker 1.9 MB of private memory, measured as USS with two workers of
  tests/apps/basic.py.
* The shared core loads neither side: a top-level module that did would pull
  one side into the other.
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


def imports(path: Path, tree: ast.Module | None = None) -> set[str]:
    """Every module ``path`` imports, anywhere in the file, relative imports made absolute."""
    if tree is None:
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


def load_time_imports(path: Path) -> set[str]:
    """The modules loading ``path`` imports, relative imports made absolute.

    Top-level imports only (also inside a top-level ``if``/``try``), not
    those deferred into a function, which run when it is called (in the
    master: after a fork, in the child), nor those under ``TYPE_CHECKING``.
    """
    tree = ast.parse(path.read_text(), str(path))
    statements = list(tree.body)
    top_level = []
    while statements:
        node = statements.pop(0)
        if isinstance(node, ast.If):
            if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                statements += node.body + node.orelse
        elif isinstance(node, ast.Try):
            statements += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            top_level.append(node)
    return imports(path, ast.Module(body=top_level, type_ignores=[]))


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def reached(module: str) -> set[str]:
    """Every forkserver module that loading ``module`` loads, directly or through others."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        for name in load_time_imports(MODULES[todo.pop()]):
            if name in MODULES and name not in seen:
                seen.add(name)
                todo.append(name)
    return seen


HTTP_FILES = sorted((PACKAGE / "http").glob("*.py"))
FORBIDDEN_IN_HTTP = ("socket", "os", "select", "selectors", "asyncio", "io", "tempfile", "subprocess", "ssl",
                     "logging", "mmap", "shutil", "forkserver.config", "forkserver.sources", "forkserver.worker",
                     "forkserver.master")
# Built-ins that read or write outside the process.
IO_CALLS = frozenset({"open", "print", "input"})
# The worker's modules that speak HTTP (with forkserver.http itself).
HTTP_SIDE = ("forkserver.http", "forkserver.worker.wsgi", "forkserver.worker.connection", "forkserver.worker.serving",
             "forkserver.worker.static")
MASTER_MODULES = sorted(name for name in MODULES if is_within(name, "forkserver.master"))
# Top-level modules both sides load; the entry points (cli, __main__) start either side and are not core.
SHARED_CORE = sorted(name for name, path in MODULES.items()
                     if path.parent == PACKAGE and name not in ("forkserver", "forkserver.cli", "forkserver.__main__"))


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


@pytest.mark.parametrize("path", HTTP_FILES, ids=lambda p: p.name)
def test_http_calls_no_io_builtin(path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id not in IO_CALLS, f"{path.name} calls {node.func.id}() at line {node.lineno}"


@pytest.mark.parametrize("path", HTTP_FILES, ids=lambda p: p.name)
def test_http_reaches_nothing_outside_itself(path):
    outside = {name for name in reached(module_name(path)) if not is_within(name, "forkserver.http")}
    assert outside == set(), f"{path.name} loads {sorted(outside)}"


def test_load_time_imports_skip_deferred_and_type_checking_imports():
    master = PACKAGE / "master" / "process.py"
    assert "forkserver.master.status" in imports(master) and "forkserver.master.status" not in load_time_imports(master)
    assert "forkserver.worker.serving" not in load_time_imports(PACKAGE / "worker" / "connection.py")  # TYPE_CHECKING
    assert "forkserver.workerspec" in load_time_imports(master)


def test_reached_follows_imports_through_other_modules():
    assert "forkserver.http.parser" in reached("forkserver.worker.serving")  # serving -> connection -> exchange -> parser


def test_wsgi_does_not_import_socket():
    found = imports(PACKAGE / "worker" / "wsgi.py")
    assert not any(is_within(name, "socket") or is_within(name, "selectors") for name in found), found


@pytest.mark.parametrize("module", MASTER_MODULES)
def test_master_side_imports_nothing_of_worker_or_http(module):
    """Not even deferred: a master that parsed or framed HTTP would be a worker.

    What the master needs of the worker's settings (the TLS context, the
    static mounts) lives in the shared core (``tlscontext``, ``mounts``).
    """
    for name in imports(MODULES[module]):
        assert not (is_within(name, "forkserver.worker") or is_within(name, "forkserver.http")), \
            f"{module} imports {name}"


@pytest.mark.parametrize("module", MASTER_MODULES)
def test_master_side_loads_neither_worker_nor_http(module):
    found = {name for name in reached(module)
             if is_within(name, "forkserver.worker") or is_within(name, "forkserver.http")}
    assert found == set(), f"loading {module} loads {sorted(found)}"


def runtime_imports(path: Path) -> set[str]:
    """Every module ``path`` may import when run, deferred ones too; not those under ``TYPE_CHECKING``."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            node.body = [ast.Pass()]
    return imports(path, tree)


@pytest.mark.parametrize("module", SHARED_CORE)
def test_shared_core_imports_neither_side_even_deferred(module):
    """What both sides need (the TLS context, static mounts, address parsing, the stats-exposure rule) is core."""
    found = {name for name in runtime_imports(MODULES[module])
             if any(is_within(name, side) for side in ("forkserver.master", "forkserver.worker", "forkserver.tools"))}
    assert found == set(), f"{module} imports {sorted(found)}"


@pytest.mark.parametrize("module", SHARED_CORE)
def test_shared_core_loads_neither_side(module):
    found = {name for name in reached(module)
             if any(is_within(name, side) for side in ("forkserver.master", "forkserver.worker", "forkserver.tools"))}
    assert found == set(), f"loading {module} loads {sorted(found)}"


def test_cli_loads_neither_the_worker_nor_http():
    found = {name for name in reached("forkserver.cli")
             if any(is_within(name, side) for side in ("forkserver.worker", *HTTP_SIDE))}
    assert found == set(), f"loading the command line loads {sorted(found)}"


def test_the_worker_reaches_http():
    assert "forkserver.http.exchange" in reached("forkserver.worker.process")  # what the master's tests keep out


def test_the_entry_point_loads_the_worker_for_the_master():
    """cli.py imports the worker (deferred, where it starts the master), so the workers share its code."""
    assert "forkserver.worker.process" in imports(PACKAGE / "cli.py")
    assert "forkserver.worker.process" not in imports(PACKAGE / "master" / "process.py")


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
