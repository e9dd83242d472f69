"""The app loader, in this process: its pause of the garbage collector, and what it calls ASGI."""

from __future__ import annotations

import functools
import gc
import inspect

import pytest

from forkserver.loader import asgi_shape, collector_paused, plain_parameters


@pytest.fixture(autouse=True)
def collector_restored():
    enabled = gc.isenabled()
    yield
    gc.unfreeze()  # what the tests froze goes back to the oldest generation
    if enabled:
        gc.enable()
    else:
        gc.disable()


def test_the_collector_is_off_inside_and_on_again_after_with_what_was_made_frozen():
    gc.enable()
    frozen_before = gc.get_freeze_count()
    with collector_paused():
        assert not gc.isenabled()
        made = [[i] for i in range(1000)]  # tracked containers, as an import makes
    assert gc.isenabled()
    assert gc.get_freeze_count() >= frozen_before + len(made)


def test_a_collector_that_was_off_stays_off():
    gc.disable()
    with collector_paused():
        pass
    assert not gc.isenabled()


def test_the_collector_comes_back_when_the_import_fails():
    gc.enable()
    with pytest.raises(ImportError), collector_paused():
        raise ImportError("no module named 'missing'")
    assert gc.isenabled()


# -- ASGI shapes --------------------------------------------------------------------------


class WsgiObject:
    def __call__(self, environ, start_response):
        return []


class AsgiObject:
    async def __call__(self, scope, receive, send):
        pass


async def asgi_function(scope, receive, send):
    pass


def sync_asgi_named(scope, receive, send):
    pass


def wsgi_function(environ, start_response):
    return []


def positional_only(environ, start_response, /, extra=None, *rest, flag=False, **options):
    return []


class Methods:
    def wsgi(self, environ, start_response):
        return []

    async def asgi(self, scope, receive, send):
        pass

    def asgi_named(self, scope, receive, send):
        pass

    def only_args(*args):  # self is in *args: inspect keeps *args as it is
        return []


def wraps_asgi(function):
    """A sync wrapper whose signature, through ``__wrapped__``, is the wrapped function's."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        return function(*args, **kwargs)
    return wrapper


@pytest.mark.parametrize("target, shape", [
    (asgi_function, "a coroutine function"),
    (functools.partial(asgi_function), "a coroutine function"),
    (AsgiObject(), "AsgiObject object whose __call__ is a coroutine function"),
    (AsgiObject, "class AsgiObject, whose instances are called as coroutines"),
    (sync_asgi_named, "it takes (scope, receive, send)"),
    (Methods().asgi, "a coroutine function"),
    (Methods().asgi_named, "it takes (scope, receive, send)"),
    # A function with attributes of its own is left to inspect, which follows __wrapped__.
    (wraps_asgi(sync_asgi_named), "it takes (scope, receive, send)"),
])
def test_asgi_shapes_are_named(target, shape):
    assert asgi_shape(target) == shape


@pytest.mark.parametrize("target", [wsgi_function, WsgiObject(), functools.partial(wsgi_function), len, print,
                                    functools.partial(sync_asgi_named, None), Methods().wsgi, Methods().only_args,
                                    positional_only, wraps_asgi(wsgi_function)])
def test_wsgi_callables_and_builtins_pass(target):
    assert asgi_shape(target) == ""


@pytest.mark.parametrize("target", [wsgi_function, asgi_function, sync_asgi_named, positional_only, Methods().wsgi,
                                    Methods().asgi, Methods().asgi_named, lambda: None, lambda environ, *_: None])
def test_a_plain_function_or_method_reads_as_inspect_reads_it(target):
    """What the code object says, without inspect, is what inspect says."""
    positional = [p.name for p in inspect.signature(target).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert plain_parameters(target) == (inspect.iscoroutinefunction(target), positional)


@pytest.mark.parametrize("target", [WsgiObject(), AsgiObject, functools.partial(wsgi_function), len,
                                    Methods().only_args, wraps_asgi(wsgi_function)])
def test_anything_else_is_left_to_inspect(target):
    assert plain_parameters(target) is None
