"""The master's job, on real processes: listeners, respawn, scaling, stop, reload, logs, titles."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

from harness import APPS, listening_socket, poll, read_all


def unix_get(path: str, request: bytes = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n") -> bytes:
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(5)
        conn.connect(path)
        conn.sendall(request)
        return read_all(conn)


def try_unix_get(path: Path) -> bytes | None:
    """unix_get, or None while nothing (or a stale file) is there to answer."""
    try:
        return unix_get(str(path))
    except OSError:
        return None


def pids_answering(srv, count: int) -> set[int]:
    """Ask ``count`` times on fresh connections and collect the worker PIDs that answered."""
    return {requests.get(srv.url, headers={"Connection": "close"}).json()["pid"] for _ in range(count)}


def test_killed_worker_is_replaced_while_the_other_serves(server):
    srv = server("basic:pid", "-w", "2", workers=2)
    victim, survivor = srv.worker_pids()
    os.kill(victim, signal.SIGKILL)
    assert requests.get(srv.url).status_code == 200  # the other worker carries on
    replaced = poll(lambda: len(srv.worker_pids()) == 2 and victim not in srv.worker_pids(), timeout=2.0,
                    interval=0.02, what="the killed worker to be replaced within 2 s")
    assert replaced and survivor in srv.worker_pids()
    assert "worker died slot=" in srv.log() and "killed by SIGKILL" in srv.log()


PIDS_CGROUPS = Path("/sys/fs/cgroup/pids")


@pytest.fixture
def two_process_cgroup(tmp_path):
    """A pids cgroup (v1) that holds at most two processes; removed once its processes are gone."""
    group = PIDS_CGROUPS / f"forkserver-test-{os.getpid()}-{tmp_path.name}"
    try:
        group.mkdir()
    except OSError as exc:
        pytest.skip(f"needs a writable pids cgroup under {PIDS_CGROUPS}: {exc.strerror}")
    (group / "pids.max").write_text("2")
    yield group
    poll(lambda: not (group / "cgroup.procs").read_text().strip(), timeout=10, what="the cgroup to empty")
    group.rmdir()


def test_a_failed_fork_is_logged_retried_and_leaks_nothing(two_process_cgroup, server):
    """Out of processes: the master says so, serves with the workers it has, and retries.

    The master runs in a cgroup with room for itself and one worker, so
    forking the second fails with EAGAIN on every try.  Each try makes a
    scoreboard and a stats pipe for the worker; a failed one must give them
    back, or the master would run out of descriptors in the end.
    """
    procs = str(two_process_cgroup / "cgroup.procs")

    def join_cgroup() -> None:
        with open(procs, "w") as f:
            f.write("0")  # this process, about to exec the master
    srv = server("basic:pid", "-w", "2", "--stats-bind", "127.0.0.1:0", popen={"preexec_fn": join_cgroup})
    poll(lambda: srv.log().count("fork failed slot=1") >= 2, timeout=10, what="two failed forks to be logged")
    assert "Resource temporarily unavailable; retrying in 1s" in srv.log()
    master = psutil.Process(srv.pid)
    descriptors = master.num_fds()
    tries = srv.log().count("fork failed")
    poll(lambda: srv.log().count("fork failed") >= tries + 3, timeout=10, what="three more tries")
    assert master.num_fds() == descriptors
    assert len(srv.worker_pids()) == 1
    assert requests.get(srv.url, timeout=5).json()["pid"] == srv.worker_pids()[0]


def test_at_a_cold_start_the_first_worker_boots_alone_for_a_moment(server, tmp_path):
    """Nobody serves yet, so one worker boots without the others competing for the CPUs;
    they follow after SOLO_BOOT (0.1 s), not after its whole boot."""
    (tmp_path / "slow_boot.py").write_text(
        "import time\ntime.sleep(2)\n\ndef app(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Length', '2')])\n    return [b'ok']\n")
    srv = server("slow_boot:app", "-w", "3", "--pythonpath", str(tmp_path), workers=3)
    master_cpu = sum(psutil.Process(srv.pid).cpu_times()[:2])
    assert master_cpu < 1.0, f"the master used {master_cpu:.2f}s of CPU while its workers booted for 2s"
    forked = sorted(psutil.Process(pid).create_time() for pid in srv.worker_pids())
    assert forked[1] - forked[0] >= 0.08, f"the others were forked {forked[1] - forked[0]:.3f}s after the first"
    assert forked[2] - forked[0] < 1.5, "the others waited for the first worker's whole boot"
    assert requests.get(srv.url).text == "ok"


def test_every_worker_inherits_the_shared_stdlib_from_the_master(server, tmp_path):
    """The first worker too is forked after share_stdlib (hashlib, http.client with ssl, pickle ...).

    Imported after the first fork, these modules would reach the first
    worker 9 ms sooner (hello) but cost the tree 1.8 MiB of PSS with hello
    and 2.3-2.6 MiB with Flask: that worker would import its own copy, and
    the master's imports would dirty pages it still shares with it.
    """
    (tmp_path / "inherits.py").write_text(
        "import os\nimport sys\n\n"
        "inherited = [name for name in ('hashlib', 'http.client', 'ssl', 'pickle') if name in sys.modules]\n"
        "with open(os.path.join(os.path.dirname(__file__), f'inherited.{os.getpid()}'), 'w') as f:\n"
        "    f.write(' '.join(inherited))\n\n"
        "def app(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Length', '2')])\n    return [b'ok']\n")
    srv = server("inherits:app", "-w", "2", "--pythonpath", str(tmp_path), workers=2)
    poll(lambda: srv.log().count("worker ready") == 2, what="both workers' ready lines")
    inherited = {int(slot): (tmp_path / f"inherited.{pid}").read_text()
                 for slot, pid in re.findall(r"worker ready slot=(\d+) pid=(\d+)", srv.log())}
    assert inherited == {0: "hashlib http.client ssl pickle", 1: "hashlib http.client ssl pickle"}


def test_workers_are_direct_children_with_titles(server):
    srv = server("basic:pid", "-w", "2", "--name", "shop", workers=2)
    assert psutil.Process(srv.pid).cmdline()[0] == "forkserver: master [shop]"
    for pid in srv.worker_pids():
        assert psutil.Process(pid).ppid() == srv.pid
        assert psutil.Process(pid).cmdline()[0].startswith("forkserver: worker [shop] ")


def test_worker_titles_show_what_is_running(server):
    srv = server("basic:slow", "-w", "1", "--name", "shop", ready_path="/?0", workers=1)
    (worker,) = srv.worker_pids()
    poll(lambda: psutil.Process(worker).cmdline()[0].startswith("forkserver: worker [shop] idle"),
         what="an idle title")
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as conn:
        conn.sendall(b"GET /stuck?2 HTTP/1.1\r\nHost: t\r\n\r\n")
        poll(lambda: psutil.Process(worker).cmdline()[0] == "forkserver: worker [shop] busy GET /stuck",
             what="the request in the title")


def test_a_worker_title_says_idle_as_soon_as_the_worker_is_ready(server):
    """Not a whole idle wait (a second) later: ps, and wait_ready here, go by the title."""
    srv = server("basic:pid", "-w", "2", wait=False)
    poll(lambda: srv.log().count("worker ready") == 2, what="both workers' ready lines")
    titles = [psutil.Process(pid).cmdline()[0] for pid in srv.worker_pids()]
    assert titles == ["forkserver: worker [basic:pid] idle, 0 served"] * 2, titles


def test_ttin_and_ttou_scale_but_never_below_one(server):
    srv = server("basic:pid", "-w", "1", workers=1)
    srv.signal(signal.SIGTTIN)
    poll(lambda: len(srv.worker_pids()) == 2, what="a second worker")
    for _ in range(3):
        srv.signal(signal.SIGTTOU)
        time.sleep(0.1)
    poll(lambda: len(srv.worker_pids()) == 1, what="back to one worker")
    assert requests.get(srv.url).status_code == 200


def test_term_is_graceful_exits_zero_and_cleans_up(server, tmp_path):
    pidfile = tmp_path / "fs.pid"
    sock_path = tmp_path / "fs.sock"
    srv = server("basic:slow", "-w", "1", "-b", f"unix:{sock_path}", "--pid", str(pidfile), wait=False)
    poll(lambda: sock_path.exists() and pidfile.exists(), what="socket and pid files")
    assert int(pidfile.read_text()) == srv.pid
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(10)
        poll(lambda: try_unix_get(sock_path), what="the unix socket to answer")
        conn.connect(str(sock_path))
        conn.sendall(b"GET /?1 HTTP/1.1\r\nHost: t\r\n\r\n")
        time.sleep(0.3)  # the request is now inside the app
        srv.signal(signal.SIGTERM)
        answer = read_all(conn)
    assert answer.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in answer  # in-flight request finished
    assert srv.wait_exit() == 0
    assert not pidfile.exists() and not sock_path.exists()


def test_term_serves_connections_already_queued(server):
    srv = server("basic:slow", "-w", "1", workers=1)
    with socket.create_connection(("127.0.0.1", srv.port)) as busy:
        busy.sendall(b"GET /?1 HTTP/1.1\r\nHost: t\r\n\r\n")  # occupies the only worker
        time.sleep(0.3)
        queued = [socket.create_connection(("127.0.0.1", srv.port), timeout=15) for _ in range(20)]
        for conn in queued:
            conn.sendall(b"GET /?0 HTTP/1.1\r\nHost: t\r\n\r\n")
        srv.signal(signal.SIGTERM)
        answers = [read_all(conn) for conn in queued]
        for conn in queued:
            conn.close()
    assert all(answer.startswith(b"HTTP/1.1 200 OK") for answer in answers), answers
    assert srv.wait_exit() == 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGQUIT])
def test_int_and_quit_stop_fast(server, signum):
    srv = server("basic:slow", "-w", "2", "--graceful-timeout", "60", workers=2)
    workers = srv.worker_pids()
    with socket.create_connection(("127.0.0.1", srv.port)) as conn:
        conn.sendall(b"GET /?30 HTTP/1.1\r\nHost: t\r\n\r\n")
        time.sleep(0.3)
        srv.signal(signum)
        assert srv.wait_exit(10) == 0  # well before the 30 s request or 60 s grace
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                   for pid in workers)


def test_hung_worker_is_killed_and_replaced(server):
    # The readiness probe asks for /?0: basic:slow's default second would
    # itself come close to the timeout and, on a loaded machine, get the
    # worker killed during the probe.  Two seconds, not one, leave a worker
    # booting (which does not beat until it serves) room on a loaded machine.
    srv = server("basic:slow", "-w", "1", "--timeout", "2", ready_path="/?0", workers=1)
    (victim,) = srv.worker_pids()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=60) as conn:
        conn.sendall(b"GET /?60 HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_all(conn) == b""  # the worker was killed mid-request
    poll(lambda: srv.worker_pids() and victim not in srv.worker_pids(), 30, what="a replacement worker")
    assert f"worker timeout slot=0 pid={victim}: no progress" in srv.log(), srv.log()
    assert requests.get(srv.url + "/?0", timeout=30).status_code == 200


def test_stopped_master_kills_nobody_after_it_resumes(server):
    srv = server("basic:pid", "-w", "1", "--timeout", "1", workers=1)
    workers = srv.worker_pids()
    srv.signal(signal.SIGSTOP)
    time.sleep(2.5)
    srv.signal(signal.SIGCONT)
    time.sleep(1.5)
    assert srv.worker_pids() == workers
    assert "worker timeout" not in srv.log()


def test_hup_reload_replaces_every_worker_and_picks_up_new_code(server, tmp_path):
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    module = app_dir / "versioned.py"
    module.write_text(_versioned_app("one"))
    srv = server("versioned:app", "-w", "2", "--pythonpath", str(app_dir), workers=2)
    old = set(srv.worker_pids())
    assert requests.get(srv.url).json()["version"] == "one"
    module.write_text(_versioned_app("two"))
    srv.signal(signal.SIGHUP)
    poll(lambda: len(srv.worker_pids()) == 2 and not old & set(srv.worker_pids()), what="a new generation")
    assert requests.get(srv.url).json()["version"] == "two"


def test_hup_with_broken_code_keeps_the_old_generation(server, tmp_path):
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    module = app_dir / "versioned.py"
    module.write_text(_versioned_app("one"))
    srv = server("versioned:app", "-w", "2", "--pythonpath", str(app_dir), workers=2)
    old = srv.worker_pids()
    module.write_text("raise ImportError('half-deployed')\n")
    srv.signal(signal.SIGHUP)
    poll(lambda: "reload failed" in srv.log(), what="the reload failure to be logged")
    assert "half-deployed" in srv.log()
    assert requests.get(srv.url).json()["version"] == "one"
    poll(lambda: srv.worker_pids() == old, what="only the old workers to remain")


_SLOW_SECOND_IMPORT = """
import os, time
here = os.path.dirname(__file__)
with open(os.path.join(here, "imports"), "a") as fh:
    fh.write("x")
if os.path.getsize(os.path.join(here, "imports")) > 1:  # every worker's import but the first's
    time.sleep(1.5)
    if os.path.exists(os.path.join(here, "broken")):
        raise ImportError("half-deployed")

def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]
"""


def test_a_failed_reload_keeps_the_slot_of_an_old_worker_that_was_still_booting(server, tmp_path):
    # The second worker of the first generation is still importing when a
    # deploy breaks the code and HUP arrives: it fails too, before the new
    # generation does.  Abandoning the reload must keep two workers wanted,
    # not shrink the pool to the one old worker that happened to be alive.
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "slowsecond.py").write_text(_SLOW_SECOND_IMPORT)
    srv = server("slowsecond:app", "-w", "2", "--pythonpath", str(app_dir))
    (app_dir / "broken").write_text("")
    srv.signal(signal.SIGHUP)
    poll(lambda: "reload failed" in srv.log(), timeout=20, what="the reload failure to be logged")
    (app_dir / "broken").unlink()
    poll(lambda: len(srv.worker_pids()) == 2 and not srv.booting_pids(), timeout=30,
         what="the old generation's second slot to be filled again")
    assert requests.get(srv.url).status_code == 200


def test_hup_with_broken_config_keeps_serving(server, tmp_path):
    config = tmp_path / "fs.toml"
    config.write_text('app = "basic:pid"\nworkers = 1\n')
    srv = server("-c", str(config), workers=1)
    old = srv.worker_pids()
    config.write_text('app = "basic:pid"\nworkers = "many"\n')
    srv.signal(signal.SIGHUP)
    poll(lambda: "reload failed" in srv.log(), what="the reload failure to be logged")
    assert "workers must be an integer" in srv.log()
    assert srv.worker_pids() == old and requests.get(srv.url).status_code == 200


def test_preload_imports_once_in_the_master(server, tmp_path):
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "versioned.py").write_text(_versioned_app("one"))
    srv = server("versioned:app", "-w", "2", "--preload", "--pythonpath", str(app_dir), workers=2)
    data = requests.get(srv.url).json()
    assert data["imported_by"] == srv.pid  # imported before the fork, by the master
    (app_dir / "versioned.py").write_text(_versioned_app("two"))
    srv.signal(signal.SIGHUP)
    poll(lambda: requests.get(srv.url).json()["version"] == "two", what="the re-imported app")


def _versioned_app(version: str) -> str:
    return f'''
import json, os
IMPORTED_BY = os.getpid()

def app(environ, start_response):
    body = json.dumps({{"version": {version!r}, "pid": os.getpid(), "imported_by": IMPORTED_BY}}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
'''


def test_unix_socket_and_tcp_at_once(server, tmp_path):
    sock_path = tmp_path / "app.sock"
    srv = server("basic:echo", "-w", "1", "-b", f"unix:{sock_path}", "-b", "127.0.0.1:0", wait=False)
    answer = poll(lambda: try_unix_get(sock_path), what="the unix socket")
    data = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert data["REMOTE_ADDR"] == "" and data["SERVER_NAME"] == str(sock_path)
    assert oct(os.stat(sock_path).st_mode & 0o777) == "0o660"
    srv.stop()
    assert not sock_path.exists()


def test_stale_unix_socket_file_is_replaced(server, tmp_path):
    sock_path = tmp_path / "stale.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock_path))
    stale.close()  # the file stays behind, like after a crash
    server("basic:hello", "-w", "1", "-b", f"unix:{sock_path}", wait=False)
    assert poll(lambda: b"hello" in (try_unix_get(sock_path) or b""), what="the new socket")


def test_ipv6_listener(server):
    if not socket.has_ipv6:
        pytest.fail("this machine has no IPv6 loopback; the test needs ::1")
    sock = listening_socket(socket.AF_INET6, "::1")
    srv = server("basic:echo", "-w", "1", sock=sock, wait=False)
    port = sock.getsockname()[1]

    def ask():
        try:
            with socket.create_connection(("::1", port), timeout=2) as conn:
                conn.sendall(b"GET /v6 HTTP/1.1\r\nHost: [::1]\r\nConnection: close\r\n\r\n")
                return read_all(conn)
        except OSError:
            return None
    data = json.loads(poll(ask, what="the IPv6 listener").partition(b"\r\n\r\n")[2])
    assert data["REMOTE_ADDR"] == "::1" and data["PATH_INFO"] == "/v6"
    assert srv.proc.poll() is None


def test_reuse_port_spreads_connections_over_workers(server, migrate_req):
    migrate_req("1")
    # Hold the port with SO_REUSEPORT (bound, never listening) so nobody else
    # can take it between choosing it and the server binding it.
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    try:
        srv = server("basic:pid", "-w", "2", "--reuse-port", "-b", f"127.0.0.1:{port}", wait=False)
        srv.port = port
        srv.wait_ready(workers=2)
        poll(lambda: len(pids_answering(srv, 40)) == 2, what="both workers to take connections")
    finally:
        holder.close()
    assert "tcp_migrate_req" not in srv.log()  # set to 1: the kernel moves a leaving worker's queue


def test_reuse_port_warns_when_the_kernel_would_reset_a_leaving_workers_queue(server, migrate_req):
    """With net.ipv4.tcp_migrate_req 0, a start and --check-config each say so once, and what to set."""
    migrate_req("0")
    holder = socket.socket()  # the port stays ours until the server binds it (see above)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind(("127.0.0.1", 0))
    try:
        srv = server("basic:pid", "-w", "1", "--reuse-port", "-b", f"127.0.0.1:{holder.getsockname()[1]}",
                     wait=False)
        srv.port = holder.getsockname()[1]
        srv.wait_ready(workers=1)
    finally:
        holder.close()
    assert requests.get(srv.url, timeout=10).status_code == 200  # a warning, not a refusal
    warnings = [line for line in srv.log().splitlines() if "tcp_migrate_req is 0" in line]
    assert len(warnings) == 1 and "sysctl -w net.ipv4.tcp_migrate_req=1" in warnings[0], srv.log()
    check = subprocess.run([sys.executable, "-m", "forkserver", "--check-config", "--pythonpath", str(APPS),
                            "basic:pid", "--reuse-port", "-b", "127.0.0.1:0"],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "warning: reuse_port: net.ipv4.tcp_migrate_req is 0" in check.stderr, check
    without = subprocess.run([sys.executable, "-m", "forkserver", "--check-config", "--pythonpath", str(APPS),
                              "basic:pid", "-b", "127.0.0.1:0"], capture_output=True, text=True, timeout=60)
    assert without.returncode == 0 and "tcp_migrate_req" not in without.stderr, without


def test_access_log_text_and_json(server, tmp_path):
    text_log = tmp_path / "access.log"
    srv = server("basic:hello", "-w", "1", "--access-logfile", str(text_log))
    requests.get(srv.url + "/a?b=1", headers={"User-Agent": "tester", "Referer": "http://r/"})
    line = poll(lambda: [ln for ln in text_log.read_text().splitlines() if "/a?b=1" in ln], what="access line")[0]
    assert line.startswith("127.0.0.1 - - [") and '"GET /a?b=1 HTTP/1.1" 200 13 "http://r/" "tester"' in line

    json_log = tmp_path / "access.jsonl"
    srv = server("basic:hello", "-w", "1", "--access-logfile", str(json_log), "--access-logformat", "json")
    forged = 'x", "status": 999, "y": "'
    requests.get(srv.url + "/j", headers={"User-Agent": forged})
    record = poll(lambda: [json.loads(ln) for ln in json_log.read_text().splitlines() if '"/j"' in ln],
                  what="json line")[0]
    assert record["status"] == 200 and record["user_agent"] == forged and record["path"] == "/j"


def test_usr1_reopens_logs(server, tmp_path):
    access = tmp_path / "access.log"
    error = tmp_path / "error.log"
    srv = server("basic:hello", "-w", "1", "--access-logfile", str(access), "--error-logfile", str(error))
    requests.get(srv.url + "/before")
    poll(lambda: "/before" in access.read_text(), what="first access line")
    access.rename(tmp_path / "access.log.1")
    error.rename(tmp_path / "error.log.1")
    srv.signal(signal.SIGUSR1)
    poll(lambda: access.exists() and error.exists(), what="reopened log files")

    def logged_after():
        requests.get(srv.url + "/after")
        return "/after" in access.read_text()
    poll(logged_after, what="access lines in the new file")
    assert "/before" not in access.read_text()
