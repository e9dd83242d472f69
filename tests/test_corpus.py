"""The request corpus: every case through the parser, fed in many ways, and over a real server.

``corpus/valid/NAME.http`` holds raw request bytes in gunicorn's notation:
real newlines in the file are ignored, and ``\\r``, ``\\n``, ``\\t``, ``\\0``,
``\\xNN`` and ``\\\\`` stand for the bytes they name, so every CR and LF on the
wire is visible.  ``NAME.json`` holds what the server must make of it: one
object per request (a list for pipelined files) with the environ the app sees
and the parser's verdict on keep-alive, 100-continue, chunked and Upgrade.

``corpus/invalid/NAME.json`` holds ``{"status": N}``: the status the parser
must end with and the server must answer before closing the connection.
"""

from __future__ import annotations

import json
import random
import re
import socket
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from forkserver.http.errors import ProtocolError
from forkserver.http.events import BodyChunk, EndOfMessage, Request
from forkserver.http.parser import Limits, RequestParser
from forkserver.worker.wsgi import Codec, base_environ, build_environ
from harness import ServerProcess

CORPUS = Path(__file__).resolve().parent / "corpus"
ESCAPE = re.compile(rb"\\(x[0-9a-fA-F]{2}|.)", re.DOTALL)
SIMPLE_ESCAPES = {b"r": b"\r", b"n": b"\n", b"t": b"\t", b"0": b"\0", b"\\": b"\\"}
# A second request cut off mid-head: it must stay unparsed.
PARTIAL_NEXT = b"GET /partial HTTP/1.1\r\nHost: example.com\r\nX-Incomplete: y"
SOCKET_TIMEOUT = 10.0


def load_http(text: bytes) -> bytes:
    """Turn a corpus file's text into the bytes it describes."""
    text = text.replace(b"\r", b"").replace(b"\n", b"")

    def unescape(match: re.Match[bytes]) -> bytes:
        code = match.group(1)
        if code[:1] == b"x" and len(code) == 3:
            return bytes([int(code[1:], 16)])
        if code in SIMPLE_ESCAPES:
            return SIMPLE_ESCAPES[code]
        raise ValueError(f"unknown escape \\{code.decode('latin-1')} in corpus file")

    return ESCAPE.sub(unescape, text)


@dataclass(frozen=True)
class Case:
    name: str
    raw: bytes
    expected: Any

    def __str__(self) -> str:
        return self.name


def load_cases(kind: str) -> list[Case]:
    cases = []
    for http in sorted((CORPUS / kind).glob("*.http")):
        expected = json.loads(http.with_suffix(".json").read_text())
        cases.append(Case(http.stem, load_http(http.read_bytes()), expected))
    return cases


VALID = load_cases("valid")
INVALID = load_cases("invalid")


def expected_requests(case: Case) -> list[dict[str, Any]]:
    return case.expected if isinstance(case.expected, list) else [case.expected]


# -- the loader itself --------------------------------------------------------------


def test_loader_ignores_newlines_and_decodes_escapes():
    text = b"GET / HTTP/1.1\\r\\n\nX: a\\tb\\0\\x7F\\xe9\\\\\r\n\\n\\r\n"
    assert load_http(text) == b"GET / HTTP/1.1\r\nX: a\tb\x00\x7f\xe9\\\n\r"


def test_loader_rejects_unknown_escapes():
    with pytest.raises(ValueError):
        load_http(b"GET /\\q HTTP/1.1")


def test_corpus_is_complete():
    assert len(VALID) >= 20 and len(INVALID) >= 25
    for kind in ("valid", "invalid"):
        stems = {p.stem for p in (CORPUS / kind).glob("*.http")}
        assert stems == {p.stem for p in (CORPUS / kind).glob("*.json")}, f"unpaired files in {kind}"
    statuses = {case.expected["status"] for case in INVALID}
    assert statuses == {400, 414, 431, 501, 505}


# -- feeding the parser -----------------------------------------------------------------


def splits(case: Case, data: bytes) -> Iterator[tuple[str, list[bytes]]]:
    """The ways a case is fed: whole, byte by byte, line by line, and seeded random cuts."""
    yield "whole", [data]
    yield "bytes", [data[i : i + 1] for i in range(len(data))]
    yield "lines", data.splitlines(keepends=True)
    rng = random.Random(zlib.crc32(case.name.encode()))
    for n in range(4):
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 12))))
        bounds = [0, *cuts, len(data)]
        yield f"random{n}", [data[a:b] for a, b in zip(bounds, bounds[1:])]


@dataclass
class Fed:
    events: list[Any]
    parser: RequestParser


def feed(pieces: list[bytes]) -> Fed:
    parser = RequestParser(Limits())
    events: list[Any] = []
    for piece in pieces:
        events += parser.feed(piece)
    return Fed(events, parser)


def summarise(events: list[Any]) -> list[Any]:
    """Merge adjacent body chunks (how the body is cut depends on the feeding)."""
    out: list[Any] = []
    for event in events:
        if isinstance(event, BodyChunk):
            assert event.data, "empty BodyChunk"
            if out and isinstance(out[-1], bytes):
                out[-1] += event.data
            else:
                out.append(event.data)
        elif isinstance(event, ProtocolError):
            out.append(("error", type(event).__name__, event.status))
        else:
            out.append(event)
    return out


def has_body(request: Request) -> bool:
    """Whether a body follows the request; one without is complete with its Request (no EndOfMessage)."""
    return request.chunked or bool(request.content_length)


def ends_message(event: Any) -> bool:
    """Whether ``event`` is the last of a message: its EndOfMessage, or the Request of one without a body."""
    return isinstance(event, EndOfMessage) or (isinstance(event, Request) and not has_body(event))


def requests_of(events: list[Any]) -> list[tuple[Request, bytes]]:
    """Pair each Request with its body; a request with a body must end with EndOfMessage, one without with itself."""
    found: list[tuple[Request, bytes]] = []
    summary = summarise(events)
    i = 0
    while i < len(summary):
        request = summary[i]
        assert isinstance(request, Request), f"expected a Request at event {i}, got {request!r}"
        body = b""
        if not has_body(request):
            found.append((request, body))
            i += 1
            continue
        if i + 1 < len(summary) and isinstance(summary[i + 1], bytes):
            body = summary[i + 1]
            i += 1
        assert i + 1 < len(summary) and isinstance(summary[i + 1], EndOfMessage), \
            f"request {request.target!r} not followed by EndOfMessage: {summary[i + 1:]!r}"
        found.append((request, body))
        i += 2
    return found


def environ_of(request: Request) -> dict[str, Any]:
    return build_environ(request, base_environ("localhost", "80", False), Codec())


def check_environ(environ: dict[str, Any], body: str, expected: dict[str, Any]) -> None:
    """Compare an environ (from build_environ or the echo app) with a corpus expectation."""
    assert environ["REQUEST_METHOD"] == expected["method"]
    assert environ["PATH_INFO"] == expected["path_info"]
    assert environ["QUERY_STRING"] == expected["query_string"]
    assert environ["SERVER_PROTOCOL"] == expected["protocol"]
    for key, value in expected["headers"].items():
        assert environ.get(key) == value, f"{key}: {environ.get(key)!r} != {value!r}"
    for key in expected.get("absent", []):
        assert key not in environ, f"{key} should be absent, is {environ[key]!r}"
    assert body == expected["body"]


def as_served(expected: dict[str, Any]) -> dict[str, Any]:
    """What the app sees of a chunked request: the server de-chunks it first.

    The connection reads a chunked body before the app runs and hands it over
    with CONTENT_LENGTH and without Transfer-Encoding (apps such as Django
    trust only CONTENT_LENGTH); build_environ alone still shows the wire.
    """
    if not expected.get("chunked"):
        return expected
    headers = {k: v for k, v in expected["headers"].items() if k != "HTTP_TRANSFER_ENCODING"}
    headers["CONTENT_LENGTH"] = str(len(expected["body"].encode("latin-1")))
    absent = [k for k in expected.get("absent", []) if k != "CONTENT_LENGTH"] + ["HTTP_TRANSFER_ENCODING"]
    return {**expected, "headers": headers, "absent": absent}


def check_request(request: Request, body: bytes, expected: dict[str, Any], upgraded: bool) -> None:
    check_environ(environ_of(request), body.decode("latin-1"), expected)
    assert request.keep_alive is expected["keep_alive"]
    assert request.expect_continue is expected.get("expect_continue", False)
    assert request.chunked is expected.get("chunked", False)
    if request.chunked:
        assert request.content_length is None
    elif "CONTENT_LENGTH" in expected["headers"]:
        assert request.content_length == int(expected["headers"]["CONTENT_LENGTH"])
    assert upgraded is expected.get("upgraded", False)


@pytest.mark.parametrize("case", VALID, ids=str)
def test_valid_case_parses_the_same_however_it_is_fed(case: Case):
    expected = expected_requests(case)
    reference = None
    for how, pieces in splits(case, case.raw):
        fed = feed(pieces)
        summary = summarise(fed.events)
        if reference is None:
            reference = summary
        assert summary == reference, f"feeding {how} differs from feeding whole"
        found = requests_of(fed.events)
        assert len(found) == len(expected), how
        for (request, body), want in zip(found, expected):
            check_request(request, body, want, fed.parser.upgraded)
        assert not fed.parser.mid_message(), how


@pytest.mark.parametrize("case", VALID, ids=str)
def test_valid_case_leaves_a_following_partial_request_unparsed(case: Case):
    expected = expected_requests(case)
    last = expected[-1]
    for how, pieces in splits(case, case.raw + PARTIAL_NEXT):
        fed = feed(pieces)
        ends = [i for i, e in enumerate(fed.events) if ends_message(e)]
        assert len(ends) == len(expected), f"{how}: {summarise(fed.events)!r}"
        found = requests_of(fed.events[: ends[-1] + 1])
        for (request, body), want in zip(found, expected):
            check_request(request, body, want, fed.parser.upgraded)
        rest = summarise(fed.events[ends[-1] + 1 :])
        if last.get("upgraded") or last["keep_alive"]:
            # Nothing of the partial request comes out: after an Upgrade request
            # the bytes are not HTTP/1.1, and otherwise its head is incomplete.
            assert rest == [], f"{how}: {rest!r}"
            assert fed.parser.mid_message() is not last.get("upgraded", False), how
        else:
            # llhttp refuses data after a closing message; the server never reads it.
            assert rest in ([], [("error", "BadRequest", 400)]), f"{how}: {rest!r}"


@pytest.mark.parametrize("case", INVALID, ids=str)
def test_invalid_case_ends_in_its_status_however_it_is_fed(case: Case):
    status = case.expected["status"]
    for how, pieces in splits(case, case.raw):
        parser = RequestParser(Limits())
        events: list[Any] = []
        for piece in pieces:
            got = parser.feed(piece)
            if events and isinstance(events[-1], ProtocolError):
                assert got == [], f"{how}: events after the error: {got!r}"
            events += got
        assert events, how
        error = events[-1]
        assert isinstance(error, ProtocolError), f"{how}: no error, events {events!r}"
        assert error.status == status, f"{how}: {error!r} has status {error.status}"
        # Before the error there may be the refused request's head and body
        # (the error was in its body), but never its end or another error.
        before = summarise(events[:-1])
        assert before == [] or (isinstance(before[0], Request) and has_body(before[0]) and
                                all(isinstance(e, bytes) for e in before[1:])), f"{how}: {before!r}"
        # The parser is dead: nothing more comes out of it.
        assert parser.feed(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n") == [], how


# -- over a real server -----------------------------------------------------------------


@pytest.fixture(scope="module")
def echo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(["basic:echo", "-w", "1"], tmp_path_factory.mktemp("corpus-server"), wait=False)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


class ResponseReader:
    """Reads responses off a socket one at a time; every read is bounded by the socket timeout."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.buffer = b""

    def _fill(self) -> bool:
        chunk = self.conn.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def read(self) -> Response:
        while b"\r\n\r\n" not in self.buffer:
            if not self._fill():
                raise AssertionError(f"connection closed mid-response: {self.buffer!r}")
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        version, code, _ = status_line.split(" ", 2)
        assert version == "HTTP/1.1", status_line
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        status = int(code)
        if status < 200:
            return Response(status, headers, b"")
        length = int(headers["content-length"])
        while len(self.buffer) < length:
            if not self._fill():
                raise AssertionError("connection closed mid-body")
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return Response(status, headers, body)

    def closed(self) -> bool:
        """True if the peer closes with nothing more to say."""
        while True:
            try:
                if not self._fill():
                    return self.buffer == b""
            except ConnectionResetError:
                return self.buffer == b""


@pytest.fixture
def clean_log(echo_server: ServerProcess) -> Iterator[None]:
    """Fail the test if the server logged a traceback while it ran."""
    start = len(echo_server.log())
    yield
    new = echo_server.log()[start:]
    assert "Traceback" not in new and "unexpected error" not in new, new


def connect(server: ServerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=SOCKET_TIMEOUT)


def get_ok(server: ServerProcess, path: str = "/fresh") -> None:
    """A fresh connection still gets a 200 from the echo app."""
    with connect(server) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        response = ResponseReader(conn).read()
    assert response.status == 200
    assert json.loads(response.body)["PATH_INFO"] == path


@pytest.mark.parametrize("case", VALID, ids=str)
def test_valid_case_over_the_server(echo_server: ServerProcess, clean_log: None, case: Case):
    expected = expected_requests(case)
    with connect(echo_server) as conn:
        conn.sendall(case.raw)
        reader = ResponseReader(conn)
        for want in expected:
            response = reader.read()
            if want.get("expect_continue"):
                assert response.status == 100
                response = reader.read()
            assert response.status == 200, response
            environ = json.loads(response.body)
            check_environ(environ, environ["body"], as_served(want))
        last = expected[-1]
        if last["keep_alive"] and not last.get("upgraded"):
            # The connection is still in step: one more request on it gets its own answer.
            conn.sendall(b"GET /after HTTP/1.1\r\nHost: t\r\n\r\n")
            response = reader.read()
            assert response.status == 200
            assert json.loads(response.body)["PATH_INFO"] == "/after"
            assert "close" not in response.headers.get("connection", "")
        else:
            assert response.headers.get("connection") == "close"
            assert reader.closed(), f"server did not close after {case.name}"


@pytest.mark.parametrize("case", INVALID, ids=str)
def test_invalid_case_over_the_server(echo_server: ServerProcess, clean_log: None, case: Case):
    status = case.expected["status"]
    with connect(echo_server) as conn:
        conn.sendall(case.raw)
        reader = ResponseReader(conn)
        response = reader.read()
        assert response.status == status, f"{response.status} {response.body!r}"
        assert response.headers.get("connection") == "close"
        assert response.body.startswith(f"{status} ".encode())
        assert reader.closed(), f"server did not close after {case.name}"
    get_ok(echo_server)
