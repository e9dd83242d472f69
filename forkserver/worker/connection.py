"""One accepted connection's I/O: recv, send, sendfile, each against a deadline.

This is the only module that calls recv, send and sendfile.  What the bytes
mean is the exchange's business (``forkserver.http.exchange``): received
bytes go to it, and what it says to send goes out.  The socket stays
non-blocking for its whole life: the worker's event loop reads it while it
is idle, and while a request is being served the serving thread waits for it
with ``poll`` against a deadline, so a stalled peer costs a timeout, never a
worker.  A connection is owned by exactly one thread at a time (the loop, or
the thread serving it), which is why nothing here takes a lock.
"""

from __future__ import annotations

import fcntl
import io
import logging
import math
import os
import select
import socket
import struct
import tempfile
import termios
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..http.errors import BodyTooLarge, RequestTimeout
from ..http.exchange import Exchange
from ..proxy import MalformedProxyHeader, ProxyHeaderReader
from ..records import Record

if TYPE_CHECKING:
    from ..http.parser import RequestParser
    from .serving import Service

log = logging.getLogger("forkserver")

RECV_BYTES = 65536
# Pieces of a body the loop reads in one go (see Connection._receive_early),
# and the most each of them asks for.
EARLY_READS = 4
EARLY_RECV_BYTES = 256 * 1024
SPOOL_MEMORY_BYTES = 1 << 20  # a spooled body larger than this waits in a temporary file
# Without limit_request_body, a chunked body is spooled up to this much,
# then refused with 413: a client must not fill the disk through one request.
SPOOL_LIMIT_BYTES = 1 << 30
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
# After refusing a request whose body is still arriving, how long we read
# and drop the rest before closing (see Connection.linger).
LINGER_SECONDS = 1.0
# The loop, refusing a request whose body is arriving, reads and drops at
# most this many buffers of it before closing (see Connection.refuse_now).
REFUSE_DRAIN_READS = 16


class BodyRules(Record):
    """How slow or late a request body may be, wherever it is read (the loop, or the app's thread).

    ``min_rate`` bytes a second, averaged over each ``window`` seconds spent
    waiting for the client (0: no minimum); ``deadline`` seconds for a whole
    body from the end of its head (0: none).  See ``BodyClock``.
    """

    __slots__ = ("min_rate", "window", "deadline")

    def __init__(self, min_rate: int = 0, window: float = 10.0, deadline: float = 0.0) -> None:
        self.min_rate = min_rate
        self.window = window
        self.deadline = deadline


class BodyClock:
    """The minimum-rate rule and the deadline of one request body.

    Like Apache's mod_reqtimeout ``MinRate``, but over windows: every
    ``window`` seconds spent waiting for body bytes, at least ``min_rate``
    bytes a second must have come in.  Only time spent waiting for the
    client counts (``wait_from`` .. ``waited_until``), not time the app takes
    between reads, nor time the loop stopped reading because the worker's
    body memory was full.  The deadline counts from the end of the head,
    whatever else happens.
    """

    __slots__ = ("rules", "deadline", "waited", "mark", "since")

    def __init__(self, rules: BodyRules, now: float, received: int) -> None:
        self.rules = rules
        self.deadline = now + rules.deadline if rules.deadline else math.inf
        self.waited = 0.0  # seconds waited in this window
        self.mark = received  # bytes received when this window began
        self.since = now  # when the current wait began

    def wait_from(self, now: float) -> None:
        self.since = now

    def waited_until(self, now: float) -> None:
        self.waited += now - self.since
        self.since = now

    def check(self, now: float, received: int) -> float:
        """Raise RequestTimeout if a rule is broken; else return when to check again.

        ``received``: bytes received on the connection so far (a running count).
        """
        rules = self.rules
        if now >= self.deadline:
            raise RequestTimeout(f"body deadline: not complete after {rules.deadline:g}s")
        if rules.min_rate:
            if self.waited >= rules.window:
                got = received - self.mark
                if got < rules.min_rate * self.waited:
                    raise RequestTimeout(f"body too slow: {got} bytes in {self.waited:.1f}s, "
                                         f"under body_min_rate {rules.min_rate}/s")
                self.mark, self.waited = received, 0.0
            return min(self.deadline, now + rules.window - self.waited)
        return self.deadline


class ClientGone(Exception):
    """The client disconnected while the request or response was in transit."""


class Stalled(ClientGone):
    """The client stopped sending the body, or reading the response, for too long."""


class Connection:
    """An accepted socket and the exchange its bytes feed.

    ``trusted`` says whether the peer is a proxy we believe (``forwarded_allow_ips``);
    only then are forwarding headers read, or a PROXY header expected first.
    Every attribute is set here, always in the same order: instances then
    share one key table, and the interpreter's fast attribute paths stay on
    (starting values as class attributes, set later in varying orders, cost
    a kept-alive request about 3 us).
    """

    # Only a TLS connection (forkserver.worker.tls) ever has a handshake to finish
    # first, and raises more than BlockingIOError when a call must wait.
    handshaking = False
    would_block: tuple[type[OSError], ...] = (BlockingIOError,)

    def __init__(self, sock: socket.SocketType, remote: tuple[str, str], base_environ: dict[str, Any],
                 service: Service, *, trusted: bool = False, parser: RequestParser | None = None) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.remote = remote
        self.base_environ = base_environ
        self.service = service
        self.trusted = trusted
        # Set until the PROXY header has been read; HTTP parsing waits for it.
        self.preamble = ProxyHeaderReader() if trusted and service.proxy_protocol else None
        # With the parser of a closed connection, if the worker passes one (see Worker._close).
        self.exchange = Exchange(service.limits, service.date, service.closing, parser)
        self.has_served = False  # until then, a graceful stop waits for its first request
        self.idle_since = 0.0  # when the loop last took us back
        self.thread = 0  # the scoreboard slot of the thread serving us now
        # Bytes moved since the last request was counted in the stats, which
        # charge each request what moved since the one before it ended: its
        # head (read before it started) included.
        self.bytes_in = self.bytes_out = 0
        # The loop's list of connections with a deferred response, while it
        # serves a batch of ready connections (see send_pair); None otherwise.
        self.outbox: list[Connection] | None = None
        # Responses deferred to the end of the loop's batch, as buffers.
        self.unsent: list[bytes] = []
        self.unsent_bytes = 0
        # The request line and header fields of the last request, and the
        # environ they map to (without wsgi.input): see serving._build_environ.
        self.environ_of: tuple[Any, ...] = ()
        self.environ: dict[str, Any] = {}
        # Whether that environ holds a trusted proxy's stamp of when it got
        # the request, to take the proxy's queue time from.
        self.proxy_stamped = False
        # The rules' clock of the body being received, from when we first
        # waited for it (in the loop or the serving thread) to the request's end.
        self.body_clock: BodyClock | None = None
        # The socket's receive low-water mark: 1, the kernel's own, unless
        # the loop waits for a whole body (see wait_for).
        self.low_water = 1

    # -- loop side: non-blocking ------------------------------------------------

    def receive(self) -> bool:
        """Read what is available and hand it to the exchange; False once the peer has closed."""
        exchange = self.exchange
        if exchange.raw_left:
            return self._receive_early(exchange)
        try:
            data = self.sock.recv(RECV_BYTES)
        except self.would_block:
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
        exchange.receive(data)
        return True

    def _receive_early(self, exchange: Exchange) -> bool:
        """Read more of a Content-Length body gathered before its request starts (see Exchange.gather_body).

        (Before a request starts, only such a body leaves bytes handed
        over.)  Reads on while the socket has more, up to EARLY_READS
        pieces: a fast upload then costs the loop one wake-up per batch of
        pieces, not one per piece.  A piece may be as large as a busy
        socket holds (EARLY_RECV_BYTES), never more than gathering still
        takes: a 1 MiB upload then arrives in about 5 reads instead of 17,
        and the app reads it in fewer pieces (with 64 KiB pieces a 1 MiB
        POST echo cost the worker 782-891 us of CPU, with these 605-636;
        compare_checkouts.py --post 1048576; 128 KiB gained less, and 1 MiB,
        allocated whole for every read, took more).
        """
        reads = EARLY_READS
        if self.low_water > 1:
            if self._queued() >= min(exchange.raw_left, exchange.early_limit - exchange.early_size):
                # Woken by the mark (see wait_for): what gathering still
                # wants is in the kernel, so the app can read it from there
                # without waiting, copied once, instead of once into pieces
                # here and again out of them.  (The loop lowers the mark as
                # it ends the gathering.)
                exchange.gather_no_more()
                return True
            # Woken before that (the kernel short of memory for sockets, or
            # the client's window closing): such wakes come for many
            # connections at once, and reading all each holds, one batch
            # would overrun body_buffer_total before the pause could stop it.
            reads = 1
        for _ in range(reads):
            wanted = min(EARLY_RECV_BYTES, exchange.raw_left, exchange.early_limit - exchange.early_size)
            if wanted <= 0:
                return True  # all of the body, or all the loop takes of it, is in
            try:
                piece = self.sock.recv(wanted)
            except self.would_block:
                return True
            except OSError:
                return False
            if not piece:
                return False
            self.bytes_in += len(piece)
            exchange.raw_body_gathered(piece)
            if len(piece) < wanted:
                return True  # the socket is empty: do not ask it again just to hear so
        return True

    def body_can_wait(self) -> bool:
        """True when a body may wait in the kernel until it is all in (see ``wait_for``): a plain TCP socket.

        A UNIX socket's poll ignores the receive low-water mark, and under
        TLS it would count encrypted bytes.
        """
        sock = self.sock
        return sock.__class__ is socket.SocketType and sock.family != socket.AF_UNIX

    def wait_for(self, count: int) -> None:
        """Have epoll report the socket readable only once ``count`` bytes wait in it (SO_RCVLOWAT); 1 to undo.

        A peer's close, or a receive buffer about to fill, still wakes the
        loop at once.  Linux lets the buffer grow to hold the mark (unless
        it was fixed with SO_RCVBUF) and caps the mark at half of what the
        buffer may grow to.  Best effort: a socket that refuses is woken
        for every arrival, as without it.
        """
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, count)
        except OSError:
            return
        self.low_water = count

    def _queued(self) -> int:
        """Bytes the kernel holds for us, not read yet (SIOCINQ); 0 if it cannot say."""
        try:
            answer = fcntl.ioctl(self.fd, termios.FIONREAD, b"\0\0\0\0")
        except OSError:
            return 0
        return int(struct.unpack("i", answer)[0])

    def stop_waiting(self) -> int:
        """Undo ``wait_for``: be woken for every arrival again; return how many bytes wait to be read."""
        self.wait_for(1)
        return self._queued()

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
        self.environ_of = ()  # built from the old peer, if ever
        return rest

    def next_is_request(self) -> bool:
        """True when a complete request head (or a protocol error) waits to be acted on."""
        return self.exchange.next_is_request()

    def mid_request(self) -> bool:
        """True if the peer has sent part of a request we have not seen the end of."""
        if self.preamble is not None:
            return bool(self.preamble.buffer)
        return self.exchange.mid_request()

    def close(self) -> Exchange | None:
        """Close the socket, after any deferred response has gone out; safe to call twice.

        Returns the exchange, released, the first time: the worker may take
        its parser for another connection (see ``Exchange.give_up_parser``).
        A second call does nothing and returns None.
        """
        sock = self.sock
        if sock.fileno() < 0:
            return None
        if self.unsent:
            try:
                self.flush()
            except ClientGone:
                pass
        sock.close()
        exchange = self.exchange
        exchange.release()
        return exchange

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
        if event == select.POLLIN:
            self._wait_for_body(poller, timeout)
        elif not poller.poll(None if timeout is None else timeout * 1000):
            raise Stalled(f"send timeout: no progress for {timeout:g}s")
        self.service.board.request_progressed(self.thread)

    def _wait_blocked(self, exc: OSError, event: int) -> None:
        """Wait for ``event``, what the call that raised ``exc`` needs (TLS may need the other one)."""
        self._wait(event)

    def _wait_for_body(self, poller: Any, timeout: float | None) -> None:
        """Wait for body bytes: until they come, a stall of ``timeout``, or a body rule is broken (RequestTimeout)."""
        now = time.monotonic()
        clock = self.body_clock
        if clock is None:
            clock = self.body_clock = BodyClock(self.service.body, now, self.bytes_in)
        clock.wait_from(now)
        stall_ends = math.inf if timeout is None else now + timeout
        while True:
            check_at = clock.check(now, self.bytes_in)
            wait = min(stall_ends, check_at) - now
            ready = poller.poll(None if wait == math.inf else max(0.0, wait) * 1000)
            now = time.monotonic()
            clock.waited_until(now)
            if ready:
                return
            if now >= stall_ends:
                raise Stalled(f"body timeout: no progress for {timeout:g}s")

    def send(self, data: bytes) -> None:
        """Send all of ``data``, waiting for the peer as long as it keeps up."""
        if self.unsent:
            self.flush()
        self._send_all((data,), len(data))

    def send_pair(self, head: bytes, body: bytes, last: bool = False) -> None:
        """Send a response head and a piece of body: one system call, and no copy of a large body.

        ``last``: this completes a response after which the connection stays
        open.  While the loop works through a batch of ready connections
        (it gave us its ``outbox`` list), such a response waits for the end
        of the batch and then goes out with the others, back to back: waking
        a client that sleeps costs the sender more than the send, and one
        wake-up then covers the whole batch.
        """
        body_size = len(body)
        size = len(head) + body_size
        # A small body is copied behind the head; a large one goes with sendmsg() as it is.
        parts = (head + body,) if body_size < SEND_JOIN_BYTES else (head, body)
        outbox = self.outbox
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
                except self.would_block as exc:
                    self._wait_blocked(exc, select.POLLOUT)
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
            except self.would_block as exc:
                self._wait_blocked(exc, select.POLLIN)
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
        self.exchange.receive(memoryview(buffer)[:received])

    def _ask_for_body(self) -> None:
        """Send the 100 Continue the client may be waiting for before it sends the body."""
        interim = self.exchange.ask_for_body()
        if interim:
            self.send(interim)

    def body_into(self, buffer: Any) -> int:
        """Read body bytes straight from the socket into ``buffer`` (one copy, no parser).

        Returns -1 when parsed pieces, or the end of the body, come first:
        then ``pull_body`` has them.
        """
        exchange = self.exchange
        left = exchange.raw_body_left()
        if not left:
            return -1  # (only a body already asked for is ever handed over)
        received = self._receive_into(buffer, min(len(buffer), left))
        exchange.raw_body_received(received)
        return received

    def pull_body(self) -> bytes | bytearray:
        """Return the next piece of the current body; ``b""`` once it is complete.

        Raises the ProtocolError the parser found in the body.
        """
        exchange = self.exchange
        self._ask_for_body()
        while True:
            piece = exchange.next_body_piece()
            if piece is not None:
                return piece
            left = exchange.raw_body_left()
            if left:
                piece = bytearray(min(RECV_BYTES, left))
                received = self._receive_into(piece, len(piece))
                del piece[received:]
                exchange.raw_body_received(received)
                return piece
            self._receive_blocking()

    def spool_body(self) -> tuple[Any, int]:
        """Read a whole body into memory (a file past SPOOL_MEMORY_BYTES); return it and its size.

        Limits and timeouts apply while it arrives, exactly as when
        streaming; limit_request_body, or else SPOOL_LIMIT_BYTES, bounds it
        (BodyTooLarge).  A temporary directory that cannot take it raises
        the OSError; the file is gone either way.
        """
        limit = 0 if self.service.limits.body_bytes else SPOOL_LIMIT_BYTES  # (the parser checks the other)
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES)
        size = 0
        try:
            while piece := self.pull_body():
                size += len(piece)
                if limit and size > limit:
                    raise BodyTooLarge(f"a chunked body over {limit} bytes, the spool limit")
                spool.write(piece)
            spool.seek(0)
        except BaseException:
            spool.close()
            raise
        return spool, size

    def linger(self) -> None:
        """After refusing a request whose body is still arriving: let the client read the answer.

        Closing a socket with bytes unread sends a reset, which can reach
        the client before it has read the answer, and make it discard it.
        So stop sending (the client sees the end of the answer), then read
        and drop what still comes until the client closes, or for at most
        LINGER_SECONDS, which bounds what a client can hold us for.
        """
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        buffer = bytearray(RECV_BYTES)
        deadline = time.monotonic() + LINGER_SECONDS
        while (left := deadline - time.monotonic()) > 0 and poller.poll(left * 1000):
            try:
                if not self.sock.recv_into(buffer):
                    return
            except BlockingIOError:
                continue
            except OSError:
                return

    def refuse_now(self, data: bytes) -> None:
        """Loop side: send a refusal without waiting, best effort; the caller closes next.

        What the client already sent is read and dropped first, so that the
        close does not reset the connection under the answer (as far as we
        can without waiting: see ``linger`` for the serving side).
        """
        self.reject(data)
        try:
            self.sock.shutdown(socket.SHUT_WR)
            buffer = bytearray(RECV_BYTES)
            for _ in range(REFUSE_DRAIN_READS):  # a client still sending fast must not hold the loop
                if not self.sock.recv_into(buffer):
                    return
        except OSError:  # BlockingIOError once nothing is left, or the client is gone
            pass

    def reject(self, data: bytes) -> None:
        """Send a refusal (after anything deferred), best effort: the connection closes next."""
        try:
            if self.unsent:
                self.flush()
            self.sock.send(data)
        except (OSError, ClientGone):
            pass


class BodyStream(io.RawIOBase):
    """The raw stream under ``wsgi.input``: reads body bytes until the body ends.

    The connection either reads body bytes straight into the caller's buffer
    (``body_into``), or, when the parser already holds some (or the body is
    chunked), hands over pieces (``pull_body``; ``b""`` once the body is
    complete), so reads can never run into the next pipelined request.  The
    buffered reader on top supplies read/readline/readlines/iteration.
    """

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self._pending:
            direct = self._connection.body_into(buffer)
            if direct >= 0:
                return direct
            self._pending = memoryview(self._connection.pull_body())
            if not self._pending:
                return 0
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n
