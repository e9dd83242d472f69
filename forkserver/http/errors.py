"""Protocol errors.  Each carries the HTTP status the client should get.

The connection writes ``error.status`` and closes; it never inspects the class.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """The client sent something we will not serve; answer ``status`` and close."""

    status = 400
    reason = "Bad Request"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class BadRequest(ProtocolError):
    """Malformed or ambiguous framing (RFC 9112 §2.2, §6.3)."""


class RequestLineTooLong(ProtocolError):
    """The request target exceeds ``limit_request_line`` (RFC 9112 §3)."""

    status = 414
    reason = "URI Too Long"


class HeaderTooLarge(ProtocolError):
    """Too many header fields, or one too long (RFC 6585 §5)."""

    status = 431
    reason = "Request Header Fields Too Large"


class BodyTooLarge(ProtocolError):
    """The body exceeds ``limit_request_body`` (RFC 9110 §15.5.14)."""

    status = 413
    reason = "Content Too Large"


class VersionNotSupported(ProtocolError):
    """An HTTP major version other than 1 (RFC 9110 §15.6.6)."""

    status = 505
    reason = "HTTP Version Not Supported"


class MethodNotImplemented(ProtocolError):
    """A well-formed method we do not know (RFC 9110 §9.1, §15.6.2)."""

    status = 501
    reason = "Not Implemented"


class NotImplementedCoding(ProtocolError):
    """A transfer coding we cannot decode (RFC 9112 §6.1)."""

    status = 501
    reason = "Not Implemented"


class RequestTimeout(ProtocolError):
    """The body arrives too slowly (``body_min_rate``) or too late (``body_deadline``) (RFC 9110 §15.5.9)."""

    status = 408
    reason = "Request Timeout"
