"""A start imports only what every start needs.

Each module below serves some configurations only and is imported where that
configuration is acted on, so a start without it does not pay for the import
(docs/startup-and-connections.md lists what each cost).  Checked in a fresh
interpreter run without ``site`` (``-S``): ``.pth`` files, such as an editable
install's import finder, load some of these modules for their own reasons,
which would hide a regression here while users of a plain install pay it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httptools
import pytest
import setproctitle

import forkserver

# module -> the configuration that imports it
CONFIGURATION_ONLY = {
    "shlex": "GUNICORN_CMD_ARGS",
    "pathlib": "workers = auto",
    "difflib": "a mistyped setting's hint",
    "ssl": "certfile (or share_stdlib, in Master.start)",
    "psutil": "max_worker_memory, workers = auto",
    "forkserver.master.containers": "workers = auto",
    "forkserver.refork": "refork_after",
    "forkserver.master.refork": "refork_after",
    "forkserver.worker.mold": "a worker promoted by refork",
    "dataclasses": "none: every record is a plain class",
    "inspect": "an app that is not a plain function or method (the loader's ASGI check)",
    "ast": "an app named by a factory call",
    "forkserver.tlscontext": "certfile",
    "forkserver.worker.tls": "certfile",
    "forkserver.master.status": "stats_bind",
    "forkserver.master.statsd": "statsd_host",
    "forkserver.logconfig": "logconfig, logconfig_dict",
    "forkserver.worker.static": "static",
}


# What the entry point imports before the first fork (forkserver.cli's run).
PROBE = f"""
import sys
import forkserver.cli, forkserver.master.process, forkserver.worker.process
from forkserver.proxy import pattern
loaded = sorted(name for name in {sorted(CONFIGURATION_ONLY)!r} if name in sys.modules)
decorated = sorted(f"{{module.__name__}}.{{name}}" for module in list(sys.modules.values())
                   if module.__name__.startswith("forkserver")
                   for name, value in vars(module).items()
                   if isinstance(value, type) and value.__module__ == module.__name__
                   and "__dataclass_fields__" in vars(value))
print(",".join(loaded) or "-", pattern.cache_info().currsize, ",".join(decorated) or "-")
"""


def run_without_site(code: str, *paths: str) -> str:
    """Run ``code`` in a fresh interpreter without site, forkserver and its compiled dependencies on the path."""
    roots = dict.fromkeys(str(Path(module.__file__).resolve().parents[1])
                          for module in (forkserver, httptools, setproctitle))
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": os.pathsep.join([*paths, *roots])}
    result = subprocess.run([sys.executable, "-S", "-c", code], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def probed() -> tuple[str, str, str]:
    """What importing the server loads: configuration-only modules, compiled patterns, dataclasses."""
    loaded, compiled, decorated = run_without_site(PROBE).split()
    return loaded, compiled, decorated


def test_importing_the_server_leaves_configuration_only_modules_unloaded(probed: tuple[str, str, str]) -> None:
    loaded, compiled, _ = probed
    assert loaded == "-", "imported at start: " + ", ".join(f"{name} ({CONFIGURATION_ONLY[name]})"
                                                          for name in loaded.split(","))
    assert compiled == "0", "proxy's regular expressions were compiled at import"


def test_the_start_decorates_no_dataclass(probed: tuple[str, str, str]) -> None:
    # Every record, the HTTP events included, is a plain class: each
    # @dataclass costs a start about 0.4 ms of exec() (see forkserver.records),
    # and importing dataclasses for them 0.8 ms more (listed above).
    assert probed[2] == "-", "dataclasses decorated at start: " + probed[2]


# A WSGI app as most are written: a function, or a method of an object.
PLAIN_APPS = """
def app(environ, start_response):
    return []


class Handler:
    def handle(self, environ, start_response):
        return []


handler = Handler().handle
"""


def test_loading_a_plain_function_or_method_imports_neither_inspect_nor_ast(tmp_path: Path) -> None:
    """The loader's ASGI check reads a plain callable's code object: inspect and ast are 3 ms of a start."""
    (tmp_path / "plain_apps.py").write_text(PLAIN_APPS)
    probe = ("import sys\nfrom forkserver.loader import load_app\n"
             "load_app('plain_apps:app'), load_app('plain_apps:handler')\n"
             "print(sorted(name for name in ('inspect', 'ast') if name in sys.modules) or '-')")
    assert run_without_site(probe, str(tmp_path)).strip() == "-"
