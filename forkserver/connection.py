"""One accepted connection: bytes in through the parser, responses out.

This is the only module that calls recv, send and sendfile.  The socket stays
non-blocking for its whole life: the worker's event loop reads it while it is
idle, and while a request is being served the serving thread waits for it
with ``poll`` against a deadline, so a stalled peer costs a timeout, never a
worker.  A connection is owned by exactly one thread at a time (the loop, or
the thread serving it), which is why nothing here takes a lock.
"""

from __future__ import annotations

import io
import logging
import os
import select
import socket
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .http.errors import ProtocolError
from .http.events import END_OF_MESSAGE, BodyChunk, Request
from .http.parser import Limits, RequestParser
from .http.response import CONTINUE_RESPONSE, DateHeader, error_response
from .logs import AccessLog
from .proxy import (
    FORWARDING_ENVIRON_KEYS,
    MalformedProxyHeader,
    ProxyHeaderReader,
    Trust,
    apply_origin,
    read_forwarded,
)
from .scoreboard import Scoreboard
from .stats import Reporter
from .wsgi import (
    AppError,
    ClientGone,
    Input,
    Response,
    Stalled,
    build_environ,
    run_app,
)

log = logging.getLogger("forkserver")

RECV_BYTES = 65536
# Unread request body we will still read and discard to keep a connection
# alive; a larger leftover is cheaper to close than to drain.
DRAIN_LIMIT_BYTES = 1 << 20
SPOOL_MEMORY_BYTES = 1 << 20  # a chunked body larger than this waits in a temporary file
# A body this small is copied behind the head and sent with send(); a
# larger one goes out with sendmsg() straight from the app's buffer.
SEND_JOIN_BYTES = 16384
# Deferred buffers per connection before a response goes out at once anyway
# (a client pipelining hundreds of requests must not outgrow sendmsg's iovec).
DEFER_MAX_PARTS = 64
# A larger body goes out at once: held to the end of a batch, bodies of
# every upload in it would pile up in memory.  Smaller ones are worth
# holding: sent back to back, 64 KiB responses cost the worker 64 us each
# against 80 us when each went out as it was made (compare_checkouts.py
# --path /64k, 6 rounds: 16.9k against 14.8k req/s).
DEFER_MAX_BYTES = 128 * 1024
HEALTH_METHODS = ("GET", "HEAD")
HEALTH_BODY = b"ok\n"
HEALTH_HEADERS = [("Content-Type", "text/plain")]


@dataclass(eq=False, repr=False)
class Service:
    """What every connection of a worker serves with; shared, read-only per request."""

    app: Callable[..., Any]
    limits: Limits
    date: DateHeader
    access_log: AccessLog | None
    io_timeout: float | None
    keep_alive: Callable[[], bool]
    board: Scoreboard
    stats: Reporter | None
    show: Callable[[str, str], None]
    trust: Trust = field(default_factory=lambda: Trust(()))
    proxy_protocol: bool = False
    health_target: bytes = b""  # ``health_path`` as a request target; b"" (never a target) when off
    # Set by a single-threaded worker's loop while it serves a batch of ready
    # connections: those with a deferred response (see Connection.send_pair).
    outbox: list[Connection] | None = None


class Connection:
    """An accepted socket, its parser, and the events not yet acted on.

    ``trusted`` says whether the peer is a proxy we believe (``forwarded_allow_ips``);
    only then are forwarding headers read, or a PROXY header expected first.
    Every attribute is set here, always in the same order: instances then
    share one key table, and the interpreter's fast attribute paths stay on
    (starting values as class attributes, set later in varying orders, cost
    a kept-alive request about 3 us).
    """

    def __init__(self, sock: socket.SocketType, remote: tuple[str, str], base_environ: dict[str, Any],
                 service: Service, *, trusted: bool = False) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.remote = remote
        self.base_environ = base_environ
        self.service = service
        self.trusted = trusted
        # Set until the PROXY header has been read; HTTP parsing waits for it.
        self.preamble = ProxyHeaderReader() if trusted and service.proxy_protocol else None
        self.parser = RequestParser(service.limits)
        self.events: deque[Any] = deque()
        self.requests_served = 0
        self.idle_since = 0.0  # when the loop last took us back
        self._body_done = True
        self._continue_due = False
        self.thread = 0  # the scoreboard slot of the thread serving us now
        # Bytes moved since the last request was counted in the stats, which
        # charge each request what moved since the one before it ended: its
        # head (read before it started) included.
        self.bytes_in = self.bytes_out = 0
        # Responses deferred to the end of the loop's batch (see send_pair), as buffers.
        self.unsent: list[bytes] = []
        self.unsent_bytes = 0
        self._raw_left = 0  # body bytes still to read past the parser (see _raw_body_left)
        # The request line and header fields of the last request, and the
        # environ they map to (without wsgi.input): see _environ_for.
        self._environ_of: tuple[Any, ...] = ()
        self._environ: dict[str, Any] = {}

    # -- loop side: non-blocking ------------------------------------------------

    def receive(self) -> bool:
        """Read what is available and parse it; False once the peer has closed."""
        try:
            data = self.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not data:
            return False
        self.bytes_in += len(data)
        if self.preamble is not None:
            try:
                data = self._take_proxy_header(self.preamble, data)
            except MalformedProxyHeader as exc:
                log.info("bad PROXY header remote=%s: %s", self.remote[0] or "unix", exc)
                return False
            if not data:
                return True
        self.events.extend(self.parser.feed(data))
        return True

    def _take_proxy_header(self, reader: ProxyHeaderReader, data: bytes) -> bytes:
        """Feed the PROXY header reader; return the bytes after the header (``b""`` until it is complete)."""
        done = reader.feed(data)
        if done is None:
            return b""
        header, rest = done
        self.preamble = None
        if header.source is not None:
            self.remote = header.source
            # From here on the peer that wrote the HTTP bytes is the client the
            # header names, not the proxy: an L4 proxy passes them unchanged.
            self.trusted = header.source[0] in self.service.trust
        if header.tls:
            self.base_environ = {**self.base_environ, "wsgi.url_scheme": "https"}
        self._environ_of = ()  # built from the old peer, if ever
        return rest

    def next_is_request(self) -> bool:
        """True when a complete request head (or a protocol error) waits to be acted on."""
        return bool(self.events) and not isinstance(self.events[0], BodyChunk)

    def mid_request(self) -> bool:
        """True if the peer has sent part of a request we have not seen the end of."""
        if self.preamble is not None:
            return bool(self.preamble.buffer)
        return bool(self.events) or self.parser.mid_message()

    def close(self) -> None:
        """Close the socket, after any deferred response has gone out; safe to call twice."""
        if self.unsent:
            try:
                self.flush()
            except ClientGone:
                pass
        self.sock.close()
        self.parser.release()

    def flush(self) -> None:
        """Send the responses ``send_pair`` deferred; raises ClientGone if the peer is gone."""
        parts, size, self.unsent, self.unsent_bytes = self.unsent, self.unsent_bytes, [], 0
        counted = self.bytes_out
        try:
            self._send_all(parts, size)
        finally:
            self.bytes_out = counted  # they were counted as they were deferred

    # -- serving side: waits on deadlines ----------------------------------------

    def _wait(self, event: int) -> None:
        poller = select.poll()
        poller.register(self.fd, event)
        timeout = self.service.io_timeout
        if not poller.poll(None if timeout is None else timeout * 1000):
            what = "body" if event == select.POLLIN else "send"
            raise Stalled(f"{what} timeout: no progress for {timeout:g}s")
        self.service.board.request_progressed(self.thread)

    def send(self, data: bytes) -> None:
        """Send all of ``data``, waiting for the peer as long as it keeps up."""
        if self.unsent:
            self.flush()
        self._send_all((data,), len(data))

    def send_pair(self, head: bytes, body: bytes, last: bool = False) -> None:
        """Send a response head and a piece of body: one system call, and no copy of a large body.

        ``last``: this completes a response after which the connection stays
        open.  While the loop works through a batch of ready connections
        (``Service.outbox`` is a list), such a response waits for the
        end of the batch and then goes out with the others, back to back:
        waking a client that sleeps costs the sender more than the send,
        and one wake-up then covers the whole batch.
        """
        body_size = len(body)
        size = len(head) + body_size
        # A small body is copied behind the head; a large one goes with sendmsg() as it is.
        parts = (head + body,) if body_size < SEND_JOIN_BYTES else (head, body)
        outbox = self.service.outbox
        unsent = self.unsent
        if last and outbox is not None and body_size <= DEFER_MAX_BYTES and len(unsent) < DEFER_MAX_PARTS:
            if not unsent:
                outbox.append(self)
            unsent += parts
            self.unsent_bytes += size
            self.bytes_out += size
            return
        if unsent:
            self.flush()
        self._send_all(parts, size)

    def _send_all(self, parts: Sequence[bytes], size: int) -> None:
        """Send all ``size`` bytes of ``parts``, in order: one system call when the socket takes them all."""
        try:
            sent = self.sock.send(parts[0]) if len(parts) == 1 else self.sock.sendmsg(parts)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise ClientGone(str(exc)) from None
        self.bytes_out += sent
        if sent < size:
            self._send_rest(parts, sent)

    def _send_rest(self, parts: Sequence[bytes], sent: int) -> None:
        """Send what is left of ``parts`` past the first ``sent`` bytes, waiting for the peer."""
        for part in parts:
            if sent >= len(part):
                sent -= len(part)
                continue
            view = memoryview(part)[sent:]
            sent = 0
            while view:
                try:
                    written = self.sock.send(view)
                except BlockingIOError:
                    self._wait(select.POLLOUT)
                    continue
                except OSError as exc:
                    raise ClientGone(str(exc)) from None
                self.bytes_out += written
                view = view[written:]

    def sendfile(self, in_fd: int, offset: int, count: int) -> int:
        """Send up to ``count`` bytes of a file with ``os.sendfile``; return bytes sent."""
        if self.unsent:
            self.flush()
        while True:
            try:
                sent = os.sendfile(self.fd, in_fd, offset, count)
                self.bytes_out += sent
                return sent
            except BlockingIOError:
                self._wait(select.POLLOUT)
            except OSError as exc:
                raise ClientGone(str(exc)) from None

    def _receive_into(self, buffer: Any, want: int) -> int:
        """Read at most ``want`` body bytes into ``buffer``, waiting on the deadline; return how many."""
        while True:
            try:
                received = self.sock.recv_into(buffer, want)
            except BlockingIOError:
                self._wait(select.POLLIN)
                continue
            except OSError as exc:
                raise ClientGone(str(exc)) from None
            if not received:
                raise ClientGone("peer closed while sending the body")
            self.bytes_in += received
            return received

    def _receive_blocking(self) -> None:
        """Read more of a body the parser decodes (chunked, or the start of one), waiting on the deadline."""
        buffer = bytearray(RECV_BYTES)
        received = self._receive_into(buffer, RECV_BYTES)
        self.events.extend(self.parser.feed(memoryview(buffer)[:received]))

    def _ask_for_body(self) -> None:
        """Send the 100 Continue the client waits for, once, before we wait for its body."""
        if self._continue_due:
            self._continue_due = False
            self.send(CONTINUE_RESPONSE)

    def _raw_body_left(self) -> int:
        """Body bytes we read off the socket ourselves, past the parser; 0 if none.

        Only once every parsed event is consumed is the parser's current
        message the request being served; only then may it hand the rest of a
        Content-Length body over (see ``RequestParser.hand_over_body``).
        """
        if not self._raw_left and not self.events:
            self._raw_left = self.parser.hand_over_body()
        return self._raw_left

    def _receive_raw_body(self, buffer: Any) -> int:
        """Read handed-over body bytes into ``buffer``, waiting on the deadline; return how many."""
        received = self._receive_into(buffer, min(len(buffer), self._raw_left))
        self._raw_left -= received
        if not self._raw_left:
            self.events.append(END_OF_MESSAGE)  # the body is complete, as the parser would have said
        return received

    def body_into(self, buffer: Any) -> int:
        """Read body bytes straight from the socket into ``buffer`` (one copy, no parser).

        Returns -1 when parsed pieces, or the end of the body, come first:
        then ``pull_body`` has them.
        """
        if self.events or self._body_done or not self._raw_body_left():
            return -1
        self._ask_for_body()
        return self._receive_raw_body(buffer)

    def pull_body(self) -> bytes | bytearray:
        """Return the next piece of the current body; ``b""`` once it is complete."""
        if self._body_done:
            return b""
        self._ask_for_body()
        while not self.events:
            if self._raw_body_left():
                piece = bytearray(min(RECV_BYTES, self._raw_left))
                del piece[self._receive_raw_body(piece):]
                return piece
            self._receive_blocking()
        event = self.events.popleft()
        if isinstance(event, BodyChunk):
            return event.data
        if event is END_OF_MESSAGE:
            self._body_done = True
            return b""
        raise event  # a ProtocolError in the body, e.g. a bad chunk size

    def _spool_body(self) -> tuple[Any, int]:
        """Read a whole chunked body into memory (a file past SPOOL_MEMORY_BYTES).

        Many apps (Django, bottle, anything that trusts CONTENT_LENGTH) cannot
        read a body of unknown length, so a chunked body is read before the
        app runs and handed over with its length, as waitress does.  Limits
        and timeouts apply while it arrives, exactly as when streaming.
        """
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES)
        size = 0
        while piece := self.pull_body():
            spool.write(piece)
            size += len(piece)
        spool.seek(0)
        return spool, size

    def _discard_body(self) -> bool:
        """Read and drop what the app left of the body; False if not worth it."""
        if self._continue_due:
            return False  # the client is still waiting to be asked for it
        drained = 0
        while not self._body_done:
            drained += len(self.pull_body())
            if drained > DRAIN_LIMIT_BYTES:
                return False
        return True

    def must_close(self) -> bool:
        """Asked as a response head goes out: may the connection not be reused after it?

        Closing is the only honest answer when the client still holds a body
        we never asked for, or when the worker is stopping.
        """
        return self._continue_due or not self.service.keep_alive()

    def serve(self, thread: int) -> bool:
        """Answer the request at the head of the queue; True if the connection may be reused.

        ``thread`` names the scoreboard slot this request is shown in while it runs.
        """
        self.thread = thread
        request = self.events.popleft()
        if request.__class__ is not Request:
            self.reject(request)  # a ProtocolError
            return False
        service = self.service
        clock = time.perf_counter()
        self._body_done = False
        self._continue_due = request.expect_continue and (request.chunked or bool(request.content_length))
        response = Response(self, service.date.line, request.method == "HEAD", request.version == "1.0",
                            request.keep_alive and not self.parser.upgraded)
        if request.target == service.health_target and request.method in HEALTH_METHODS:
            return self._answer_health(response, clock)
        spooled = -1
        if request.chunked:
            try:
                body, spooled = self._spool_body()
            except ProtocolError as error:
                self.reject(error, response)
                return False
            except ClientGone as exc:
                log.info("%s remote=%s: closing", exc, self.remote[0] or "unix")
                return False
        elif request.content_length:
            body = io.BufferedReader(Input(self))
        else:
            body = io.BytesIO()  # no body: nothing to stream, and far cheaper to make
            if self.events and self.events[0] is END_OF_MESSAGE:
                self.events.popleft()  # the end of this body-less request, which the parser emits with it
                self._body_done = True
        environ = self._environ_for(request).copy()
        environ["wsgi.input"] = body
        if spooled >= 0:
            # The body is de-chunked and counted now: tell the app its length,
            # and no longer that it is chunked, since it is not any more.
            environ["CONTENT_LENGTH"] = str(spooled)
            environ.pop("HTTP_TRANSFER_ENCODING", None)
        board = service.board
        board.request_started(thread, request.method, environ["PATH_INFO"], environ["REMOTE_ADDR"])
        service.show(request.method, environ["PATH_INFO"])
        try:
            reusable = self._run(environ, response)
        finally:
            board.request_finished(thread)
        self._count(response.code, clock)
        if service.access_log is not None:
            duration = time.perf_counter() - clock
            service.access_log.log(environ, response, time.time() - duration, duration)
        return reusable

    def _environ_for(self, request: Request) -> dict[str, Any]:
        """The environ of ``request`` without ``wsgi.input``; the caller copies it.

        Clients mostly send the same request line and header fields on every
        request of a connection (a browser, a proxy, a load generator): the
        environ is then built once, forwarding headers and all, and each
        request pays only for a copy of it (0.3 us against 1.8).
        """
        key = (request.method, request.target, request.version, request.headers)
        if key != self._environ_of:
            environ = build_environ(request, self.base_environ, self.remote)
            if self.trusted and not environ.keys().isdisjoint(FORWARDING_ENVIRON_KEYS):
                apply_origin(environ, read_forwarded(request.headers, self.service.trust))
            self._environ_of, self._environ = key, environ
        return self._environ

    def _answer_health(self, response: Response, clock: float) -> bool:
        """``health_path``: 200 "ok" from the worker itself; the app is not called, nothing access-logged."""
        response.start_response("200 OK", HEALTH_HEADERS)
        try:
            response.send_whole(HEALTH_BODY)
            reusable = response.keep_alive and self._discard_body()
        except (ClientGone, ProtocolError):
            reusable = False
        self._count(200, clock)
        return reusable

    def _count(self, status: int, clock: float) -> None:
        """Count a finished request on this connection and, when stats are on, in the stats.

        (A graceful stop treats a connection that has served none as waiting for its first.)
        """
        self.requests_served += 1
        stats = self.service.stats
        if stats is not None:
            stats.record(status, self.bytes_in, self.bytes_out, time.perf_counter() - clock)
            self.bytes_in = self.bytes_out = 0

    def _run(self, environ: dict[str, Any], response: Response) -> bool:
        """Run the app for one request, turning every failure into the right answer."""
        service = self.service
        try:
            run_app(service.app, environ, response)
        except Stalled as exc:
            log.info("%s remote=%s: closing", exc, environ["REMOTE_ADDR"] or "unix")
            return False
        except ClientGone as exc:
            log.debug("client gone remote=%s: %s", self.remote[0], exc)
            return False
        except ProtocolError as error:
            if not response.head_sent:
                self.reject(error, response)
            return False
        except AppError as exc:
            log.error("app broke PEP 3333 path=%s: %s", environ["PATH_INFO"], exc)
            self._fail(response)
            return False
        except Exception:
            log.exception("app raised on %s %s", environ["REQUEST_METHOD"], environ["PATH_INFO"])
            self._fail(response)
            return False
        if not response.keep_alive:
            return False
        try:
            return self._discard_body()
        except (ClientGone, ProtocolError):
            return False

    def _fail(self, response: Response) -> None:
        """Answer 500 if nothing was sent yet; otherwise the close tells the client."""
        if response.head_sent:
            return
        response.code = 500
        try:
            self.send(error_response(500, "Internal Server Error", self.service.date.line()))
        except ClientGone:
            pass

    def reject(self, error: ProtocolError, response: Response | None = None) -> None:
        """Answer a request we refuse with its status; the caller closes."""
        log.info("bad request remote=%s status=%d: %s", self.remote[0], error.status, error.detail)
        if response is not None:
            response.code = error.status
        try:
            if self.unsent:
                self.flush()
            self.sock.send(error_response(error.status, error.reason, self.service.date.line()))
        except (OSError, ClientGone):
            pass
