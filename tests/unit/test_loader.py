"""The app loader, in this process: its pause of the garbage collector, and what it calls ASGI."""

from __future__ import annotations

import functools
import gc

import pytest

from forkserver.loader import asgi_shape, collector_paused


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


@pytest.mark.parametrize("target, shape", [
    (asgi_function, "a coroutine function"),
    (functools.partial(asgi_function), "a coroutine function"),
    (AsgiObject(), "AsgiObject object whose __call__ is a coroutine function"),
    (AsgiObject, "class AsgiObject, whose instances are called as coroutines"),
    (sync_asgi_named, "it takes (scope, receive, send)"),
])
def test_asgi_shapes_are_named(target, shape):
    assert asgi_shape(target) == shape


@pytest.mark.parametrize("target", [wsgi_function, WsgiObject(), functools.partial(wsgi_function), len, print,
                                    functools.partial(sync_asgi_named, None)])
def test_wsgi_callables_and_builtins_pass(target):
    assert asgi_shape(target) == ""
