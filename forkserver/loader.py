"""Resolve an app spec such as ``pkg.mod:app`` or ``pkg.mod:create_app()`` to a WSGI callable.

Failures raise ``AppImportError`` with one line naming the module or attribute
and the underlying error, with the file and line where an import blew up, so
an operator never has to read a traceback to know what is wrong.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
import traceback
import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from .errors import AppImportError

DEFAULT_NAMES = ("application", "app")


def prepare_path(chdir: str, pythonpath: Sequence[str]) -> None:
    """Apply ``chdir`` and put the app's directories first on ``sys.path``."""
    if chdir:
        try:
            os.chdir(chdir)
        except OSError as exc:
            raise AppImportError(f"chdir {chdir!r}: {exc.strerror}") from None
    for directory in reversed([os.getcwd(), *pythonpath]):
        absolute = os.path.abspath(directory)
        if absolute in sys.path:
            sys.path.remove(absolute)
        sys.path.insert(0, absolute)


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    last = frames[-1]
    return f" (at {last.filename}:{last.lineno})"


def _parse_call(expression: str, spec: str) -> tuple[str, list[Any], dict[str, Any]] | None:
    """Split ``name(args)`` into the name and literal arguments; None if not a call."""
    if "(" not in expression:
        return None
    import ast  # deferred: only a factory call needs parsing, and ast is 1 ms of a start

    try:
        node = ast.parse(expression, mode="eval").body
    except SyntaxError:
        raise AppImportError(f"app {spec!r}: {expression!r} is not a name or a call") from None
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        raise AppImportError(f"app {spec!r}: expected 'module:factory(...)'")
    try:
        if any(kw.arg is None for kw in node.keywords) or any(isinstance(a, ast.Starred) for a in node.args):
            raise ValueError("* and ** are not literals")
        args = [ast.literal_eval(arg) for arg in node.args]
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg}
    except (ValueError, TypeError, SyntaxError, RecursionError):
        raise AppImportError(f"app {spec!r}: factory arguments must be literals") from None
    return node.func.id, args, kwargs


def parse_spec(spec: str) -> tuple[str, tuple[str, ...], tuple[list[Any], dict[str, Any]] | None]:
    """Check an app spec's form without importing anything.

    Returns the module name, the attribute names to try, and the factory's
    (args, kwargs) if the spec calls one.

    Raises:
        AppImportError: if the spec is empty or malformed.
    """
    if not spec:
        raise AppImportError("no app given: pass MODULE:CALLABLE or set 'app' in the config file")
    module_name, _, expression = spec.partition(":")
    if not all(part.isidentifier() for part in module_name.split(".")):
        raise AppImportError(f"app {spec!r}: {module_name!r} is not a module name; expected MODULE:CALLABLE")
    call = _parse_call(expression, spec) if expression else None
    if call:
        return module_name, (call[0],), (call[1], call[2])
    if expression and not expression.isidentifier():
        raise AppImportError(f"app {spec!r}: {expression!r} is not a name or a call")
    return module_name, ((expression,) if expression else DEFAULT_NAMES), None


@contextmanager
def collector_paused() -> Iterator[None]:
    """Hold the cyclic garbage collector off while a lot of code is imported.

    An import makes thousands of objects that live as long as the process
    (modules, classes, functions) and next to no garbage, yet the collector,
    woken every 700 allocations, walks that growing heap again and again:
    53 times while Flask is imported (12 ms of ~190), 26 times while the
    master imports its own modules (6 ms).  On the way out every tracked
    object is frozen (``gc.freeze``; by then mostly what the import made), so
    the collector's first run does not walk it all at once either; a
    reference cycle the import left behind is the price (it is never
    collected, except in the master, which unfreezes at each fork).
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


def load_app(spec: str) -> Callable[..., Any]:
    """Import and return the WSGI callable named by ``spec`` (the collector paused meanwhile).

    Raises:
        AppImportError: with one line saying what failed.
    """
    with collector_paused():
        return _load_app(spec)


def _load_app(spec: str) -> Callable[..., Any]:
    module_name, names, call = parse_spec(spec)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise AppImportError(f"app {spec!r}: no module named {exc.name!r} (sys.path[0] is {sys.path[0]!r})") from None
        raise AppImportError(f"app {spec!r}: importing {module_name!r} failed: {exc}{_where(exc)}") from None
    except Exception as exc:
        raise AppImportError(
            f"app {spec!r}: importing {module_name!r} raised {type(exc).__name__}: {exc}{_where(exc)}"
        ) from None
    for name in names:
        if hasattr(module, name):
            target = getattr(module, name)
            break
    else:
        raise AppImportError(f"app {spec!r}: module {module_name!r} has no attribute {' or '.join(map(repr, names))}")
    if call:
        try:
            target = target(*call[0], **call[1])
        except Exception as exc:
            raise AppImportError(f"app {spec!r}: factory raised {type(exc).__name__}: {exc}{_where(exc)}") from None
    if not callable(target):
        raise AppImportError(f"app {spec!r}: {type(target).__name__} object is not callable")
    asgi = asgi_shape(target)
    if asgi:
        raise AppImportError(
            f"app {spec!r} is an ASGI application ({asgi}); forkserver serves WSGI only: run it with an "
            "ASGI server such as uvicorn, or wrap it in an ASGI-to-WSGI adapter such as a2wsgi.ASGIMiddleware")
    return target


ASGI_PARAMETERS = ("scope", "receive", "send")
CO_COROUTINE = 0x80  # inspect.CO_COROUTINE: set in the code object of an ``async def``


def asgi_shape(target: Callable[..., Any]) -> str:
    """Say how ``target`` looks like an ASGI app, or return "" for anything that may be WSGI.

    A WSGI server calls the app with ``(environ, start_response)`` and
    iterates over what it returns; an ASGI app called that way returns a
    coroutine, and every request would end in a 500.  Recognised: a
    coroutine function (``async def app(scope, receive, send)``), an object
    or class whose ``__call__`` is one (Starlette, FastAPI, Django's
    ASGIHandler), and a callable whose parameters are named like ASGI's,
    e.g. a class taking ``scope`` (ASGI 2).  A class taking
    ``(environ, start_response)`` stays a valid WSGI app.
    """
    plain = plain_parameters(target)
    if plain is not None:
        coroutine, names = plain
        return "a coroutine function" if coroutine else _named_like_asgi(names)
    # Deferred: inspect (with ast and dis) is 3 ms of a start, and a plain
    # function or method, the common WSGI app, is answered without it.
    import inspect

    if inspect.iscoroutinefunction(target):
        return "a coroutine function"
    # On an object this is the bound method; on a class, the method its instances would have.
    if inspect.iscoroutinefunction(getattr(target, "__call__", None)):
        if inspect.isclass(target):
            return f"class {target.__name__}, whose instances are called as coroutines"
        return f"{type(target).__name__} object whose __call__ is a coroutine function"
    try:
        names = [p.name for p in inspect.signature(target).parameters.values()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):  # builtins and C types may have no signature
        return ""
    return _named_like_asgi(names)


def plain_parameters(target: Callable[..., Any]) -> tuple[bool, list[str]] | None:
    """For a plain function or bound method: whether it is ``async def``, and its positional parameters.

    Read from the code object, where ``inspect`` reads them too.  None for
    anything else, which ``inspect`` decides: a class, a callable object, a
    partial, a method whose ``self`` is taken by ``*args``, and a function
    with attributes of its own, since ``__wrapped__``, ``__signature__`` or
    a coroutine mark (``inspect.markcoroutinefunction``) change its answer.
    """
    function, bound = target, 0
    if type(target) is types.MethodType:
        function, bound = target.__func__, 1  # a bound method's first parameter is already given
    if type(function) is not types.FunctionType or vars(function):
        return None
    code = function.__code__
    if code.co_argcount < bound:
        return None
    return bool(code.co_flags & CO_COROUTINE), list(code.co_varnames[bound:code.co_argcount])


def _named_like_asgi(names: list[str]) -> str:
    if names and names == list(ASGI_PARAMETERS[:len(names)]):
        return f"it takes ({', '.join(names)})"
    return ""
