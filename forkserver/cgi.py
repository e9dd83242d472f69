"""CGI's names for request header fields, which the WSGI environ and the access log both use.

Kept apart from ``forkserver.worker.wsgi`` so that the access log's format, which
the master checks at start-up, does not pull the request-serving side into
the master (tests/unit/test_layering.py).
"""

from __future__ import annotations

# The two fields CGI names without the HTTP_ prefix (RFC 3875 §4.1.2, §4.1.3).
UNPREFIXED = frozenset({"CONTENT_TYPE", "CONTENT_LENGTH"})


def header_key(name: str) -> str:
    """The environ key of a header field: ``HTTP_X_FOO``, or ``CONTENT_TYPE``/``CONTENT_LENGTH``."""
    key = name.upper().replace("-", "_")
    return key if key in UNPREFIXED else "HTTP_" + key
