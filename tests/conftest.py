"""Shared fixtures: a factory for real server processes, torn down even on failure."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import ServerProcess, kernel_setting  # noqa: E402


@pytest.fixture
def server(tmp_path: Path) -> Iterator:
    """Return ``start(*args, **kw)``, which launches a ServerProcess; all are stopped at teardown."""
    started: list[ServerProcess] = []

    def start(*args: str, wait: bool = True, workers: int | None = None, **kwargs) -> ServerProcess:
        proc = ServerProcess(args, tmp_path, wait=False, **kwargs)
        started.append(proc)  # registered before waiting, so a failed start is cleaned up too
        if wait:
            proc.wait_ready(workers)
        return proc

    yield start
    # Teardown checks nothing about stopping (tests of it send their own
    # signal), so it asks for the fast stop: a graceful one waits out any
    # request a test leaves running, 10 s a time in the relay tests.
    for proc in started:
        proc.stop(fast=True)


MIGRATE_REQ = Path("/proc/sys/net/ipv4/tcp_migrate_req")


@pytest.fixture
def migrate_req() -> Iterator[Callable[[str], None]]:
    """Return ``set(value)`` for net.ipv4.tcp_migrate_req; the value found is written back at teardown.

    Under ``reuse_port`` a connection queued on a leaving worker's socket is
    reset unless it is 1 (forkserver.sockets.reuse_port_handover_problem).
    """
    yield from kernel_setting(MIGRATE_REQ, "this kernel (before 5.14) cannot move a closing socket's queue", "root")
