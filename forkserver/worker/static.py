"""Static files: answer GET and HEAD under configured URL prefixes from directories.

This module decides: which file a path names, whether it may be served, which
variant (a precompressed ``.br``/``.gz``), and the status and headers
(conditional requests, ranges).  It sends nothing itself: ``StaticFiles`` is a
WSGI callable wrapped around the app, and a file goes out as a
``wsgi.FileWrapper`` through ``Response.send_file`` and ``Connection.sendfile``,
so static answers are framed, time-limited, access-logged and counted exactly
like the app's.  It never calls the app, except on fallthrough.

Staying inside the root.  The request path is percent-decoded exactly once (by
``build_environ``) and then split into segments; ``.``, ``..``, empty
segments, backslashes, NUL and control bytes are refused outright, before
the filesystem is touched.  What is left is opened with ``O_PATH``
*relative to a descriptor of the root* (``openat``), so the name cannot climb
out lexically; a symlink can, so the kernel's own answer is then checked:
``/proc/self/fd/N`` names where the opened object really is, and unless
``static_follow_symlinks`` is on it must lie under the root's real path.  The
check is on the descriptor we go on to send from (reopened for reading through
that same ``/proc`` link, which re-resolves nothing), so renaming or
re-linking a path component between the check and the read cannot swap in
another file: there is no window between a ``realpath`` and an ``open``.
``O_PATH`` opens have no side effects (a symlink to a FIFO or device is never
really opened), and only regular files are ever read.  This needs Linux's
``/proc``; ``StaticFiles`` refuses to start without it.  Names starting with
a dot (``.git``, ``.env``) are treated as missing.
"""

from __future__ import annotations

import dataclasses
import email.utils
import errno
import io
import logging
import mimetypes
import os
import re
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from ..config import Config
from ..errors import ConfigError
from ..mounts import Mount, mounts_of
from .wsgi import FileWrapper

log = logging.getLogger("forkserver")

INDEX_NAME = b"index.html"
# Content codings we look for precompressed files of, in our order of preference.
VARIANTS = (("br", b".br"), ("gzip", b".gz"))
# Anything C0, DEL, a backslash or NUL in a decoded path is an attack or a bug.
HOSTILE_BYTES = re.compile(rb"[\x00-\x1f\x7f\\]")
ENTITY_TAG = re.compile(r'\s*(W/)?("[\x21\x23-\x7e\x80-\xff]*")\s*(?:,|$)')
RANGE_SPEC = re.compile(r"\s*(\d{0,19})-(\d{0,19})\s*\Z")
# Types Python 3.11 lacks or gets wrong (RFC 9239 made text/javascript the one).
EXTRA_TYPES = {
    ".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css", ".json": "application/json",
    ".map": "application/json", ".webmanifest": "application/manifest+json", ".wasm": "application/wasm",
    ".svg": "image/svg+xml", ".webp": "image/webp", ".avif": "image/avif", ".ico": "image/x-icon",
    ".woff": "font/woff", ".woff2": "font/woff2", ".ttf": "font/ttf", ".otf": "font/otf",
    ".md": "text/markdown", ".gz": "application/gzip", ".tgz": "application/gzip",
    ".br": "application/octet-stream", ".zst": "application/zstd",
}
OPEN_MISSING = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG, errno.EACCES, errno.EPERM)


class Refused(Exception):
    """The path tries to leave the root (or is malformed): always 404, always logged."""


# -- pure decisions -----------------------------------------------------------------


def split_path(rel: bytes) -> tuple[list[bytes], bool]:
    """Split the decoded path below a prefix into segments; also say if it ended in '/'.

    ``rel`` is ``b""`` (the prefix itself) or starts with ``/``.

    Raises:
        Refused: for dot segments, empty segments, backslashes, NUL or control bytes.
    """
    if not rel:
        return [], False
    if HOSTILE_BYTES.search(rel):
        raise Refused("backslash, NUL or control byte in path")
    body = rel[1:]
    wants_dir = body == b"" or body.endswith(b"/")
    if body.endswith(b"/"):
        body = body[:-1]
    segments = body.split(b"/") if body else []
    for segment in segments:
        if segment in (b"", b".", b".."):
            raise Refused(f"{'empty' if not segment else 'dot'} path segment")
    return segments, wants_dir


def hidden(segments: list[bytes]) -> bool:
    """True if any segment is a dot-name (``.git``, ``.env``): those are never served."""
    return any(segment[:1] == b"." for segment in segments)


def preferred_encodings(accept_encoding: str) -> list[str]:
    """The codings of VARIANTS the client accepts (RFC 9110 §12.5.3), best first."""
    if not accept_encoding:
        return []
    weights: dict[str, float] = {}
    for item in accept_encoding.split(","):
        name, _, params = item.partition(";")
        name = name.strip().lower()
        weight = 1.0
        for param in params.split(";"):
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    weight = float(value.strip())
                except ValueError:
                    weight = 0.0
        if name:
            weights[name] = weight
    star = weights.get("*", 0.0)
    chosen = [(weights.get(coding, star), -rank, coding) for rank, (coding, _) in enumerate(VARIANTS)]
    return [coding for weight, _, coding in sorted(chosen, reverse=True) if weight > 0]


def http_date(timestamp: float) -> str:
    """An IMF-fixdate (RFC 9110 §5.6.7) for a Unix time."""
    return email.utils.formatdate(timestamp, usegmt=True)


def parse_http_date(text: str | None) -> int | None:
    """The Unix time of an HTTP-date, or None if absent or not a date."""
    if not text:
        return None
    parsed = email.utils.parsedate_tz(text)
    if parsed is None:
        return None
    try:
        return int(email.utils.mktime_tz(parsed))
    except (OverflowError, ValueError):
        return None


def entity_tags(header: str) -> list[tuple[bool, str]] | None:
    """Parse an If-Match/If-None-Match list into (weak, opaque-tag) pairs; None for ``*``."""
    if header.strip() == "*":
        return None
    return [(bool(m.group(1)), m.group(2)) for m in ENTITY_TAG.finditer(header)]


def parse_range(header: str, size: int) -> tuple[int, int] | str | None:
    """Evaluate a Range header against a representation of ``size`` bytes (RFC 9110 §14.1).

    Returns (first, last) inclusive for one satisfiable range, ``"unsatisfiable"``,
    or None to ignore the header (malformed, another unit, or several ranges,
    which we answer with the whole file as §14.2 allows).
    """
    unit, sep, specs = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    parts = specs.split(",")
    if len(parts) != 1:
        return None
    match = RANGE_SPEC.match(parts[0])
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.group(1), match.group(2)
    if first == "":
        suffix = int(last)
        if suffix == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - suffix), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None  # an invalid range-spec: the whole header is ignored
    if start >= size:
        return "unsatisfiable"
    return start, min(end, size - 1)


@dataclass(frozen=True)
class Representation:
    """The file chosen to answer with, as far as headers are concerned."""

    size: int
    mtime: float
    content_type: str
    encoding: str | None = None  # Content-Encoding of a precompressed variant
    cache_control: str | None = None

    @property
    def etag(self) -> str:
        """A strong validator from size and modification time (and the coding)."""
        suffix = f"-{self.encoding}" if self.encoding else ""
        return f'"{self.size:x}-{int(self.mtime * 1_000_000):x}{suffix}"'


@dataclass(frozen=True)
class Preconditions:
    """The request headers that decide the status (RFC 9110 §13 and §14)."""

    if_match: str | None = None
    if_none_match: str | None = None
    if_modified_since: str | None = None
    if_unmodified_since: str | None = None
    if_range: str | None = None
    range: str | None = None

    @classmethod
    def from_environ(cls, environ: dict[str, Any]) -> Preconditions:
        get = environ.get
        return cls(get("HTTP_IF_MATCH"), get("HTTP_IF_NONE_MATCH"), get("HTTP_IF_MODIFIED_SINCE"),
                   get("HTTP_IF_UNMODIFIED_SINCE"), get("HTTP_IF_RANGE"), get("HTTP_RANGE"))


@dataclass(frozen=True)
class Answer:
    """What to send: status, headers, and either ``body`` or ``length`` file bytes from ``offset``."""

    status: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    offset: int = 0
    length: int = 0


def plain(status: str, extra: Iterable[tuple[str, str]] = ()) -> Answer:
    """A short text/plain answer carrying its reason phrase."""
    body = (status[4:] + "\n").encode("ascii")
    return Answer(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))),
                           *extra], body)


def _validators(rep: Representation) -> list[tuple[str, str]]:
    headers = [("Last-Modified", http_date(rep.mtime)), ("ETag", rep.etag), ("Vary", "Accept-Encoding")]
    if rep.cache_control:
        headers.append(("Cache-Control", rep.cache_control))
    return headers


def _matches(tags: list[tuple[bool, str]] | None, etag: str, *, strong: bool) -> bool:
    if tags is None:
        return True  # "*": any current representation
    return any(tag == etag and not (strong and weak) for weak, tag in tags)


def decide(method: str, pre: Preconditions, rep: Representation) -> Answer:
    """Choose status and headers for GET/HEAD of ``rep``, in RFC 9110 §13.2.2's order."""
    mtime = int(rep.mtime)
    if pre.if_match is not None:
        if not _matches(entity_tags(pre.if_match), rep.etag, strong=True):
            return plain("412 Precondition Failed")
    else:
        limit = parse_http_date(pre.if_unmodified_since)
        if limit is not None and mtime > limit:
            return plain("412 Precondition Failed")
    if pre.if_none_match is not None:
        if _matches(entity_tags(pre.if_none_match), rep.etag, strong=False):
            return Answer("304 Not Modified", _validators(rep))
    else:
        since = parse_http_date(pre.if_modified_since)
        if since is not None and mtime <= since:
            return Answer("304 Not Modified", _validators(rep))
    headers = [("Content-Type", rep.content_type), ("Accept-Ranges", "bytes"), *_validators(rep)]
    if rep.encoding:
        headers.append(("Content-Encoding", rep.encoding))
    span = None
    # RFC 9110 §14.2: Range is defined for GET only; HEAD ignores it.
    if method == "GET" and pre.range is not None and _if_range_holds(pre.if_range, rep):
        span = parse_range(pre.range, rep.size)
    if span == "unsatisfiable":
        return plain("416 Range Not Satisfiable", [("Content-Range", f"bytes */{rep.size}")])
    if isinstance(span, tuple):
        first, last = span
        length = last - first + 1
        headers += [("Content-Range", f"bytes {first}-{last}/{rep.size}"), ("Content-Length", str(length))]
        return Answer("206 Partial Content", headers, offset=first, length=length)
    headers.append(("Content-Length", str(rep.size)))
    return Answer("200 OK", headers, length=rep.size)


def _if_range_holds(if_range: str | None, rep: Representation) -> bool:
    """RFC 9110 §13.1.5: a range is honoured only if If-Range still names this representation."""
    if if_range is None:
        return True
    if if_range.lstrip().startswith(("W/", '"')):
        return _matches(entity_tags(if_range), rep.etag, strong=True)
    return parse_http_date(if_range) == int(rep.mtime)


# -- the filesystem -------------------------------------------------------------------


def _proc_path(fd: int) -> bytes:
    return b"/proc/self/fd/%d" % fd


def _within(path: bytes, root: bytes) -> bool:
    return path == root or path.startswith(root if root == b"/" else root + b"/")


@dataclass
class Opened:
    """An ``O_PATH`` descriptor of something under a root, and its stat."""

    fd: int
    info: os.stat_result

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class Root:
    """A static directory opened for one request (so a rebuilt directory is picked up)."""

    fd: int
    real: bytes
    follow_symlinks: bool
    opened: list[Opened] = field(default_factory=list)

    @classmethod
    def open(cls, directory: str, follow_symlinks: bool) -> Root:
        fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return cls(fd, os.readlink(_proc_path(fd)), follow_symlinks)
        except BaseException:
            os.close(fd)
            raise

    def find(self, segments: list[bytes]) -> Opened | None:
        """Open ``segments`` under the root without side effects; None if there is nothing.

        Raises:
            Refused: if it resolved (through a symlink) to somewhere outside the root.
        """
        relative = b"/".join(segments) or b"."
        try:
            fd = os.open(relative, os.O_PATH | os.O_CLOEXEC, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno in OPEN_MISSING:
                return None
            raise
        opened = Opened(fd, os.fstat(fd))
        self.opened.append(opened)
        if not self.follow_symlinks:
            where = os.readlink(_proc_path(fd))
            if not _within(where, self.real):
                raise Refused(f"resolves outside the static root, to {where!r}")
        return opened

    def close(self) -> None:
        for opened in self.opened:
            opened.close()
        os.close(self.fd)


def read_handle(opened: Opened) -> io.FileIO:
    """Open for reading the very file ``opened`` refers to (no name is resolved again)."""
    return io.FileIO(os.open(_proc_path(opened.fd), os.O_RDONLY | os.O_CLOEXEC), "rb")


# -- the WSGI side ------------------------------------------------------------------------


class StaticFiles:
    """A WSGI callable: static files under the mounts, everything else to ``app``."""

    def __init__(self, app: Callable[..., Any], mounts: list[Mount], *, index: bool = True,
                 fallthrough: bool = False, follow_symlinks: bool = False) -> None:
        self.app = app
        # Relative directories are taken from the cwd now (the app's chdir) and fixed.
        mounts = [dataclasses.replace(m, root=os.path.abspath(m.root)) for m in mounts]
        mounts.sort(key=lambda m: len(m.prefix), reverse=True)  # /static/img before /static
        self.mounts = mounts
        self.prefixes = tuple(m.prefix + "/" if m.prefix else "/" for m in mounts) + tuple(m.prefix for m in mounts)
        self.index = index
        self.fallthrough = fallthrough
        self.follow_symlinks = follow_symlinks
        types = mimetypes.MimeTypes()  # Python's built-in table only, not /etc/mime.types
        self.types = {**types.types_map[0], **types.types_map[1], **EXTRA_TYPES}
        for mount in mounts:
            try:
                Root.open(mount.root, follow_symlinks).close()
            except OSError as exc:
                raise ConfigError(f"static directory {mount.root!r}: {exc.strerror} "
                                  "(static files need a directory and Linux's /proc)") from None

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = environ["PATH_INFO"]
        if path.startswith(self.prefixes):
            for mount in self.mounts:
                if path == mount.prefix or path.startswith(mount.prefix + "/"):
                    return self.serve(mount, environ, start_response)
        return self.app(environ, start_response)

    def content_type(self, name: bytes) -> str:
        """Content-Type by file name; text types say UTF-8."""
        dot = name.rfind(b".")
        kind = self.types.get(name[dot:].decode("latin-1").lower(), "") if dot > 0 else ""
        if not kind:
            return "application/octet-stream"
        return kind + "; charset=utf-8" if kind.startswith("text/") else kind

    def serve(self, mount: Mount, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        """Answer a request under ``mount``: a file, a redirect, 404/405, or the app on fallthrough."""
        method = environ["REQUEST_METHOD"]
        try:
            segments, wants_dir = split_path(environ["PATH_INFO"][len(mount.prefix):].encode("latin-1"))
            if method not in ("GET", "HEAD"):
                if self.fallthrough:
                    return self.app(environ, start_response)
                return _send(plain("405 Method Not Allowed", [("Allow", "GET, HEAD")]), start_response)
            root = Root.open(mount.root, self.follow_symlinks)
        except Refused as refusal:
            return self._refuse(refusal, environ, start_response)
        except OSError as exc:
            log.error("static directory %s unusable: %s", mount.root, exc.strerror)
            return _send(plain("404 Not Found"), start_response)
        try:
            answer, handle = self._answer(root, mount, segments, wants_dir, environ)
        except Refused as refusal:
            root.close()
            return self._refuse(refusal, environ, start_response)
        except BaseException:
            root.close()
            raise
        root.close()
        if answer is None:
            if self.fallthrough:
                return self.app(environ, start_response)
            answer = plain("404 Not Found")
        start_response(answer.status, answer.headers)
        if handle is None:
            return [answer.body] if answer.body and method != "HEAD" else []
        handle.seek(answer.offset)
        return FileWrapper(handle)

    def _refuse(self, refusal: Refused, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        log.warning("static path refused remote=%s target=%r: %s", environ.get("REMOTE_ADDR") or "unix",
                    environ.get("RAW_URI", environ["PATH_INFO"]), refusal)
        return _send(plain("404 Not Found"), start_response)

    def _answer(self, root: Root, mount: Mount, segments: list[bytes], wants_dir: bool,
                environ: dict[str, Any]) -> tuple[Answer | None, io.FileIO | None]:
        """Find the file and decide; a read handle only when file bytes are to be sent."""
        if hidden(segments):
            return None, None
        target = root.find(segments)
        if target is None:
            return None, None
        if stat.S_ISDIR(target.info.st_mode):
            if not self.index:
                return None, None
            if not wants_dir:
                return _redirect_to_dir(environ), None
            segments = [*segments, INDEX_NAME]
            target = root.find(segments)
            if target is None:
                return None, None
        elif wants_dir:
            return None, None  # "file.css/" names no directory
        if not stat.S_ISREG(target.info.st_mode):
            return None, None
        name = segments[-1]
        chosen, encoding = target, None
        for coding in preferred_encodings(environ.get("HTTP_ACCEPT_ENCODING", "")):
            variant = root.find([*segments[:-1], name + dict(VARIANTS)[coding]])
            # A variant older than its original is stale: someone edited the original.
            if (variant is not None and stat.S_ISREG(variant.info.st_mode)
                    and variant.info.st_mtime >= target.info.st_mtime):
                chosen, encoding = variant, coding
                break
        rep = Representation(chosen.info.st_size, chosen.info.st_mtime, self.content_type(name),
                             encoding, mount.cache_control)
        answer = decide(environ["REQUEST_METHOD"], Preconditions.from_environ(environ), rep)
        if not answer.length or environ["REQUEST_METHOD"] != "GET":
            return answer, None
        try:
            return answer, read_handle(chosen)
        except PermissionError:
            log.warning("static file not readable by the worker: %r", os.readlink(_proc_path(chosen.fd)))
            return None, None


def _redirect_to_dir(environ: dict[str, Any]) -> Answer:
    """301 to the same path with a '/', so relative links in index.html resolve under it."""
    location = quote(environ["PATH_INFO"].encode("latin-1"), safe="/!$&'()*+,;=:@~") + "/"
    if location.startswith("//"):
        raise Refused("redirect would leave the site")
    if environ.get("QUERY_STRING"):
        location += "?" + environ["QUERY_STRING"]
    return plain("301 Moved Permanently", [("Location", location)])


def _send(answer: Answer, start_response: Callable[..., Any]) -> list[bytes]:
    start_response(answer.status, answer.headers)
    return [answer.body]


def wrap(app: Callable[..., Any], config: Config) -> Callable[..., Any]:
    """Put static file serving in front of ``app``; ``app`` itself when no mapping is configured."""
    if not config.static:
        return app
    return StaticFiles(app, mounts_of(config), index=config.static_index,
                       fallthrough=config.static_fallthrough, follow_symlinks=config.static_follow_symlinks)
