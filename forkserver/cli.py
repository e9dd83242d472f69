"""The ``forkserver`` command: parse settings, then check or serve.

This is the only module that prints usage or calls ``sys.exit``.  Every
startup problem arrives here as a ``ForkserverError`` and leaves as one line
on stderr (one per problem, when the settings had several) and that error's
exit code: no traceback, no half-started workers.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from . import __version__, preflight
from .errors import ConfigError, ForkserverError
from .hooks import Hooks
from .loader import collector_paused, load_app, parse_spec
from .sources import build_arg_parser, load_config, render_toml


def check(config_summary: str) -> int:
    """Report a good ``--check-config`` run."""
    print(f"forkserver: config OK: {config_summary}")
    return 0


def run_viewer(argv: Sequence[str]) -> int:
    """``forkserver stats ADDR`` or ``forkserver top ADDR``: read a running server's /stats."""
    command = argv[0]
    parser = argparse.ArgumentParser(
        prog=f"forkserver {command}",
        description=("Print one snapshot of a running server's stats." if command == "stats" else
                     "Show a running server's workers live; q or Ctrl-C quits."))
    parser.add_argument("address", metavar="ADDR", help="the server's --stats-bind: HOST:PORT or unix:PATH")
    if command == "stats":
        parser.add_argument("--json", action="store_true", help="print the raw /stats JSON document")
    else:
        parser.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                            help="seconds between refreshes (default: 1)")
    args = parser.parse_args(argv[1:])
    from .tools import top  # deferred: serving never needs the viewer

    if command == "top":
        if not args.interval > 0:
            parser.error("--interval must be greater than 0")
        return top.main_top(args.address, interval=args.interval)
    try:
        code = top.main_stats(args.address, raw=args.json)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader left (forkserver stats ADDR --json | head): not an error
        # worth a traceback. Python would try to flush again at exit, into the
        # same closed pipe, so stdout goes to /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return code


def run(argv: Sequence[str]) -> int:
    """Do what the command line asks; raise ForkserverError on failure."""
    if argv and argv[0] in ("stats", "top"):
        return run_viewer(argv)
    if any(arg in ("-h", "--help") for arg in argv):
        build_arg_parser().print_help()
        return 0
    if "--version" in argv or "-v" in argv:  # before the settings, so a broken config cannot hide it
        print(f"forkserver {__version__}")
        return 0
    invocation = load_config(argv, os.environ)
    config = invocation.config
    if invocation.print_config:
        print(render_toml(config), end="")
        return 0
    if not config.app:
        raise ConfigError("no app given: pass MODULE:CALLABLE, or set 'app' in the config file "
                          "(wsgi_app in a gunicorn config file)")
    parse_spec(config.app)  # a malformed spec fails before anything is bound
    if invocation.check_only:
        # Everything a start checks, but bind nothing, write nothing and fork nothing.
        preflight.check(config)
        Hooks(config)  # every hook imports and takes the arguments it will be given
        load_app(config.app)
        for warning in preflight.warnings(config):
            print(f"forkserver: warning: {warning}", file=sys.stderr)  # the kernel's state, not a config error
        workers = config.workers or "auto"  # AUTO_WORKERS: sized by the master at start
        return check(f"app {config.app!r} imports; {workers} worker(s) on {', '.join(config.bind)}")
    with collector_paused():  # the master's own imports, and those it shares with the workers
        # Deferred: --check-config and --help need none of it.  The worker's
        # module (and through it the HTTP side) is loaded here, not by the
        # master's: the master only supervises, yet every worker it forks
        # shares this copy of the code instead of importing its own.
        from .master.process import Master
        from .worker.process import Worker, load_configured

        load_configured(config)
        master = Master(config, argv, os.environ, run_worker=lambda spec: Worker(spec).run())
        master.start()
    return master.run()


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    try:
        code = run(sys.argv[1:] if argv is None else argv)
    except ForkserverError as exc:
        for line in str(exc).splitlines() or [""]:
            print(f"forkserver: error: {line}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        code = 1
    sys.exit(code)
