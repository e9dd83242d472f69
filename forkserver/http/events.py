"""Events the request parser emits, in the order they happen on the wire."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


class Request(NamedTuple):
    """A complete request head.

    ``headers`` keeps the names as sent (as bytes) and in order, duplicates
    included; ``keep_alive`` is the client's wish under its HTTP version.
    A named tuple, not a dataclass: one is made per request, and a tuple is
    built in one step where a dataclass's ``__init__`` stores eight fields
    one by one (about 12 of a kept-alive request's 1,520 bytecodes,
    scripts/loop_cost.py).
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
