"""Events the request parser emits, in the order they happen on the wire."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Request:
    """A complete request head.

    ``headers`` keeps the names as sent (as bytes) and in order, duplicates
    included; ``keep_alive`` is the client's wish under its HTTP version.
    A request that is neither ``chunked`` nor has a ``content_length`` above
    0 has no body, and is complete with this event: no ``EndOfMessage``
    follows it (one event fewer for the usual request).
    Not frozen: a frozen dataclass sets every field through
    ``object.__setattr__``, which made building one a visible share of a
    hello-world request.  Nobody mutates it.
    """

    method: str
    target: bytes
    version: str
    headers: tuple[tuple[bytes, bytes], ...]
    keep_alive: bool
    expect_continue: bool
    chunked: bool
    content_length: int | None


@dataclass(frozen=True, slots=True)
class BodyChunk:
    """Some bytes of the request body, with any chunked framing removed."""

    data: bytes


@dataclass(frozen=True, slots=True)
class EndOfMessage:
    """The request body (possibly empty) is complete."""


END_OF_MESSAGE = EndOfMessage()

Event = Request | BodyChunk | EndOfMessage
