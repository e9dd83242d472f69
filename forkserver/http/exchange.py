"""One request/response exchange on a connection, as a state machine: no I/O.

Every rule that decides how a message is framed, and whether the connection
may carry another request after it, is decided here and nowhere else:

* the request side: which parsed events belong to the request being
  answered, where its body ends (including the part of a Content-Length
  body read past the parser), and when a ``100 Continue`` is due;
* the response side: Content-Length or chunked, no body for HEAD, 204 and
  304, the last chunk, and never more body than the length promised;
* the keep-alive verdict: the client's wish under its HTTP version, an
  Upgrade request, a body the client still holds or that was left unread,
  a response whose end only a close can mark, and the server closing
  (stopping, recycling, keep-alive off), which the server sets on a
  ``Closing`` it handed over instead of being asked;
* pipelining order: the next request is taken only once the one before is
  answered and its body consumed.

The caller moves the bytes: it feeds what it receives to ``receive``, sends
what the methods here return, and asks which state each side is in.  Each
side's state is one value held as data (see the constants below), in the
spirit of h11's state machine; a call that makes no sense in the current
state raises ``ExchangeError``, a bug in the caller, never a client's fault.
"""

from __future__ import annotations

from collections import deque

from .errors import ProtocolError
from .events import END_OF_MESSAGE, BodyChunk, Event, Request
from .parser import Limits, RequestParser
from .response import CONTINUE_RESPONSE, LAST_CHUNK, DateHeader, assemble_head, error_response, frame_chunk

# The client's side: what it is sending.
IDLE = "IDLE"  # nothing of a request is being acted on (between requests)
WAIT_CONTINUE = "WAIT_CONTINUE"  # a body is announced, and the client waits for 100 Continue to send it
SEND_BODY = "SEND_BODY"  # the body is on its way (or may be: not all of it has been consumed)
DONE = "DONE"  # the request is complete (our side: the response is complete)
ERROR = "ERROR"  # it sent something we refuse; nothing after it can be framed
# Our side: what we are sending.  IDLE and DONE as above, and:
SEND_RESPONSE = "SEND_RESPONSE"  # a request is taken; its response head has not gone out
# SEND_BODY: the head is out, the body is going out
MUST_CLOSE = "MUST_CLOSE"  # the connection carries nothing more: close it once what is queued is sent

# What the caller does with the connection next (see ``next_step``).
WAIT = 0  # no whole request head waits: receive more
SERVE = 1  # a request (or a refused one) waits to be started
GATHER = 2  # a request waits whose body is gathered first (see ``gather_body``): receive more of it

# Request body left unread by the app that is still read and dropped to keep
# the connection; a larger leftover is cheaper to close than to drain.
DRAIN_LIMIT_BYTES = 1 << 20
# A body gathered before its request starts joins its pieces up to this size.
EARLY_PIECE_BYTES = 65536
CONTENT_LENGTH_LINE = b"Content-Length: %d\r\n"
NO_CONTENT_STATUSES = frozenset({204, 304})  # statuses whose response has no content (RFC 9110 §15.3.5, §15.4.5)


class ExchangeError(Exception):
    """The caller asked for something the current state does not allow (a bug, not the client's fault)."""


class Closing:
    """The server's share of the keep-alive verdict, handed to every exchange as data.

    The server sets ``active`` when it will take no more requests: it is
    stopping, recycling, or keep-alive is off.  A response whose head goes
    out after that says ``Connection: close``; the exchange reads the flag,
    the server never has to be called back.
    """

    __slots__ = ("active",)

    def __init__(self, active: bool = False) -> None:
        self.active = active


class Exchange:
    """The request/response exchanges of one connection, one at a time.

    Bytes in: ``receive``.  A request: ``next_is_request``, then ``start``.
    Its body: ``ask_for_body``, ``next_body_piece``, ``raw_body_left`` /
    ``raw_body_received``.  The response: ``head``, ``frame`` or
    ``file_span``/``count``, ``end``; or ``refusal`` / ``failure`` when there
    is no response to frame.  Then ``reuse`` gives the verdict and, when it
    is yes, makes the exchange ready for the next request.

    Every attribute is set here, in one order, so instances share one key
    table and attribute access stays on the interpreter's fast path.
    """

    def __init__(self, limits: Limits, date: DateHeader, closing: Closing, parser: RequestParser | None = None) -> None:
        """``parser``: one another exchange gave up (see ``give_up_parser``), renewed here; else a new one."""
        # Parsed events not yet acted on: the parser appends, we take from the left.
        self.events: deque[Event | ProtocolError] = deque()
        if parser is None:
            parser = RequestParser(limits, self.events)
        else:
            parser.renew(self.events)
        self.parser = parser
        # receive(data): parse bytes the client sent, which may hold several
        # requests or part of one.  The parser's own pump, bound here: called
        # on every read, it is one call instead of two.
        self.receive = parser.pump
        self.date = date
        self.closing = closing
        self.their_state = IDLE
        self.our_state = IDLE
        self.request: Request | None = None
        # The keep-alive verdict so far: starts as the client's wish, and
        # turns False for good once anything rules reuse out (a body the
        # client holds until asked for counts only until it is asked for).
        self.keep_alive = False
        # Body bytes past the parser: the rest of a Content-Length body the
        # caller reads off the wire itself (see raw_body_left).
        self.raw_left = 0
        # The response's framing, decided by ``head``: body bytes the head
        # still allows (None: no limit, the body is chunked or ends with the
        # connection; 0 for HEAD, 204, 304), and whether it is chunked.
        self.left: int | None = None
        self.chunked = False
        self.sent = 0  # body bytes that went out (chunk framing not counted)
        # When the app declared no Content-Length: the one ``head`` added, or -1.
        self.length_added = -1
        # The start of the next request's body, gathered before the request
        # is started (see ``gather_body``), in pieces, and their total size;
        # the first body pieces once the request is started.
        self.early: deque[bytes | bytearray] | None = None
        self.early_size = 0
        self.early_limit = 0  # how much of it gather_body takes before the request starts

    # -- bytes in (and receive, bound in __init__) ------------------------------------

    def next_is_request(self) -> bool:
        """True when a whole request head (or a refused one) waits to be started."""
        return self.next_step(0) != WAIT

    def next_step(self, body_limit: int) -> int:
        """After bytes came in, or a response went out: WAIT, SERVE or GATHER (up to ``body_limit`` bytes).

        The worker's loop asks this once per turn: it is ``next_is_request``
        and ``gather_body`` in one call (two calls fewer: with the hop
        through the connection gone, about 15 of a kept-alive request's
        1,580 bytecodes, scripts/loop_cost.py).
        """
        events = self.events
        if not events:
            return WAIT
        request = events[0]
        if request.__class__ is Request:  # asked first: it is the usual event here
            if (request.chunked or request.content_length) \
                    and self.gather_body(body_limit):  # type: ignore[union-attr]
                return GATHER
            return SERVE
        return WAIT if request.__class__ is BodyChunk else SERVE

    def mid_request(self) -> bool:
        """True if the client has sent part of a request we have not seen the end of."""
        return bool(self.events) or self.parser.mid_message()

    def release(self) -> None:
        """The connection is closed: let go of llhttp (see ``RequestParser.release``)."""
        self.parser.release()

    def give_up_parser(self) -> RequestParser:
        """After ``release``: hand the parser over to the next connection's exchange, which renews it.

        This exchange keeps no way to it: an app that holds on to its
        request's ``write`` or ``wsgi.input`` past the request's end reaches
        this exchange, never the parser another connection now feeds.  A
        renewal costs 3,850 machine instructions less than a new parser (its
        allocation, and the request line check it caches: about 3% of a
        ``Connection: close`` request; callgrind, 4,000 of each).
        """
        parser = self.parser
        self.parser = self.receive = None  # type: ignore[assignment]  # parses nothing more
        return parser

    def gather_body(self, limit: int) -> bool:
        """Before the next request starts: gather its body into memory; True while more must be received.

        The caller (the worker's loop) then keeps receiving, and starts the
        request once this says False: its body is complete (or an error in
        it is parsed), at least ``limit`` bytes of it are gathered, or it
        has none to wait for.  A request with ``Expect: 100-continue`` is not
        waited for: its client holds the body until the app asks for it.
        Small pieces are joined (up to EARLY_PIECE_BYTES), so a body sent
        one byte at a time costs its size in memory, not an object per
        byte.  The rest of a Content-Length body is handed over
        (``raw_left``): the caller receives it and gives the pieces back
        through ``raw_body_gathered``.  Large pieces are kept as they came,
        so a body read this way is copied no more often than one the app
        reads from the socket itself, and the memory it holds is what
        arrived, never what was announced.
        """
        events = self.events
        request = events[0]
        if request.__class__ is not Request or not (request.chunked or request.content_length):  # type: ignore[union-attr]
            return False
        if request.expect_continue or not limit:  # type: ignore[union-attr]
            return False
        if self.early is None:
            self.early = deque()
            self.early_limit = limit
        if len(events) > 1:
            events.popleft()
            while events and events[0].__class__ is BodyChunk:
                self._keep_early(events.popleft().data)  # type: ignore[union-attr]
            events.appendleft(request)
            if len(events) > 1:
                return False  # what follows its last piece is its end, or an error in it
        if self.early_size >= self.early_limit:
            return False
        if not self.raw_left:
            self.raw_left = self.parser.hand_over_body()
        return True

    def _keep_early(self, piece: bytes | bytearray) -> None:
        """Add a piece to the gathered body: joined to the last one while both are small."""
        early = self.early
        size = len(piece)
        if early and len(early[-1]) + size <= EARLY_PIECE_BYTES:  # type: ignore[arg-type]
            last = early[-1]  # type: ignore[index]
            if last.__class__ is not bytearray:
                last = early[-1] = bytearray(last)  # type: ignore[index]
            last += piece  # type: ignore[operator]
        else:
            early.append(piece)  # type: ignore[union-attr]
        self.early_size += size

    def gather_no_more(self) -> None:
        """Start the next request with the body gathered so far: the app reads the rest off the wire."""
        self.early_limit = self.early_size

    def gathered(self) -> int:
        """Body bytes ``gather_body`` holds for the next request."""
        return 0 if self.early is None else self.early_size

    def gather_left(self, limit: int) -> int:
        """Body bytes still to receive before ``gather_body`` lets the next request start."""
        request = self.events[0]
        wanted = limit if request.chunked else min(limit, request.content_length)  # type: ignore[union-attr]
        return wanted - self.gathered()

    def raw_body_gathered(self, piece: bytes) -> None:
        """Handed-over body bytes of the next request were received before it started (see ``gather_body``)."""
        self._keep_early(piece)
        self.raw_left -= len(piece)
        if not self.raw_left:
            self.events.append(END_OF_MESSAGE)  # the parser was handed the rest: its end is ours to tell

    # -- one exchange --------------------------------------------------------------

    def start(self) -> Request:
        """Take the next request; raise the ``ProtocolError`` that stands where it would be.

        After a ProtocolError the only answer is ``refusal()``, then closing.
        """
        if self.our_state is not IDLE:
            raise ExchangeError(f"start() with our side {self.our_state}")
        event = self.events.popleft()
        self.our_state = SEND_RESPONSE
        if event.__class__ is not Request:
            self.their_state = ERROR
            self.keep_alive = False
            raise event  # type: ignore[misc]
        self.request = event  # type: ignore[assignment]
        if event.chunked or event.content_length:  # type: ignore[union-attr]
            if event.expect_continue:  # type: ignore[union-attr]
                # Until we ask for the body the client holds it, and only a
                # close can end the exchange (see ask_for_body).
                self.their_state = WAIT_CONTINUE
                self.keep_alive = False
                return event  # type: ignore[return-value]
            self.their_state = SEND_BODY
        else:
            self.their_state = DONE  # a request without a body is complete with its head
        self.keep_alive = event.keep_alive and not self.parser.upgraded  # type: ignore[union-attr]
        return event  # type: ignore[return-value]

    # -- the request body ------------------------------------------------------------

    def ask_for_body(self) -> bytes:
        """What to send before reading the body: ``100 Continue`` the first time it is due, else b"".

        Due when the client said ``Expect: 100-continue`` and no response
        head has gone out yet; once a final response is on its way, the
        client sends the body (or not) without it (RFC 9110 §10.1.1).
        """
        if self.their_state is not WAIT_CONTINUE:
            return b""
        self.their_state = SEND_BODY
        if self.our_state is not SEND_RESPONSE:
            return b""
        request = self.request
        self.keep_alive = request.keep_alive and not self.parser.upgraded  # type: ignore[union-attr]
        return CONTINUE_RESPONSE

    def next_body_piece(self) -> bytes | None:
        """The next parsed piece of the body; b"" once it is complete; None when more bytes must be received.

        Raises the ProtocolError the parser found in the body (a bad chunk, a
        body over the limit).
        """
        state = self.their_state
        if state is DONE or state is ERROR:
            return b""  # (after an error, the ProtocolError was raised once already)
        if state is not SEND_BODY:
            raise ExchangeError(f"body read with their side {state}")
        early = self.early
        if early is not None:
            if len(early) < 2:
                self.early = None  # this was the last piece: the rest comes by events or off the wire
                self.early_size = 0
            if early:
                return early.popleft()
        events = self.events
        if not events:
            return None
        event = events.popleft()
        if event.__class__ is BodyChunk:
            return event.data  # type: ignore[union-attr]
        if event is END_OF_MESSAGE:
            self.their_state = DONE
            return b""
        self.their_state = ERROR
        self.keep_alive = False
        raise event  # type: ignore[misc]

    def raw_body_left(self) -> int:
        """Body bytes the caller may read straight off the wire, past the parser; 0 if none.

        Only once every parsed event is consumed is the parser's current
        message the request being answered: only then may the rest of a
        Content-Length body be handed over (see ``RequestParser.hand_over_body``).
        """
        left = self.raw_left
        if not left and not self.events and self.their_state is SEND_BODY:
            left = self.raw_left = self.parser.hand_over_body()
        if left and self.early is not None:
            return 0  # what was gathered early goes first (next_body_piece)
        return left

    def raw_body_received(self, count: int) -> None:
        """``count`` handed-over body bytes were read; the body is complete when none are left."""
        self.raw_left -= count
        if not self.raw_left:
            self.their_state = DONE

    # -- the response ------------------------------------------------------------------

    def head(self, code: int, status_line: bytes, fields: bytes, declared_length: int | None,
             known_length: int = -1, whole: bool = False) -> bytes:
        """Decide the response's framing and return its encoded head.

        ``code`` is a final status (200-599): an interim one (1xx) is not
        framed here (the codec refuses it from an app).

        ``fields`` are the app's encoded field lines, ``declared_length`` the
        Content-Length among them.  ``known_length`` >= 0: the size of the
        whole body is known (the app returned it all, or a file); a length
        the app did not declare is then sent for it.  ``whole``: that body
        goes out with the head; then the response is complete at once
        (``our_state`` DONE) unless the body and the framing disagree, and
        ``sent`` says how much of it goes out.
        """
        if self.our_state is not SEND_RESPONSE:
            raise ExchangeError(f"head() with our side {self.our_state}")
        keep_alive = self.keep_alive and not self.closing.active
        chunked = False
        if code in NO_CONTENT_STATUSES or self.request.method == "HEAD":  # type: ignore[union-attr]
            # The head is the whole response (RFC 9110 §6.4.1); for HEAD it
            # still says the length GET would send (§9.3.2).
            left = 0
            if declared_length is None:
                self.length_added = -1 if code in NO_CONTENT_STATUSES else known_length
                if self.length_added >= 0:
                    fields += CONTENT_LENGTH_LINE % known_length
        else:
            left = declared_length
            if left is None:
                self.length_added = known_length
                if known_length >= 0:
                    fields += CONTENT_LENGTH_LINE % known_length
                    left = known_length
                elif self.request.version == "1.0":  # type: ignore[union-attr]
                    keep_alive = False  # no chunked coding in HTTP/1.0: the close ends the body
                else:
                    chunked = True
        self.keep_alive = keep_alive
        self.chunked = chunked
        if whole and (left == known_length or left == 0):
            self.sent = left  # all of the body, or none of it (HEAD, 204, 304, a declared length of 0)
            self.left = 0
            self.our_state = DONE
        else:
            self.sent = 0
            self.left = left
            self.our_state = SEND_BODY
        return assemble_head(status_line, fields, self.date.line(), chunked, not keep_alive)

    def frame(self, data: bytes) -> bytes:
        """Frame one piece of body: cut to the length promised, chunked if chunked; b"" if nothing goes out."""
        if self.our_state is not SEND_BODY:
            if self.our_state is DONE:
                return b""  # the promised length is complete: more would be the next response
            raise ExchangeError(f"frame() with our side {self.our_state}")
        left = self.left
        if left is None:  # chunked, or delimited by the close
            self.sent += len(data)
            return frame_chunk(data) if self.chunked and data else data
        size = len(data)
        if size < left:
            self.left = left - size
            self.sent += size
            return data
        # This piece completes the length the head promised; never send more.
        self.our_state = DONE
        self.left = 0
        self.sent += left
        return data if size == left else data[:left]

    def file_span(self, available: int) -> int:
        """How many of ``available`` bytes of a file go out as the body, unframed (sendfile)."""
        if self.our_state is not SEND_BODY or self.chunked:
            return 0
        left = self.left
        return available if left is None else min(available, left)

    def count(self, sent: int) -> None:
        """``sent`` body bytes, allowed by ``file_span``, went out."""
        self.sent += sent
        if self.left is not None:
            self.left -= sent

    def end(self) -> bytes:
        """The app has no more body: what must still go out (the last chunk), usually b""."""
        state = self.our_state
        if state is DONE:
            return b""
        if state is not SEND_BODY:
            raise ExchangeError(f"end() with our side {state}")
        self.our_state = DONE
        if self.chunked:
            return LAST_CHUNK
        if self.left:
            # The client still waits for bytes the head promised; only
            # closing the connection tells it they are not coming.
            self.keep_alive = False
        return b""

    def refusal(self, error: ProtocolError) -> bytes:
        """The whole answer to a request we refuse (the error's status); the connection then closes."""
        self.our_state = MUST_CLOSE
        self.keep_alive = False
        self.sent = 0
        return error_response(error.status, error.reason, self.date.line())

    def failure(self, status: int = 500, reason: str = "Internal Server Error") -> bytes:
        """The answer when the server failed: ``status`` if no head went out, else b"" (the close says it)."""
        state = self.our_state
        self.our_state = MUST_CLOSE
        self.keep_alive = False
        if state is SEND_RESPONSE:
            self.sent = 0
            return error_response(status, reason, self.date.line())
        return b""

    def abandon(self) -> None:
        """The exchange cannot finish (the client left, or stalled): the connection closes."""
        if self.our_state is SEND_RESPONSE:
            self.sent = 0
        self.our_state = MUST_CLOSE
        self.keep_alive = False

    def reuse(self, drained: int = 0) -> bool | None:
        """After the response: may the connection take the next request?

        True: yes, and the exchange is ready for it.  False: no, close it.
        None: only once the rest of the request body is read and dropped;
        read some, add its size to ``drained`` and ask again.
        """
        if self.our_state is DONE and self.keep_alive:
            state = self.their_state
            if state is DONE:
                self.our_state = self.their_state = IDLE
                return True
            if state is SEND_BODY and drained <= DRAIN_LIMIT_BYTES:
                return None
            # WAIT_CONTINUE: the client still holds a body we never asked for.
        self.our_state = MUST_CLOSE
        self.keep_alive = False
        return False


__all__ = ["Closing", "Exchange", "ExchangeError"]
