"""Server hooks: user functions called at points of the server's life.

Two conventions, decided by where a hook was given:

- a setting holding ``"module:function"`` (TOML, environment, command line):
  the function gets one argument, a ``HookContext``;
- a function defined in a gunicorn config file: it is called as gunicorn calls
  it, ``post_fork(server, worker)``, ``pre_request(worker, req)`` and so on,
  with objects offering what hook code written for gunicorn uses
  (``server.log``, ``worker.pid``, ``worker.age``, ``req.path``, ``resp.status``).

A hook that raises is logged; at start-up (``on_starting``, ``when_ready``,
``post_worker_init``) the failure stops the start, because a server that could
not do what its operator asked at boot should not serve.
"""

from __future__ import annotations

import importlib
import logging
import os
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from . import gunicorn
from .errors import ConfigError

log = logging.getLogger("forkserver")

HOOK_NAMES = (
    "on_starting", "when_ready", "pre_fork", "post_fork", "post_worker_init",
    "worker_int", "worker_abort", "worker_exit", "on_mold", "on_reload", "on_exit",
)
# Hooks from a gunicorn config file that run in a worker process (the mold is
# one) rather than in the master.
IN_WORKER = frozenset({"post_fork", "post_worker_init", "worker_int", "worker_abort", "worker_exit",
                       "pre_request", "post_request", "on_mold"})
# Those that get the server (the master) first, then maybe the worker.
SERVER_FIRST = frozenset({"on_starting", "when_ready", "on_reload", "on_exit", "pre_exec",
                          "pre_fork", "post_fork", "worker_exit", "child_exit", "nworkers_changed", "on_mold"})
WITH_WORKER = frozenset({"pre_fork", "post_fork", "worker_exit", "child_exit",
                         "post_worker_init", "worker_int", "worker_abort", "on_mold"})


# Plain classes, not dataclasses: see forkserver.records.
class StuckRequest:
    """A request in flight when the master aborted its worker: what ``worker_abort`` gets in ``worker.requests``."""

    __slots__ = ("environ", "elapsed", "stack")

    def __init__(self, environ: dict[str, Any], elapsed: float, stack: str) -> None:
        self.environ = environ
        self.elapsed = elapsed  # seconds since it was handed to the app
        self.stack = stack  # where its thread was, formatted as a traceback's lines (most recent call last)

    def describe(self) -> str:
        """A log fragment: ``GET /export?all=1 elapsed=31.2s``."""
        environ = self.environ
        query = environ.get("QUERY_STRING")
        target = environ.get("PATH_INFO", "") + ("?" + query if query else "")
        return f"{environ.get('REQUEST_METHOD', '')} {target!r} elapsed={self.elapsed:.1f}s"


class HookContext:
    """What a hook is told: the settings, and which process and worker it runs for.

    ``pid`` is the process the hook runs in; ``worker_pid`` names the worker a
    master-side hook is about when that is another process (``child_exit``).
    ``requests``: for ``worker_abort``, the requests the worker was stuck in.
    """

    __slots__ = ("config", "pid", "slot", "generation", "worker_pid", "requests")

    def __init__(self, config: Any, pid: int, slot: int | None = None, generation: int | None = None,
                 worker_pid: int | None = None, requests: tuple[StuckRequest, ...] = ()) -> None:
        self.config = config
        self.pid = pid
        self.slot = slot
        self.generation = generation
        self.worker_pid = worker_pid
        self.requests = requests


def resolve(setting: str, spec: str) -> Callable[[HookContext], Any]:
    """Import ``module:function`` for the hook ``setting``; raise ConfigError with one line."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ConfigError(f"{setting}: expected 'module:function', got {spec!r}")
    try:
        function = getattr(importlib.import_module(module_name), name)
    except Exception as exc:
        raise ConfigError(f"{setting}: cannot load {spec!r}: {type(exc).__name__}: {exc}") from None
    if not callable(function):
        raise ConfigError(f"{setting}: {spec!r} is not callable")
    return function


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""


class SettingsView:
    """``server.cfg`` / ``worker.cfg``: the settings under gunicorn's names or forkserver's."""

    def __init__(self, config: Any) -> None:
        self._config = config

    def __getattr__(self, name: str) -> Any:
        if hasattr(self._config, name):
            return getattr(self._config, name)
        spec = gunicorn.BY_NAME.get(name)
        if spec is not None and spec.native and hasattr(self._config, spec.native):
            return getattr(self._config, spec.native)
        if spec is not None:
            return spec.default
        raise AttributeError(f"no setting {name!r}")

    @property
    def env(self) -> dict[str, str]:
        return dict(entry.split("=", 1) for entry in self._config.env)

    @property
    def worker_class_str(self) -> str:
        kind = self._config.worker_class
        return "gthread" if kind == "sync" and self._config.threads > 1 else kind


class ServerView:
    """gunicorn's ``server`` argument: the master."""

    def __init__(self, context: HookContext, workers: int, in_worker: bool) -> None:
        self.pid = os.getppid() if in_worker else context.pid
        self.cfg = SettingsView(context.config)
        self.log = log
        self.proc_name = context.config.proc_name
        self.num_workers = workers
        self.address = context.config.bind


class WorkerView:
    """gunicorn's ``worker`` argument: one worker process."""

    def __init__(self, context: HookContext, age: int, in_worker: bool) -> None:
        self.pid = context.pid if in_worker else (context.worker_pid or "[booting]")
        self.ppid = os.getppid() if in_worker else context.pid
        self.age = age
        self.slot = context.slot
        self.generation = context.generation
        self.log = log
        self.cfg = SettingsView(context.config)
        self.timeout = context.config.timeout
        self.alive = True
        self.booted = True
        # worker_abort: the requests it was stuck in (environ, elapsed, stack); gunicorn has no such thing.
        self.requests = list(context.requests)


class RequestView:
    """gunicorn's ``req`` for pre_request and post_request, read from the WSGI environ."""

    def __init__(self, environ: dict[str, Any]) -> None:
        self.method = environ.get("REQUEST_METHOD", "")
        self.path = environ.get("PATH_INFO", "")
        self.query = environ.get("QUERY_STRING", "")
        self.uri = environ.get("RAW_URI") or (self.path + ("?" + self.query if self.query else ""))
        protocol = environ.get("SERVER_PROTOCOL", "HTTP/1.1")
        self.version = tuple(int(part) for part in protocol[5:].split(".") if part.isdigit())
        self.scheme = environ.get("wsgi.url_scheme", "http")
        self.remote_addr = environ.get("REMOTE_ADDR", "")
        self.headers = [(key[5:].replace("_", "-"), value) for key, value in environ.items()
                        if key.startswith("HTTP_")]
        self.headers += [(key.replace("_", "-"), environ[key]) for key in ("CONTENT_TYPE", "CONTENT_LENGTH")
                         if environ.get(key)]


class ResponseView:
    """gunicorn's ``resp`` for post_request: what the app answered."""

    def __init__(self) -> None:
        self.status: str | None = None
        self.status_code: int | None = None
        self.headers: list[tuple[str, str]] = []

    def started(self, status: str, headers: list[tuple[str, str]]) -> None:
        self.status, self.headers = status, headers
        code = status.split(" ", 1)[0]
        self.status_code = int(code) if code.isdigit() else None


class _AfterClose:
    """The app's response iterable, calling ``done`` once the server has closed it."""

    def __init__(self, result: Iterable[bytes], done: Callable[[], None]) -> None:
        self._result, self._done = result, done

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._result)

    def close(self) -> None:
        try:
            close = getattr(self._result, "close", None)
            if close is not None:
                close()
        finally:
            self._done()


class Hooks:
    """The configured hooks, resolved once; calling an unset hook does nothing."""

    def __init__(self, config: Any, spawned: int = 0) -> None:
        self._gunicorn = {
            # gunicorn also takes a hook as 'module.function' text, imported once pythonpath applies.
            name: gunicorn.check_hook(name, resolve(name, gunicorn.as_spec(hook)) if isinstance(hook, str) else hook)
            for name, hook in config.gunicorn_hooks.items()
        }
        self._functions = {
            name: resolve(name, getattr(config, name)) for name in HOOK_NAMES
            if getattr(config, name) and name not in self._gunicorn
        }
        self.workers = config.workers
        # gunicorn's worker.age: the how-manieth worker this master forked; a
        # forked worker keeps the count it had at its fork.
        self.spawned = spawned

    def defines(self, name: str) -> bool:
        return name in self._functions or name in self._gunicorn

    def run(self, name: str, context: HookContext, *, fatal: bool = False, values: tuple[Any, ...] = ()) -> None:
        """Call hook ``name``; log its failure, and re-raise it as ConfigError if ``fatal``.

        ``values`` are the arguments gunicorn passes after server and worker
        (nworkers_changed's new and old count).
        """
        if name == "pre_fork":
            self.spawned += 1
        native, gunicorn_hook = self._functions.get(name), self._gunicorn.get(name)
        if native is None and gunicorn_hook is None:
            return
        try:
            if native is not None:
                native(context)
            else:
                gunicorn_hook(*self._arguments(name, context), *values)
        except Exception as exc:
            if fatal:  # the start fails: its one error line says it all
                raise ConfigError(f"{name} hook raised {type(exc).__name__}: {exc}{_where(exc)}") from None
            log.exception("hook %s raised", name)

    def _arguments(self, name: str, context: HookContext) -> list[Any]:
        arguments: list[Any] = []
        in_worker = name in IN_WORKER
        if name in SERVER_FIRST:
            arguments.append(ServerView(context, self.workers, in_worker))
        if name in WITH_WORKER:
            arguments.append(WorkerView(context, self.spawned, in_worker))
        return arguments

    def wrap_requests(self, app: Callable[..., Any], context: HookContext) -> Callable[..., Any]:
        """The app, calling gunicorn's pre_request and post_request around each request.

        Without those hooks the app is returned as it is: no request pays for them.
        """
        pre, post = self._gunicorn.get("pre_request"), self._gunicorn.get("post_request")
        if pre is None and post is None:
            return app
        worker = WorkerView(context, self.spawned, in_worker=True)

        def call_post(req: RequestView, environ: dict[str, Any], resp: ResponseView) -> None:
            try:
                post(worker, req, environ, resp)
            except Exception:
                log.exception("hook post_request raised")

        def with_request_hooks(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
            req, resp = RequestView(environ), ResponseView()
            if pre is not None:
                pre(worker, req)

            def recording_start_response(status: str, headers: list[tuple[str, str]], *exc_info: Any) -> Any:
                resp.started(status, headers)
                return start_response(status, headers, *exc_info)

            if post is None:
                return app(environ, recording_start_response)
            try:
                result = app(environ, recording_start_response)
            except BaseException:
                call_post(req, environ, resp)
                raise
            return _AfterClose(result, lambda: call_post(req, environ, resp))

        return with_request_hooks
