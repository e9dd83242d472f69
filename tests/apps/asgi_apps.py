"""ASGI applications, as FastAPI or Starlette users write them, that a WSGI server must refuse.

Pure Python: the shapes matter, not a framework.
"""

from __future__ import annotations


async def app(scope, receive, send):
    """A bare ASGI 3 app: ``async def app(scope, receive, send)``."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hello"})


class Router:
    """An app object with ``async def __call__``, as FastAPI() and Starlette() are."""

    async def __call__(self, scope, receive, send):
        await app(scope, receive, send)


router = Router()


class LegacyApp:
    """ASGI 2's double callable: constructed with the scope, then awaited with receive and send."""

    def __init__(self, scope):
        self.scope = scope

    async def __call__(self, receive, send):
        await app(self.scope, receive, send)


class Handler:
    """A class whose instances are the awaitable: ``await Handler(scope, receive, send)``."""

    def __init__(self, scope, receive, send):
        self.scope, self.receive, self.send = scope, receive, send

    def __await__(self):
        return app(self.scope, self.receive, self.send).__await__()


def create_app():
    """A factory returning an ASGI app object, as ``app:create_app()`` specs call it."""
    return Router()


class WsgiClassApp:
    """A class is a valid WSGI app when constructing it with (environ, start_response) answers."""

    def __init__(self, environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "6")])
        self.body = [b"class\n"]

    def __iter__(self):
        return iter(self.body)
