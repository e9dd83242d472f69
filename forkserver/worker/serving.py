"""Serve one request on a connection: the exchange decides, wsgi runs the app, the connection moves bytes.

The three never call back into one another: this module takes the next
request from the connection's exchange (``forkserver.http.exchange``), builds
the environ with ``wsgi.input`` reading through the connection, runs the app
(``forkserver.worker.wsgi``), turns every failure into the right answer, and asks
the exchange for the verdict on the connection.  It also keeps the worker's
books on the request: the scoreboard, the stats and the access log.
"""

from __future__ import annotations

import io
import logging
import time
from time import monotonic
from collections.abc import Callable
from typing import Any

from .connection import BodyRules, BodyStream, ClientGone, Connection, Stalled
from ..http.errors import ProtocolError
from ..http.events import Request
from ..http.exchange import Closing
from ..http.parser import Limits
from ..http.response import DateHeader
from ..logs import AccessLog
from ..proxy import FORWARDING_ENVIRON_KEYS, REQUEST_START_KEYS, Trust, apply_origin, proxy_queue_time, read_forwarded
from ..scoreboard import Scoreboard
from ..stats import Reporter, kernel_wait
from .wsgi import AppError, Codec, Response, run_app

log = logging.getLogger("forkserver")

HEALTH_METHODS = ("GET", "HEAD")
HEALTH_BODY = b"ok\n"
HEALTH_HEADERS = [("Content-Type", "text/plain")]
LEAVING_BODY = b"stopping\n"


class Rotation:
    """Whether this server wants new traffic: what ``health_path`` answers.

    The worker sets ``leaving`` on TERM.  From then on the health path says
    503, so a load balancer's health check takes the instance out of
    rotation while it still serves (``shutdown_delay``) and then drains.
    """

    __slots__ = ("leaving",)

    def __init__(self) -> None:
        self.leaving = False


class Service:
    """What every connection of a worker serves with; shared, and never changed once built.

    (``closing`` and ``rotation`` are the things the worker changes: it
    sets their flags, which every exchange, and the health path, read; see
    ``forkserver.http.exchange.Closing``.)
    """

    __slots__ = ("app", "limits", "date", "access_log", "io_timeout", "closing", "board", "stats", "show",
                 "trust", "proxy_protocol", "health_target", "rotation", "codec", "body")

    def __init__(self, app: Callable[..., Any], limits: Limits, date: DateHeader, access_log: AccessLog | None,
                 io_timeout: float | None, closing: Closing, board: Scoreboard, stats: Reporter | None,
                 show: Callable[[str, str], None], trust: Trust | None = None, proxy_protocol: bool = False,
                 health_target: bytes = b"", rotation: Rotation | None = None, codec: Codec | None = None,
                 body: BodyRules | None = None) -> None:
        self.app = app
        self.limits = limits
        self.date = date
        self.access_log = access_log
        self.io_timeout = io_timeout
        self.closing = closing
        self.board = board
        self.stats = stats
        self.show = show
        self.trust = Trust(()) if trust is None else trust
        self.proxy_protocol = proxy_protocol
        self.health_target = health_target  # ``health_path`` as a request target; b"" (never a target) when off
        self.rotation = Rotation() if rotation is None else rotation
        self.codec = Codec() if codec is None else codec
        self.body = BodyRules() if body is None else body


def serve(connection: Connection, thread: int, outbox: list[Connection] | None = None) -> bool:
    """Answer the request waiting on ``connection``; True if the connection may be reused.

    ``thread`` names the scoreboard slot this request is shown in while it
    runs.  ``outbox``: the loop's list of connections whose last response
    waits for the end of its batch (see ``Connection.send_pair``), or None.
    Every failure becomes the right answer here, and the request is counted
    whatever its end.  (The app runs in this function, not in one more
    below it: a call fewer per request, about 10 bytecodes of a kept-alive
    request's 1,470, scripts/loop_cost.py.)
    """
    connection.thread = thread
    connection.outbox = outbox
    exchange = connection.exchange
    try:
        request = exchange.start()
    except ProtocolError as error:
        _reject(connection, error)
        return False
    service = connection.service
    # When the request was taken: the start of its duration, and the start
    # the scoreboard shows (one reading of the clock for both spares one call
    # into C and 4 bytecodes a request, scripts/loop_cost.py).
    clock = monotonic()
    response = Response(exchange, connection, service.codec)
    if service.health_target and request.target == service.health_target and request.method in HEALTH_METHODS:
        return _answer_health(connection, response, clock)
    # Clients mostly send the same request line and header fields on every
    # request of a connection: the environ is built for the first (see
    # _build_environ), and each request pays only for a copy (0.3 us against 1.8).
    key = (request.method, request.target, request.version, request.headers)
    environ = (connection.environ if key == connection.environ_of else _build_environ(connection, request, key)).copy()
    queued = kernel_wait(connection.sock) if service.stats is not None else None
    # (A proxy's queue time is also the app's, as environ["forkserver.queue_time"].)
    proxy_queued = proxy_queue_time(environ) if connection.proxy_stamped else None
    if request.chunked:
        if not _spool_input(connection, environ, response):
            return False
    elif request.content_length:
        environ["wsgi.input"] = io.BufferedReader(BodyStream(connection))
    else:
        environ["wsgi.input"] = io.BytesIO()  # no body: nothing to stream, and far cheaper to make
    service.board.request_started(thread, request.method, environ["PATH_INFO"], environ["REMOTE_ADDR"], environ, clock)
    service.show(request.method, environ["PATH_INFO"])
    reusable = False
    try:
        run_app(service.app, environ, response)
    except Stalled as exc:
        log.info("%s remote=%s: closing", exc, environ["REMOTE_ADDR"] or "unix")
        exchange.abandon()
    except ClientGone as exc:
        log.debug("client gone remote=%s: %s", connection.remote[0], exc)
        exchange.abandon()
    except ProtocolError as error:
        # In the body (too large, malformed, too slow): the client may still be sending it.
        if response.head_sent:
            exchange.abandon()
        else:
            _reject(connection, error, response)
            connection.linger()
    except AppError as exc:
        log.error("app broke PEP 3333 path=%s: %s", environ["PATH_INFO"], exc)
        _fail(connection, response)
    except Exception:
        log.exception("app raised on %s %s", environ["REQUEST_METHOD"], environ["PATH_INFO"])
        _fail(connection, response)
    else:
        verdict = exchange.reuse()
        reusable = verdict if verdict is not None else _drain(connection)
    finally:
        service.board.request_finished(thread)
    _count(connection, response.code, clock, queued, proxy_queued)
    if service.access_log is not None:
        duration = monotonic() - clock
        service.access_log.log(environ, response, time.time() - duration, duration)
    return reusable


def _spool_input(connection: Connection, environ: dict[str, Any], response: Response) -> bool:
    """Read a chunked body whole into ``wsgi.input``, before the app runs; False if the request ended instead.

    Many apps (Django, bottle, anything that trusts CONTENT_LENGTH) cannot
    read a body of unknown length, so it is handed over with its length, as
    waitress does.  When it cannot be read, the client is answered (or is
    gone) and the connection must close.
    """
    exchange = connection.exchange
    try:
        environ["wsgi.input"], size = connection.spool_body()
    except ProtocolError as error:
        _reject(connection, error, response)
        connection.linger()
        return False
    except ClientGone as exc:
        log.info("%s remote=%s: closing", exc, connection.remote[0] or "unix")
        exchange.abandon()
        return False
    except OSError as exc:
        # The temporary directory is full or gone: the client may try again later.
        log.error("spooling a request body failed remote=%s: %s", connection.remote[0] or "unix", exc)
        response.code = 503
        connection.reject(exchange.failure(503, "Service Unavailable"))
        connection.linger()
        return False
    # The body is de-chunked and counted now: tell the app its length,
    # and no longer that it is chunked, since it is not any more.
    environ["CONTENT_LENGTH"] = str(size)
    environ.pop("HTTP_TRANSFER_ENCODING", None)
    return True


def _build_environ(connection: Connection, request: Request, key: tuple[Any, ...]) -> dict[str, Any]:
    """The environ of ``request`` without ``wsgi.input``, kept for the connection's next requests; the caller copies it.

    ``key`` is what it is built from besides the connection: the request
    line and header fields.  Forwarding headers are applied here, once, and
    so is the look for a proxy's request-start stamp (``Connection.proxy_stamped``).
    """
    service = connection.service
    environ = service.codec.environ(key, request, connection.base_environ).copy()
    environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = connection.remote
    if connection.trusted and not environ.keys().isdisjoint(FORWARDING_ENVIRON_KEYS):
        apply_origin(environ, read_forwarded(request.headers, service.trust))
    connection.environ_of, connection.environ = key, environ
    connection.proxy_stamped = connection.trusted and not environ.keys().isdisjoint(REQUEST_START_KEYS)
    return environ


def _answer_health(connection: Connection, response: Response, clock: float) -> bool:
    """``health_path``: 200 "ok" from the worker itself; the app is not called, nothing access-logged.

    503 once the server is stopping (see Rotation).
    """
    if connection.service.rotation.leaving:
        status, body = 503, LEAVING_BODY
        response.start_response("503 Service Unavailable", HEALTH_HEADERS)
    else:
        status, body = 200, HEALTH_BODY
        response.start_response("200 OK", HEALTH_HEADERS)
    try:
        response.send_with_head(body)
        verdict = connection.exchange.reuse()
        reusable = verdict if verdict is not None else _drain(connection)
    except ClientGone:
        connection.exchange.abandon()
        reusable = False
    _count(connection, status, clock)
    return reusable


def _count(connection: Connection, status: int, clock: float, queued: float | None = None,
           proxy_queued: float | None = None) -> None:
    """Count a finished request on the connection and, when stats are on, in the stats.

    ``queued``, ``proxy_queued``: its queue times, for requests that reached the app.

    (A graceful stop treats a connection that has served none as waiting for its first.)
    """
    connection.has_served = True
    connection.body_clock = None  # the next body's rules start afresh
    stats = connection.service.stats
    if stats is not None:
        stats.record(status, connection.bytes_in, connection.bytes_out, monotonic() - clock, queued, proxy_queued)
        connection.bytes_in = connection.bytes_out = 0


def _drain(connection: Connection) -> bool:
    """The exchange said reuse only once the rest of the body is read: read and drop it; then its verdict."""
    exchange = connection.exchange
    verdict = None
    drained = 0
    try:
        while verdict is None:
            drained += len(connection.pull_body())
            verdict = exchange.reuse(drained)
    except (ClientGone, ProtocolError):
        exchange.abandon()
        return False
    return verdict


def _fail(connection: Connection, response: Response) -> None:
    """Answer 500 if nothing was sent yet; otherwise the close tells the client."""
    answer = connection.exchange.failure()
    if not answer:
        return
    response.code = 500
    try:
        connection.send(answer)
    except ClientGone:
        pass


def _reject(connection: Connection, error: ProtocolError, response: Response | None = None) -> None:
    """Answer a request we refuse with its status; the caller closes."""
    log.info("bad request remote=%s status=%d: %s", connection.remote[0], error.status, error.detail)
    if response is not None:
        response.code = error.status
    connection.reject(connection.exchange.refusal(error))
