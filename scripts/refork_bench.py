"""Memory of a warmed Django deployment: forkserver with and without preload and refork, and gunicorn.

Not a test: a measurement to run by hand (docs/refork.md quotes it).

    python scripts/refork_bench.py [--requests 2000] [--workers 4] [--refork-after 150] [--pages]

It generates a small but real Django project in a temporary directory (the
admin, templates with inheritance and filters, a French translation
catalogue of its own besides Django's, four models in SQLite with a few
hundred rows), then for each server in turn: starts it with ``-w N``, sends
the same mix of requests (lists, details, JSON, the admin login page, 404s,
half of them in French) from four client threads, waits for the pool to
settle (with refork: until every worker was forked by the mold), sends a
second round, and reads ``/proc/PID/smaps_rollup`` of every process in the
tree.  It prints the total PSS of the tree, the mean private memory (USS)
per serving worker, and p99 latency of the 200 requests that follow a
worker's replacement (SIGTERM to one worker), then the ratios against
forkserver ``--preload``.  gunicorn is measured if it is installed.
With ``--pages`` (root), it also compares one worker's memory page by page
with the process it was forked from (the mold, or the master), through
``/proc/PID/pagemap``: which pages were copied on a write, and whether the
write changed only reference counts or real content (with merging, a page
merged with a sibling's copy rather than the parent's still counts as copied).

The runs with ``--memory-merge`` (root, a kernel with KSM) turn the
kernel's same-page merging on for the run (``/sys/kernel/mm/ksm/run``,
restored at the end) and are read twice: right after the second round, and
again once ksmd has settled (its merged page count steady over two full
scans), with the CPU time ksmd spent settling and in the 30 s after, and
its page counts.

Figures vary with the machine's load: run it on a quiet machine, or read
only the ratios.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import http.client
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
PAGE = os.sysconf("SC_PAGE_SIZE")
FRAME = (1 << 55) - 1  # a pagemap entry's physical frame number bits
SMALL_CHANGE = 4096  # a word that moved by less than this, between small positive values: a reference count
CLIENTS = 4
SETTLE_TIMEOUT = 120.0
KSM = Path("/sys/kernel/mm/ksm")
KSM_SETTLE_TIMEOUT = 300.0  # seconds ksmd gets to merge a tree of a few hundred MiB at its default pace
KSM_STEADY_SECONDS = 30.0  # how long ksmd's CPU is read once the tree has settled, the server idle
FORKSERVER_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(FORKSERVER_ROOT))  # this checkout's forkserver, as the servers measured run it

from forkserver.memorymerge import merged_bytes  # noqa: E402

SETTINGS = """
SECRET_KEY = "bench"
DEBUG = False
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "site_urls"
INSTALLED_APPS = ["django.contrib.admin", "django.contrib.auth", "django.contrib.contenttypes",
                  "django.contrib.sessions", "django.contrib.messages", "django.contrib.staticfiles", "shelf"]
MIDDLEWARE = ["django.middleware.security.SecurityMiddleware",
              "django.contrib.sessions.middleware.SessionMiddleware",
              "django.middleware.locale.LocaleMiddleware", "django.middleware.common.CommonMiddleware",
              "django.middleware.csrf.CsrfViewMiddleware",
              "django.contrib.auth.middleware.AuthenticationMiddleware",
              "django.contrib.messages.middleware.MessageMiddleware"]
TEMPLATES = [{"BACKEND": "django.template.backends.django.DjangoTemplates", "DIRS": [], "APP_DIRS": True,
              "OPTIONS": {"context_processors": ["django.template.context_processors.request",
                                                 "django.contrib.auth.context_processors.auth",
                                                 "django.contrib.messages.context_processors.messages"]}}]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": DB_PATH}}
USE_I18N = True
USE_TZ = True
LANGUAGE_CODE = "en"
LANGUAGES = [("en", "English"), ("fr", "French")]
LOCALE_PATHS = [LOCALE_DIR]
STATIC_URL = "/static/"
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
"""

MODELS = """
from django.db import models


class Author(models.Model):
    name = models.CharField(max_length=100)
    born = models.DateField(null=True)


class Tag(models.Model):
    label = models.CharField(max_length=40)


class Book(models.Model):
    title = models.CharField(max_length=200)
    author = models.ForeignKey(Author, on_delete=models.CASCADE, related_name="books")
    tags = models.ManyToManyField(Tag)
    published = models.DateField()
    pages = models.IntegerField()


class Review(models.Model):
    book = models.ForeignKey(Book, on_delete=models.CASCADE, related_name="reviews")
    stars = models.IntegerField()
    text = models.TextField()
"""

ADMIN = """
from django.contrib import admin

from .models import Author, Book, Review, Tag

admin.site.register([Author, Book, Review, Tag])
"""

VIEWS = """
from django.http import JsonResponse
from django.shortcuts import get_object_or_404, render

from .models import Book


def books(request):
    shown = Book.objects.select_related("author").prefetch_related("tags").order_by("title")[:40]
    return render(request, "shelf/list.html", {"books": shown})


def book(request, pk):
    return render(request, "shelf/detail.html", {"book": get_object_or_404(Book, pk=pk)})


def api(request):
    return JsonResponse({"books": list(Book.objects.values("id", "title", "pages")[:50])})
"""

URLS = """
from django.contrib import admin
from django.urls import path

from shelf import views

urlpatterns = [
    path("", views.books),
    path("book/<int:pk>/", views.book),
    path("api/books.json", views.api),
    path("admin/", admin.site.urls),
]
"""

BASE = """{% load i18n %}<!doctype html><html lang="{{ LANGUAGE_CODE }}"><head><title>{% block title %}{% translate "Shelf" %}{% endblock %}</title></head>
<body><nav>{% translate "Books" %} | {% translate "Authors" %}</nav>{% block content %}{% endblock %}
<footer>{% blocktranslate count n=3 %}{{ n }} shelf{% plural %}{{ n }} shelves{% endblocktranslate %}</footer></body></html>
"""

LIST = """{% extends "shelf/base.html" %}{% load i18n %}
{% block content %}<h1>{% translate "Books" %}</h1><ul>{% for book in books %}
<li class="{% cycle 'odd' 'even' %}"><a href="/book/{{ book.pk }}/">{{ book.title|title }}</a>
{% translate "by" %} {{ book.author.name|upper }}, {{ book.published|date:"DATE_FORMAT" }}, {{ book.pages|floatformat:0 }} {% translate "pages" %}
{% for tag in book.tags.all %}<span>{{ tag.label|lower }}</span>{% empty %}-{% endfor %}</li>{% endfor %}</ul>{% endblock %}
"""

DETAIL = """{% extends "shelf/base.html" %}{% load i18n %}
{% block title %}{{ book.title }}{% endblock %}
{% block content %}<h1>{{ book.title }}</h1><p>{% translate "by" %} {{ book.author.name }}</p>
{% for review in book.reviews.all %}<blockquote>{{ review.stars }}/5 {{ review.text|truncatewords:12|linebreaksbr }}</blockquote>
{% empty %}<p>{% translate "No reviews yet" %}</p>{% endfor %}{% endblock %}
"""

CATALOGUE = {"Shelf": "Étagère", "Books": "Livres", "Authors": "Auteurs", "by": "par", "pages": "pages",
             "No reviews yet": "Pas encore de critique"}

# (path, Accept-Language) in the order each client thread cycles through them.
MIX = [("/", "en"), ("/", "fr"), ("/book/{n}/", "en"), ("/book/{n}/", "fr"), ("/api/books.json", "en"),
       ("/admin/login/", "en"), ("/admin/login/", "fr"), ("/missing/{n}", "en"), ("/book/{n}/", "en")]


def write_mo(path: Path, messages: dict[str, str]) -> None:
    """A GNU gettext .mo catalogue (the format msgfmt writes), so no gettext tools are needed."""
    items = sorted([("", "Content-Type: text/plain; charset=UTF-8\n"), *messages.items()])
    ids = [key.encode() for key, _ in items]
    strs = [value.encode() for _, value in items]
    count, header = len(items), 7 * 4
    ids_start = header + count * 16
    ids_blob, strs_blob, id_table, str_table = b"", b"", [], []
    for data in ids:
        id_table.append((len(data), ids_start + len(ids_blob)))
        ids_blob += data + b"\0"
    strs_start = ids_start + len(ids_blob)
    for data in strs:
        str_table.append((len(data), strs_start + len(strs_blob)))
        strs_blob += data + b"\0"
    out = struct.pack("<7I", 0x950412DE, 0, count, header, header + count * 8, 0, 0)
    out += b"".join(struct.pack("<2I", *entry) for entry in id_table)
    out += b"".join(struct.pack("<2I", *entry) for entry in str_table)
    path.write_bytes(out + ids_blob + strs_blob)


def make_project(root: Path) -> None:
    """Write the project, migrate its database and fill it."""
    (root / "shelf" / "templates" / "shelf").mkdir(parents=True)
    (root / "shelf" / "migrations").mkdir()
    (root / "locale" / "fr" / "LC_MESSAGES").mkdir(parents=True)
    settings = f"DB_PATH = {str(root / 'db.sqlite3')!r}\nLOCALE_DIR = {str(root / 'locale')!r}\n" + SETTINGS
    (root / "site_settings.py").write_text(settings)
    (root / "site_urls.py").write_text(textwrap.dedent(URLS))
    (root / "site_wsgi.py").write_text(
        "import os\nos.environ.setdefault('DJANGO_SETTINGS_MODULE', 'site_settings')\n"
        "from django.core.wsgi import get_wsgi_application\napplication = get_wsgi_application()\n")
    for name, text in (("__init__.py", ""), ("models.py", MODELS), ("admin.py", ADMIN), ("views.py", VIEWS),
                       ("migrations/__init__.py", "")):
        (root / "shelf" / name).write_text(textwrap.dedent(text))
    for name, text in (("base.html", BASE), ("list.html", LIST), ("detail.html", DETAIL)):
        (root / "shelf" / "templates" / "shelf" / name).write_text(text)
    write_mo(root / "locale" / "fr" / "LC_MESSAGES" / "django.mo", CATALOGUE)
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "site_settings", "PYTHONPATH": str(root)}
    manage = [sys.executable, "-m", "django"]
    subprocess.run([*manage, "makemigrations", "shelf", "-v", "0"], cwd=root, env=env, check=True)
    subprocess.run([*manage, "migrate", "-v", "0"], cwd=root, env=env, check=True)
    fill = textwrap.dedent("""
        import datetime, django, random
        django.setup()
        from shelf.models import Author, Book, Review, Tag
        random.seed(1)
        tags = [Tag.objects.create(label=f"Tag {i}") for i in range(12)]
        authors = [Author.objects.create(name=f"Author {i}", born=datetime.date(1900 + i, 1, 1)) for i in range(30)]
        for i in range(300):
            book = Book.objects.create(title=f"book number {i}", author=random.choice(authors), pages=100 + i,
                                       published=datetime.date(1950, 1, 1) + datetime.timedelta(days=i * 40))
            book.tags.set(random.sample(tags, 3))
            for j in range(3):
                Review.objects.create(book=book, stars=1 + (i + j) % 5, text="A fine read. " * 20)
    """)
    subprocess.run([sys.executable, "-c", fill], cwd=root, env=env, check=True)


def get(port: int, path: str, language: str) -> float:
    """One request on a fresh connection; its duration in seconds."""
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path, headers={"Accept-Language": language, "Connection": "close"})
        response = connection.getresponse()
        response.read()
        if response.status not in (200, 302, 404):
            raise RuntimeError(f"{path}: status {response.status}")
    finally:
        connection.close()
    return time.perf_counter() - started


def send(port: int, total: int) -> list[float]:
    """``total`` requests of the mix from CLIENTS threads; every duration."""
    durations: list[float] = []
    errors: list[BaseException] = []

    def client(index: int) -> None:
        try:
            for n in range(index, total, CLIENTS):
                path, language = MIX[n % len(MIX)]
                durations.append(get(port, path.format(n=1 + n % 300), language))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return durations


def tree(pid: int) -> list[int]:
    """``pid`` and every descendant, from /proc (the children files of each task)."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                queue += [int(child) for child in Path(f"/proc/{current}/task/{task}/children").read_text().split()]
        except OSError:
            pass
    return found


def rollup(pid: int) -> dict[str, int]:
    """Pss and private memory of one process, in bytes, from smaps_rollup."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        fields[name] = int(rest.split()[0]) * 1024
    return {"pss": fields["Pss"], "private": fields["Private_Clean"] + fields["Private_Dirty"]}


def frames(pid: int, start: int, end: int) -> array.array:
    """The physical frame of each page of ``pid`` from ``start`` to ``end``, 0 where none (root only)."""
    with open(f"/proc/{pid}/pagemap", "rb") as pagemap:
        pagemap.seek(start // PAGE * 8)
        entries = array.array("Q", pagemap.read((end - start) // PAGE * 8))
    return array.array("Q", (entry & FRAME if entry >> 63 else 0 for entry in entries))


def page_kind(mine: bytes, theirs: bytes) -> str:
    """What a write changed in a page copied on write, from the two copies."""
    diffs = [(a, b) for a, b in zip(array.array("q", mine), array.array("q", theirs)) if a != b]
    if not diffs:
        return "same"  # written and restored: reference counts raised and lowered again
    if all(0 < a < 1 << 32 and 0 < b < 1 << 32 and abs(a - b) < SMALL_CHANGE for a, b in diffs):
        return "counts"
    return "content"


def copied_pages(worker: int, source: int) -> dict[str, float]:
    """MiB of ``worker``'s own pages by how they came to be its own, against ``source``, its fork parent.

    A page mapped at the same address in both but held in another physical
    frame was copied on a write.  For the Python heap (anonymous memory) the
    two copies tell what the write did: ``same`` (the content is as in the
    source: counts raised and lowered), ``counts`` (only reference counts
    moved), ``content``; ``other`` is copied library data and stacks, ``new``
    what the source does not have at that address.
    """
    found = dict.fromkeys(("same", "counts", "content", "other", "new"), 0)
    with open(f"/proc/{worker}/mem", "rb") as mine, open(f"/proc/{source}/mem", "rb") as theirs:
        for line in Path(f"/proc/{worker}/maps").read_text().splitlines():
            span, *rest = line.split()
            start, end = (int(part, 16) for part in span.split("-"))
            name = rest[4] if len(rest) > 4 else ""
            if name in ("[vvar]", "[vdso]", "[vsyscall]"):
                continue
            own, parent = frames(worker, start, end), frames(source, start, end)
            for index, frame in enumerate(own):
                if not frame or frame == parent[index]:
                    continue
                if not parent[index]:
                    found["new"] += 1
                elif name not in ("", "[heap]"):
                    found["other"] += 1
                else:
                    address = start + index * PAGE
                    mine.seek(address)
                    theirs.seek(address)
                    found[page_kind(mine.read(PAGE), theirs.read(PAGE))] += 1
    return {kind: count * PAGE / MIB for kind, count in found.items()}


def ksm_value(name: str) -> int:
    return int((KSM / name).read_text())


def ksmd_cpu_seconds() -> float:
    """CPU time ksmd (the kernel thread that scans and merges) has used, from its /proc/PID/stat."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "ksmd":
                    fields = (entry / "stat").read_text().rpartition(")")[2].split()
                    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
            except OSError:
                continue
    return 0.0


def ksm_settle() -> dict[str, float]:
    """Wait until ksmd's merged page count stays put over two full scans; what it cost, and costs after.

    Bounded by KSM_SETTLE_TIMEOUT: a tree still merging then is read as it is.
    """
    started, cpu = time.monotonic(), ksmd_cpu_seconds()
    scans, sharing = ksm_value("full_scans"), [ksm_value("pages_sharing")]
    while time.monotonic() - started < KSM_SETTLE_TIMEOUT:
        time.sleep(1)
        if ksm_value("full_scans") > scans:
            scans = ksm_value("full_scans")
            sharing.append(ksm_value("pages_sharing"))
            if len(sharing) >= 3 and abs(sharing[-1] - sharing[-3]) <= sharing[-1] // 100:
                break
    settled = {"seconds": time.monotonic() - started, "ksmd_cpu": ksmd_cpu_seconds() - cpu,
               "scans": len(sharing) - 1, "pages_sharing": ksm_value("pages_sharing"),
               "pages_shared": ksm_value("pages_shared")}
    cpu = ksmd_cpu_seconds()
    time.sleep(KSM_STEADY_SECONDS)  # ksmd goes on scanning the tree, merged or not: what that costs
    settled["steady_share"] = (ksmd_cpu_seconds() - cpu) / KSM_STEADY_SECONDS
    return settled


def read_tree(master: int) -> dict[str, float]:
    """Total PSS, mean private memory per serving worker and merged pages of the tree, in MiB."""
    processes = tree(master)
    readings = {pid: rollup(pid) for pid in processes}
    serving = serving_workers(master)
    return {
        "total_pss": sum(r["pss"] for r in readings.values()) / MIB,
        "private_per_worker": statistics.mean(readings[pid]["private"] for pid in serving) / MIB,
        "merged": sum(merged_bytes(pid) or 0 for pid in processes) / MIB,
        "processes": len(processes),
    }


def title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def serving_workers(master: int) -> list[int]:
    """The master's children that serve (not a refork mold)."""
    return [pid for pid in tree(master)[1:] if "mold" not in title(pid)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_answering(port: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            get(port, "/api/books.json", "en")
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("server did not answer")


def settle(master: int, workers: int, *, replaced: set[int] = frozenset(), mold: bool = False) -> list[int]:
    """Wait for ``workers`` booted serving workers, none of them in ``replaced``, and with ``mold`` a mold."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while time.monotonic() < deadline:
        children = tree(master)[1:]
        molds = [pid for pid in children if "forkserver: mold" in title(pid)]
        serving = [pid for pid in children if pid not in molds]
        booted = not any("booting" in title(pid) for pid in serving)
        if len(serving) == workers and booted and not set(serving) & replaced and (molds or not mold):
            return serving
        time.sleep(0.5)
    raise RuntimeError("the pool did not settle")


def measure(name: str, command: list[str], port: int, cwd: Path, requests: int, workers: int,
            refork: bool, pages: bool, merge: bool = False) -> dict[str, Any]:
    # This checkout's forkserver, not whichever one is installed.
    path = os.pathsep.join(filter(None, [str(cwd), str(FORKSERVER_ROOT), os.environ.get("PYTHONPATH", "")]))
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "site_settings", "PYTHONPATH": path}
    log_path = cwd / f"{name.replace(' ', '_')}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=log)
    try:
        try:
            wait_answering(port, process)
        except RuntimeError:
            sys.stderr.write(log_path.read_text(errors="replace"))
            raise
        first = settle(process.pid, workers)
        send(port, requests)  # warm-up: every worker loads what the app loads lazily
        # With refork, until the mold forked every worker (the first ones are rolled over).
        settle(process.pid, workers, replaced=set(first) if refork else set(), mold=refork)
        send(port, requests // 2)  # the pool as it now is serves the same mix
        result = read_tree(process.pid)
        if merge:
            result["at_once"] = dict(result)
            result["ksm"] = ksm_settle()
            result.update(read_tree(process.pid))
        serving = serving_workers(process.pid)
        if pages:
            molds = [pid for pid in tree(process.pid) if "forkserver: mold" in title(pid)]
            result["pages"] = copied_pages(serving[0], molds[0] if molds else process.pid)
        os.kill(serving[0], signal.SIGTERM)  # replaced (by the mold, with refork) while the clients go on
        latencies = sorted(send(port, 200))
        result["p99_after_replacement_ms"] = latencies[int(len(latencies) * 0.99) - 1] * 1000
        return result
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="warm-up requests (then half as many more)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--refork-after", default="150", help="forkserver's --refork-after for the refork runs")
    parser.add_argument("--pages", action="store_true", help="also say how one worker's private memory came to "
                        "be (pages copied from the mold or master, and what the writes changed); needs root")
    parser.add_argument("--only", default="", help="measure only the servers whose name contains this, or one of "
                        "these comma-separated parts (the "
                        "preload run is always measured: it is the base of the ratios)")
    args = parser.parse_args()
    if args.pages and os.geteuid() != 0:
        parser.error("--pages reads physical page frames from /proc/PID/pagemap, which only root may")
    with tempfile.TemporaryDirectory(prefix="refork-bench-") as directory:
        root = Path(directory)
        make_project(root)
        servers = [
            ("forkserver", [], False),
            ("forkserver --preload", ["--preload"], False),
            ("forkserver --refork-after", ["--refork-after", args.refork_after], True),
            ("forkserver --preload --refork-after", ["--preload", "--refork-after", args.refork_after], True),
        ]
        merging = ksm_available()
        if merging:
            servers += [(f"{name} --memory-merge", [*options, "--memory-merge"], refork)
                        for name, options, refork in servers[1:]]
        results: dict[str, dict[str, Any]] = {}
        wanted = [part.strip() for part in args.only.split(",")]
        servers = [entry for entry in servers if entry[0] == "forkserver --preload"
                   or any(part in entry[0] for part in wanted)]
        with ksm_running(merging):
            for name, options, refork in servers:
                port = free_port()
                command = [sys.executable, "-m", "forkserver", "site_wsgi:application", "-w", str(args.workers),
                           "-b", f"127.0.0.1:{port}", "--pythonpath", str(root), *options]
                results[name] = measure(name, command, port, root, args.requests, args.workers, refork,
                                        args.pages, merge="--memory-merge" in options)
                print(f"{name:52} measured", file=sys.stderr)
        if not any(part in "gunicorn --preload" for part in wanted):
            pass
        elif _has_module("gunicorn"):
            port = free_port()
            command = [sys.executable, "-m", "gunicorn", "site_wsgi:application", "-w", str(args.workers),
                       "-b", f"127.0.0.1:{port}", "--preload", "--access-logfile", "/dev/null"]
            results["gunicorn --preload"] = measure("gunicorn", command, port, root, args.requests, args.workers,
                                                    False, args.pages)
        else:
            print("gunicorn is not installed: pip install gunicorn to compare", file=sys.stderr)
    base = results["forkserver --preload"]
    print(f"Django project, -w {args.workers}, {args.requests} + {args.requests // 2} mixed requests, "
          f"refork_after={args.refork_after}, Python {sys.version.split()[0]}")
    print(f"{'server':52} {'total PSS':>10} {'x preload':>9} {'private/worker':>15} {'x preload':>9} "
          f"{'p99 after replace':>18}")
    for name, result in results.items():
        print(f"{name:52} {result['total_pss']:8.1f}Mi {result['total_pss'] / base['total_pss']:9.2f} "
              f"{result['private_per_worker']:13.1f}Mi {result['private_per_worker'] / base['private_per_worker']:9.2f} "
              f"{result['p99_after_replacement_ms']:16.1f}ms")
    merged = {name: result for name, result in results.items() if "ksm" in result}
    if merged:
        print("\nwith --memory-merge: the tree right after the second round, before ksmd settled; how long it took "
              "to settle, the CPU ksmd used meanwhile, what it then merged (the tree's merged pages, and "
              f"ksmd's pages_sharing and pages_shared), and ksmd's CPU over the {KSM_STEADY_SECONDS:.0f} s after:")
        print(f"{'server':52} {'total PSS':>10} {'private/worker':>15} {'settled in':>11} {'ksmd CPU':>14} "
              f"{'merged':>9} {'sharing':>8} {'shared':>7} {'ksmd after':>10}")
        for name, result in merged.items():
            first, ksm = result["at_once"], result["ksm"]
            share = ksm["ksmd_cpu"] / ksm["seconds"] if ksm["seconds"] else 0.0
            print(f"{name:52} {first['total_pss']:8.1f}Mi {first['private_per_worker']:13.1f}Mi "
                  f"{ksm['seconds']:10.0f}s {ksm['ksmd_cpu']:5.1f}s ({share:4.1%}) {result['merged']:7.1f}Mi "
                  f"{ksm['pages_sharing']:8} {ksm['pages_shared']:7} {ksm['steady_share']:10.1%}")
    if args.pages:
        print("\none worker's own pages against the process it was forked from (MiB), heap pages by what changed:")
        kinds = ("same", "counts", "content", "other", "new")
        print(f"{'server':52}" + "".join(f" {kind:>8}" for kind in kinds))
        for name, result in results.items():
            print(f"{name:52}" + "".join(f" {result['pages'][kind]:8.1f}" for kind in kinds))
    return 0


def ksm_available() -> bool:
    """Can this run measure --memory-merge: KSM in the kernel, and running or ours (root) to start?"""
    if not (KSM / "run").exists():
        print("no /sys/kernel/mm/ksm: this kernel has no same-page merging; the --memory-merge runs are skipped",
              file=sys.stderr)
        return False
    if os.geteuid() != 0 and ksm_value("run") != 1:
        print(f"{KSM / 'run'} is not 1 and only root may change it: the --memory-merge runs are skipped",
              file=sys.stderr)
        return False
    return True


@contextlib.contextmanager
def ksm_running(wanted: bool) -> Iterator[None]:
    """ksmd running for the block if ``wanted``; /sys/kernel/mm/ksm/run as it was afterwards."""
    before = (KSM / "run").read_text().strip() if wanted else ""
    if wanted and before != "1":
        (KSM / "run").write_text("1")
    try:
        yield
    finally:
        if wanted and before != "1":
            (KSM / "run").write_text(before)


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


if __name__ == "__main__":
    sys.exit(main())
