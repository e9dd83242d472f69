"""Errors that stop forkserver from starting, each with the exit code it causes.

Every error here carries a one-line message meant for an operator's terminal:
``cli.main`` prints exactly that line and exits with ``exit_code``.  Errors in
serving a request live in ``forkserver.http.errors`` and never reach here.
"""

from __future__ import annotations

# Exit codes.  78 is EX_CONFIG from sysexits.h; 3 and 4 follow gunicorn, so
# process supervisors that already know them keep working.
EXIT_OK = 0
EXIT_WORKER_BOOT = 3
EXIT_APP_LOAD = 4
EXIT_BIND = 5
EXIT_CONFIG = 78


class ForkserverError(Exception):
    """A problem that stops the server; ``str(error)`` is the one line to show."""

    exit_code = 1


class ConfigError(ForkserverError):
    """A setting is unknown, mistyped or out of range."""

    exit_code = EXIT_CONFIG


class AppImportError(ForkserverError):
    """The WSGI application could not be imported or is not callable."""

    exit_code = EXIT_APP_LOAD


class BindError(ForkserverError):
    """A listening address could not be parsed, bound or inherited."""

    exit_code = EXIT_BIND


class WorkerBootError(ForkserverError):
    """No worker could start serving, so the master gave up."""

    exit_code = EXIT_WORKER_BOOT
