"""Server hooks: user functions called at points of the server's life.

Each hook is a setting holding ``"module:function"``.  The function gets one
argument, a ``HookContext``.  A hook that raises is logged; at start-up
(``on_starting``, ``when_ready``) the failure stops the start, because a
server that could not do what its operator asked at boot should not serve.
"""

from __future__ import annotations

import importlib
import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

log = logging.getLogger("forkserver")

HOOK_NAMES = (
    "on_starting", "when_ready", "pre_fork", "post_fork", "post_worker_init",
    "worker_int", "worker_exit", "on_mold", "on_reload", "on_exit",
)


@dataclass(frozen=True, eq=False)
class HookContext:
    """What a hook is told: the settings, and which process and worker it runs for."""

    config: Any
    pid: int
    slot: int | None = None
    generation: int | None = None


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


class Hooks:
    """The configured hooks, resolved once; calling an unset hook does nothing."""

    def __init__(self, config: Any) -> None:
        self._functions = {
            name: resolve(name, getattr(config, name)) for name in HOOK_NAMES if getattr(config, name)
        }

    def run(self, name: str, context: HookContext, *, fatal: bool = False) -> None:
        """Call hook ``name``; log its failure, and re-raise it as ConfigError if ``fatal``."""
        function = self._functions.get(name)
        if function is None:
            return
        try:
            function(context)
        except Exception as exc:
            if fatal:  # the start fails: its one error line says it all
                raise ConfigError(f"{name} hook raised {type(exc).__name__}: {exc}{_where(exc)}") from None
            log.exception("hook %s raised", name)
