"""Events the request parser emits, in the order they happen on the wire.

Plain classes with ``__slots__``, not dataclasses: decorating them cost every
start of the server about 2 ms (the decoration, and importing
``dataclasses`` for it), and building one costs the same either way.
"""

from __future__ import annotations


class Request:
    """A complete request head.

    ``headers`` keeps the names as sent (as bytes) and in order, duplicates
    included; ``keep_alive`` is the client's wish under its HTTP version.
    A request that is neither ``chunked`` nor has a ``content_length`` above
    0 has no body, and is complete with this event: no ``EndOfMessage``
    follows it (one event fewer for the usual request).
    Nobody changes one once it is made.  Two are equal when all their fields are.
    """

    __slots__ = ("method", "target", "version", "headers", "keep_alive", "expect_continue", "chunked",
                 "content_length")

    def __init__(self, method: str, target: bytes, version: str, headers: tuple[tuple[bytes, bytes], ...],
                 keep_alive: bool, expect_continue: bool, chunked: bool, content_length: int | None) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive
        self.expect_continue = expect_continue
        self.chunked = chunked
        self.content_length = content_length

    def _fields(self) -> tuple[object, ...]:
        return (self.method, self.target, self.version, self.headers, self.keep_alive, self.expect_continue,
                self.chunked, self.content_length)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not Request:
            return NotImplemented
        return self._fields() == other._fields()  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]  # equal by value, and not frozen

    def __repr__(self) -> str:
        return (f"Request({self.method} {self.target!r} HTTP/{self.version}, headers={self.headers!r}, "
                f"keep_alive={self.keep_alive}, expect_continue={self.expect_continue}, "
                f"chunked={self.chunked}, content_length={self.content_length})")


class BodyChunk:
    """Some bytes of the request body, with any chunked framing removed; equal to another with the same bytes."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not BodyChunk:
            return NotImplemented
        return self.data == other.data  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self.data)

    def __repr__(self) -> str:
        return f"BodyChunk({self.data!r})"


class EndOfMessage:
    """The request body is complete (see ``Request`` for a request without one); there is one, END_OF_MESSAGE."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "END_OF_MESSAGE"


END_OF_MESSAGE = EndOfMessage()

Event = Request | BodyChunk | EndOfMessage
