"""The start-up log reads in order: where we listen, what runs (app and version), then the workers."""

from __future__ import annotations

from harness import poll

from forkserver import __version__


def test_listening_and_master_started_come_before_any_worker_ready(server):
    srv = server("basic:hello", "-w", "3", workers=3)
    poll(lambda: srv.log().count("worker ready") == 3, what="three workers to be ready")
    lines = srv.log().splitlines()
    first = {marker: next(i for i, line in enumerate(lines) if marker in line)
             for marker in ("listening at", "master started", "worker ready")}
    assert first["listening at"] < first["master started"] < first["worker ready"], "\n".join(lines)
    started = lines[first["master started"]]
    assert f"master started pid={srv.pid} app=basic:hello version={__version__} workers=3 threads=1" in started
