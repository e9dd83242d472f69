"""The shipped deployment files in conf/: systemd units, the container entry point and manifest.

The systemd units are checked by ``systemd-analyze verify`` (with ExecStart
pointed at the forkserver actually installed) and then used: the test plays
systemd, binding the socket forkserver.socket describes and starting the
command line forkserver.service gives with LISTEN_FDS/LISTEN_PID set, and
drives it with the unit's own ExecReload and KillSignal.  The container entry
point is run for real, probed the way deployment.yaml's probes do and stopped
the way the kubelet stops a pod.  conf/nginx/forkserver.conf runs under the
real nginx in test_nginx.py.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml
from harness import APPS, ROOT, listening_socket, poll, raw_request, read_all, serving_in_thread
from prometheus_client.parser import text_string_to_metric_families

from forkserver.master.aggregator import Aggregator
from forkserver.sources import load_config
from forkserver.master.status import StatusServer, render_prometheus

CONF = ROOT / "conf"
SERVICE, SOCKET = CONF / "systemd" / "forkserver.service", CONF / "systemd" / "forkserver.socket"
NGINX_SITE = CONF / "nginx" / "forkserver.conf"
REFERENCE_TOML = CONF / "forkserver.toml"
K8S_TOML, ENTRYPOINT, MANIFEST = CONF / "k8s" / "forkserver.toml", CONF / "k8s" / "entrypoint.sh", \
    CONF / "k8s" / "deployment.yaml"
AUTOSCALING = CONF / "k8s" / "autoscaling.yaml"
DEADLINE = 20.0

# Every file in conf/ and the test that runs or checks it; a new file needs a test.
EXERCISED = {
    "forkserver.toml": "tests/unit/test_config.py; here, as the units' -c file",
    "nginx/forkserver.conf": "test_nginx.py (both upstream variants, under the real nginx)",
    "systemd/forkserver.service": "test_systemd_units_pass_systemd_analyze_verify, test_socket_activation_*",
    "systemd/forkserver.socket": "test_systemd_units_pass_systemd_analyze_verify, test_socket_activation_*",
    "k8s/entrypoint.sh": "test_container_entry_point_*",
    "k8s/forkserver.toml": "test_container_entry_point_*, test_k8s_manifest_*",
    "k8s/deployment.yaml": "test_k8s_manifest_*, test_k8s_autoscaling_*",
    "k8s/autoscaling.yaml": "test_k8s_autoscaling_*",
}


def test_every_shipped_config_file_is_exercised():
    shipped = {str(path.relative_to(CONF)) for path in CONF.rglob("*") if path.is_file()}
    assert shipped == set(EXERCISED), "conf/ and the tests that exercise it have drifted apart"


# -- systemd unit files --------------------------------------------------------------------


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values, in order]}}, the way systemd reads it."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line.startswith(("#", ";")):
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        assert current is not None, f"{path.name}: {line!r} outside any section"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit.get(section, {}).get(key, [])
    assert len(values) == 1, f"[{section}] {key}= should be set exactly once, found {values}"
    return values[0]


def seconds(value: str) -> float:
    """A systemd time span such as 45, 45s, 1min 30s."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


def installed_forkserver() -> str:
    """The forkserver console script of the interpreter running the tests."""
    candidate = Path(sysconfig.get_path("scripts")) / "forkserver"
    found = str(candidate) if candidate.exists() else shutil.which("forkserver")
    assert found, "the forkserver script is not installed (pip install -e '.[test]')"
    return found


def exec_start() -> list[str]:
    argv = shlex.split(one(parse_unit(SERVICE), "Service", "ExecStart"))
    assert argv[0].endswith("/forkserver"), argv
    return argv


def test_systemd_units_pass_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is not installed (apt-get install -y systemd, as .ci/run does)")
    # Only ExecStart's path is made real: verify insists the program exists.
    service = SERVICE.read_text()
    assert service.count(exec_start()[0]) == 1
    (tmp_path / SERVICE.name).write_text(service.replace(exec_start()[0], installed_forkserver()))
    shutil.copy(SOCKET, tmp_path / SOCKET.name)
    result = subprocess.run([analyze, "verify", "--man=no", str(tmp_path / SOCKET.name),
                             str(tmp_path / SERVICE.name)], capture_output=True, text=True, timeout=60,
                            check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # verify only warns (exit 0) about unknown keys or bad values: any word about our units fails.
    assert "forkserver." not in output, output


def test_systemd_units_say_what_the_deployment_guide_promises():
    service, socket_unit = parse_unit(SERVICE), parse_unit(SOCKET)
    assert one(service, "Service", "Type") == "notify"
    assert one(service, "Service", "NotifyAccess") == "all", "a USR2 master's MAINPID= would be ignored"
    assert one(service, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(service, "Service", "KillSignal") == "SIGTERM"
    assert one(service, "Service", "KillMode") == "mixed", "TERM must reach the master alone"
    graceful = load_config(["-c", str(REFERENCE_TOML)], {}).config.graceful_timeout
    # The master gives workers graceful_timeout, then one more second before SIGKILL, then exits.
    assert seconds(one(service, "Service", "TimeoutStopSec")) > graceful + 5
    assert "forkserver.socket" in one(service, "Unit", "Requires")
    assert "forkserver.socket" in one(service, "Unit", "After")
    argv = exec_start()
    assert argv[argv.index("-c") + 1] == "/etc/forkserver/forkserver.toml"
    assert argv[argv.index("--bind") + 1] == "fd://3", "the socket from forkserver.socket is descriptor 3"

    listen = one(socket_unit, "Socket", "ListenStream")
    assert f"server unix:{listen};" in NGINX_SITE.read_text(), "nginx must proxy to the socket systemd creates"
    assert one(socket_unit, "Socket", "SocketGroup") == "www-data"  # nginx's workers on Debian/Ubuntu
    assert one(socket_unit, "Socket", "SocketMode") == "0660"
    assert one(socket_unit, "Install", "WantedBy") == "sockets.target"
    assert one(service, "Install", "WantedBy") == "multi-user.target"


class NotifySocket:
    """systemd's end of NOTIFY_SOCKET: every sd_notify datagram, parsed."""

    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.received: list[dict[str, str]] = []

    def wait_for(self, predicate, what: str, timeout: float = DEADLINE) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536).decode()
            except TimeoutError:
                raise AssertionError(f"no sd_notify message with {what} within {timeout}s: {self.received}") from None
            message = dict(line.split("=", 1) for line in data.splitlines() if "=" in line)
            self.received.append(message)
            if predicate(message):
                return message

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path, for UNIX sockets (sun_path holds 108 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix="fsdc-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


# Plays the part of systemd between fork and exec: the socket becomes
# descriptor 3, LISTEN_PID names this very process, then ExecStart is executed.
ACTIVATE = (
    "import os, sys\n"
    "fd = int(sys.argv[1])\n"
    "os.dup2(fd, 3)\n"
    "if fd != 3:\n"
    "    os.close(fd)\n"
    "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES=sys.argv[2])\n"
    "os.execv(sys.argv[3], sys.argv[3:])\n"
)


def unix_get(path: Path, target: str = "/") -> bytes:
    """One request on the activated socket; a request left unanswered fails the test, it does not hang it."""
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(10)
        conn.connect(str(path))
        conn.sendall(f"GET {target} HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n".encode())
        try:
            return read_all(conn)
        except TimeoutError:
            raise AssertionError(f"GET {target} on {path}: accepted into the queue, no answer within 10 s") from None


def gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie, not ours to reap, counts: an orphan waits for init)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def stop_pid(pid: int) -> None:
    """KILL a master and its workers, by PID, if a test left them running."""
    try:
        process = psutil.Process(pid)
        family = [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for member in family:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass


def test_socket_activation_starts_forkserver_the_way_the_units_do(tmp_path, short_dir):
    service, socket_unit = parse_unit(SERVICE), parse_unit(SOCKET)
    # forkserver.socket, as systemd would set it up (in a test directory).
    listen_path = short_dir / Path(one(socket_unit, "Socket", "ListenStream")).name
    activated = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    activated.bind(str(listen_path))
    os.chmod(listen_path, int(one(socket_unit, "Socket", "SocketMode"), 8))
    activated.listen(int(one(socket_unit, "Socket", "Backlog")))
    activated.set_inheritable(True)

    # forkserver.service's ExecStart, with the reference config as its -c file.
    argv = exec_start()
    argv[0] = installed_forkserver()
    config = tmp_path / "forkserver.toml"
    shutil.copy(REFERENCE_TOML, config)
    argv[argv.index("-c") + 1] = str(config)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FORKSERVER_", "LISTEN_", "NOTIFY_"))}
    for assignment in service["Service"].get("Environment", []):
        for pair in shlex.split(assignment):
            key, _, value = pair.partition("=")
            env[key] = value
    notify = NotifySocket(short_dir)
    env["NOTIFY_SOCKET"] = notify.path
    # WatchdogSec=: systemd tells the process it started how often to ping.
    watchdog = seconds(one(service, "Service", "WatchdogSec"))
    env["WATCHDOG_USEC"] = str(int(watchdog * 1_000_000))
    log = tmp_path / "forkserver.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", ACTIVATE, str(activated.fileno()), SOCKET.name, *argv],
                                stdout=out, stderr=out, env=env, cwd=tmp_path, pass_fds=(activated.fileno(),))
    new_master = 0
    try:
        ready = notify.wait_for(lambda m: m.get("READY") == "1", "READY=1")
        assert ready["MAINPID"] == str(proc.pid), "Type=notify: the main PID is the process systemd started"
        notify.wait_for(lambda m: m.get("WATCHDOG") == "1", "WATCHDOG=1 within WatchdogSec")
        assert b"Hello from forkserver" in unix_get(listen_path), log.read_text()
        # --bind fd://3 overrides the config file's bind (127.0.0.1:8000): no TCP listener of its own.
        listening = [c for c in psutil.Process(proc.pid).net_connections("inet") if c.status == psutil.CONN_LISTEN]
        assert listening == [], f"the master bound {listening} itself"
        assert f"listening at unix:{listen_path}" in log.read_text(), log.read_text()

        # systemctl reload: ExecReload, with $MAINPID filled in as systemd does.
        reload = [arg.replace("$MAINPID", ready["MAINPID"]) for arg in
                  shlex.split(one(service, "Service", "ExecReload"))]
        subprocess.run(reload, check=True, timeout=10)
        notify.wait_for(lambda m: m.get("RELOADING") == "1", "RELOADING=1")
        notify.wait_for(lambda m: m.get("READY") == "1", "READY=1 after the reload")
        assert b"Hello from forkserver" in unix_get(listen_path)

        # The guide's USR2 upgrade: the new master takes over as MAINPID (NotifyAccess=all).
        os.kill(proc.pid, signal.SIGUSR2)
        handover = notify.wait_for(lambda m: m.get("MAINPID", str(proc.pid)) != str(proc.pid), "a new MAINPID")
        new_master = int(handover["MAINPID"])
        assert handover.get("READY") == "1"
        os.kill(proc.pid, signal.SIGTERM)  # the old master, as the guide says
        assert proc.wait(30) == 0
        assert b"Hello from forkserver" in unix_get(listen_path)

        # systemctl stop: KillSignal to the main process, done well within TimeoutStopSec.
        stop_signal = getattr(signal, one(service, "Service", "KillSignal"))
        os.kill(new_master, stop_signal)
        poll(lambda: gone(new_master), seconds(one(service, "Service", "TimeoutStopSec")),
             what="the master to exit on KillSignal within TimeoutStopSec")
        new_master = 0
        # The socket is systemd's: still there, still listening, for the next start.
        assert listen_path.exists(), "forkserver removed the socket file systemd owns"
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(str(listen_path))
    finally:
        if proc.poll() is None:
            stop_pid(proc.pid)
            proc.wait(10)
        if new_master:
            stop_pid(new_master)
        notify.close()
        activated.close()


# -- the container entry point and the Kubernetes manifest -----------------------------------------


def manifest_values() -> dict[str, object]:
    """What the deployment guide promises about deployment.yaml, read from the file."""
    text = MANIFEST.read_text()

    def single(pattern: str) -> str:
        found = re.findall(pattern, text, re.MULTILINE)
        assert len(found) == 1, f"{pattern!r} should match once in {MANIFEST.name}: {found}"
        return found[0]

    probes = re.findall(r"^\s+(readinessProbe|livenessProbe):\n((?:\s{12,}.*\n)+)", text, re.MULTILINE)
    return {
        "grace": int(single(r"^\s+terminationGracePeriodSeconds:\s*(\d+)\s*$")),
        "pre_stop": re.findall(r"^\s+preStop:", text, re.MULTILINE),
        "container_port": int(single(r"-\s+name:\s*http\s*\n\s+containerPort:\s*(\d+)\s*$")),
        "command": single(r'^\s+command:\s*\["(/[^"]+)"\]\s*$'),
        "workers": int(single(r'-\s+name:\s*FORKSERVER_WORKERS\s*\n\s+value:\s*"(\d+)"')),
        "probes": {name: body for name, body in probes},
    }


def test_k8s_manifest_agrees_with_the_container_config():
    config = load_config(["-c", str(K8S_TOML)], {}).config
    values = manifest_values()
    assert config.health_path, "the probes need forkserver's health check"
    assert set(values["probes"]) == {"readinessProbe", "livenessProbe"}
    for name, body in values["probes"].items():
        assert re.search(rf"path:\s*{re.escape(config.health_path)}\s*\n", body), f"{name} polls another path"
        assert "port: http" in body, name
    (bind,) = config.bind
    assert int(bind.rpartition(":")[2]) == values["container_port"]
    assert bind.startswith("0.0.0.0:"), "probes and the Service reach the pod on its own IP"
    # No preStop hook: the kubelet's clock starts with TERM; the master then
    # serves through shutdown_delay, and needs graceful_timeout plus a second
    # more before it stops waiting for workers.
    assert not values["pre_stop"], "shutdown_delay replaces a preStop sleep"
    assert config.shutdown_delay + config.graceful_timeout + 1 < values["grace"]
    # The readiness probe fails (503) within the delay, so the pod leaves rotation before it refuses.
    readiness = values["probes"]["readinessProbe"]
    period = int(re.search(r"periodSeconds:\s*(\d+)", readiness).group(1))
    failures = int(re.search(r"failureThreshold:\s*(\d+)", readiness).group(1))
    assert period * failures <= config.shutdown_delay
    # forkserver replaces a hung worker itself before liveness gives up on the pod.
    liveness = values["probes"]["livenessProbe"]
    period = int(re.search(r"periodSeconds:\s*(\d+)", liveness).group(1))
    failures = int(re.search(r"failureThreshold:\s*(\d+)", liveness).group(1))
    assert period * failures > config.timeout
    assert values["command"].endswith("forkserver-entrypoint")
    assert config.workers == values["workers"]
    assert tomllib.loads(K8S_TOML.read_text())["workers"] == values["workers"]


def test_container_entry_point_execs_forkserver_answers_probes_and_stops_gracefully(tmp_path):
    """Run conf/k8s/entrypoint.sh as the container would, with the container config."""
    config = load_config(["-c", str(K8S_TOML)], {}).config
    sock = listening_socket()
    port = sock.getsockname()[1]
    scripts = str(Path(installed_forkserver()).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FORKSERVER_", "LISTEN_", "NOTIFY_"))}
    env.update({
        "PATH": f"{scripts}:{env.get('PATH', '/usr/bin:/bin')}",
        "FORKSERVER_CONFIG": str(K8S_TOML),  # /etc/forkserver/forkserver.toml in the image
        # The pod spec's environment overrides the file: here the test's app, and a
        # loopback socket instead of 0.0.0.0:8000.
        "FORKSERVER_APP": "deploy_app:app",
        "FORKSERVER_PYTHONPATH": str(APPS),
        "FORKSERVER_BIND": f"fd://{sock.fileno()}",
        "FORKSERVER_WORKERS": str(manifest_values()["workers"]),
        # The file's shutdown delay, shortened: what happens in it is the same, and the suite stays quick.
        "FORKSERVER_SHUTDOWN_DELAY": "3",
    })
    delay = 3.0
    log = tmp_path / "container.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(ENTRYPOINT)], stdout=out, stderr=out, env=env, cwd=tmp_path,
                                pass_fds=(sock.fileno(),))
    sock.close()  # only the server holds it now, so a stopped server stops answering

    def probe() -> tuple[int, bytes] | None:
        """What the kubelet's httpGet probe does: GET the path on the container port."""
        if proc.poll() is not None:
            raise AssertionError(f"the entry point exited with {proc.returncode}: {log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
                conn.sendall(f"GET {config.health_path} HTTP/1.1\r\nHost: 10.1.2.3:{port}\r\n"
                             "User-Agent: kube-probe/1.30\r\nConnection: close\r\n\r\n".encode())
                answer = read_all(conn)
        except OSError:
            return None
        head, _, body = answer.partition(b"\r\n\r\n")
        return int(head.split()[1]), body

    try:
        status, body = poll(probe, DEADLINE, what="the readiness probe to be answered")
        assert (status, body) == (200, b"ok\n"), "the health check must not reach the app (it answers 503)"
        # exec: no shell stays between the runtime and the master, so TERM reaches it.
        title = psutil.Process(proc.pid).cmdline()[0]
        assert title.startswith("forkserver: master"), f"PID {proc.pid} is {title!r}, not the master"
        workers = poll(lambda: len(psutil.Process(proc.pid).children()) == config.workers, DEADLINE,
                       what=f"{config.workers} workers")
        assert workers

        # Pod termination: a request is in flight when the kubelet sends TERM.
        in_flight: dict[str, bytes] = {}

        def slow_request() -> None:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
                conn.sendall(b"GET /slow?2 HTTP/1.1\r\nHost: t\r\n\r\n")
                in_flight["answer"] = read_all(conn)
        client = threading.Thread(target=slow_request)
        client.start()
        poll(lambda: any("busy GET /slow" in " ".join(c.cmdline())
                         for c in psutil.Process(proc.pid).children()), DEADLINE, what="the slow request to start")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        # Through the shutdown delay the readiness probe fails while requests
        # the Service still routes here are served.
        assert poll(lambda: (probe() or (0, b""))[0] == 503, DEADLINE, what="the probe to fail after TERM")
        answer = raw_request(port, b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 OK") and b"\r\nConnection: close\r\n" in answer, answer[:300]
        assert proc.wait(delay + config.graceful_timeout + 5) == 0
        client.join(10)
        assert in_flight["answer"].startswith(b"HTTP/1.1 200 OK"), in_flight
        # The access log (stdout, for the container runtime) has the app's request, not the probes.
        assert '"GET /slow?2 HTTP/1.1" 200' in log.read_text() and "kube-probe" not in log.read_text()
        assert time.monotonic() - started < delay + config.graceful_timeout
    finally:
        if proc.poll() is None:
            stop_pid(proc.pid)
            proc.wait(10)


# -- the health check ----------------------------------------------------------------------------


def split_responses(data: bytes, head_only: set[int]) -> list[tuple[int, dict[str, str], bytes]]:
    """Pipelined answers as (status, lower-case headers, body); ``head_only`` indexes answered HEADs."""
    answers = []
    while data:
        head, sep, data = data.partition(b"\r\n\r\n")
        assert sep, f"an incomplete head: {head!r}"
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
        length = 0 if len(answers) in head_only else int(headers["content-length"])
        answers.append((int(status_line.split()[1]), headers, data[:length]))
        data = data[length:]
    return answers


def test_health_path_is_answered_by_the_worker_without_the_app(server, tmp_path):
    access = tmp_path / "access.log"
    srv = server("deploy_app:app", "-w", "1", "--health-path", "/healthz", "--access-logfile", str(access),
                 ready_path="/healthz")
    # Pipelined on one connection: GET, HEAD, a GET with a body (read and dropped),
    # then what is not the health check and goes to the app, then HTTP/1.0.
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
                     b"HEAD /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
                     b"GET /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello"
                     b"GET /healthz?full=1 HTTP/1.1\r\nHost: t\r\n\r\n"
                     b"POST /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n"
                     b"GET /healthz/ HTTP/1.1\r\nHost: t\r\n\r\n"
                     b"GET /healthz HTTP/1.0\r\n\r\n")
        answers = read_all(conn)
    answered = split_responses(answers, head_only={1})
    assert [status for status, _, _ in answered] == [200, 200, 200, 503, 503, 200, 200], answers
    for index in (0, 1, 2, 6):  # the health checks
        _, headers, body = answered[index]
        assert headers["content-length"] == "3" and body == (b"" if index == 1 else b"ok\n"), answered[index]
        assert headers.get("connection") == ("close" if index == 6 else None), answered[index]
    assert answered[3][2] == answered[4][2] == b"the app answered /healthz\n"  # ?query and POST reach the app
    assert b'"path": "/healthz/"' in answered[5][2]
    # Only what reached the app is access-logged; the probes are not.
    logged = poll(lambda: access.read_text().splitlines() if access.exists() and
                  len(access.read_text().splitlines()) >= 3 else None, what="three access log lines")
    assert sorted(line.split('"')[1] for line in logged) == sorted(
        ["GET /healthz?full=1 HTTP/1.1", "POST /healthz HTTP/1.1", "GET /healthz/ HTTP/1.1"]), logged


def test_health_path_is_off_by_default_and_validated(server):
    srv = server("deploy_app:app", "-w", "1", ready_path="/")
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert read_all(conn).startswith(b"HTTP/1.1 503"), "without --health-path the app answers"
    for bad in ("healthz", "/health check", "/healthz?x", "/h\u00e9"):
        result = subprocess.run([sys.executable, "-m", "forkserver", "deploy_app:app", "--pythonpath", str(APPS),
                                 "--health-path", bad, "--check-config"], capture_output=True, text=True, timeout=30,
                                check=False)
        assert result.returncode == 78, (bad, result)
        assert "health_path must be" in result.stderr, result.stderr


# -- autoscaling on the pods' metrics ---------------------------------------------------------------


def k8s_documents(path: Path) -> list[dict]:
    return list(yaml.safe_load_all(path.read_text()))


def pod_container() -> tuple[dict, dict, dict[str, dict]]:
    """The Deployment's pod template, its one container, and that container's env by name."""
    deployment = k8s_documents(MANIFEST)[0]
    assert deployment["kind"] == "Deployment"
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    return pod, container, {entry["name"]: entry for entry in container["env"]}


def exported_metric_names() -> set[str]:
    """Every series name a forkserver /metrics shows, from the real renderer."""
    aggregator = Aggregator()
    aggregator.add_worker(1, pid=1, slot=0, generation=1)
    listener = {"address": "http://10.1.2.3:8000", "accept_queue": 0, "accept_queue_max": 4096,
                "accept_queue_peak": 0}
    text = render_prometheus(aggregator.snapshot({1: {"threads": 1, "requests_in_flight": 0}}, [listener]))
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def test_k8s_autoscaling_scales_the_deployment_on_metrics_its_pods_export():
    deployment = k8s_documents(MANIFEST)[0]
    scaled, rule = k8s_documents(AUTOSCALING)
    assert (scaled["apiVersion"], scaled["kind"]) == ("keda.sh/v1alpha1", "ScaledObject")
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    pod, _, env = pod_container()
    triggers = scaled["spec"]["triggers"]
    queries = [trigger["metadata"]["query"] for trigger in triggers]
    queries += [rule["expr"] for group in rule["spec"]["groups"] for rule in group["rules"]]
    exported = exported_metric_names()
    for query in queries:
        names = set(re.findall(r"\bforkserver_\w+", query))
        assert names and names <= exported, f"{query!r} names a metric forkserver does not export"
        for label, value in re.findall(r'\{(\w+)="([^"]*)"\}', query):
            assert pod["metadata"]["labels"].get(label) == value, f"{query!r} selects pods the Deployment lacks"
    # The scaling target is busy threads per pod: a share of the threads each pod has.
    (busy,) = [trigger for trigger in triggers if trigger["type"] == "prometheus"]
    assert busy["metadata"]["query"].startswith("sum(rate(forkserver_thread_busy_seconds_total{")
    config = load_config(["-c", str(K8S_TOML)], {}).config
    threads_per_pod = int(env["FORKSERVER_WORKERS"]["value"]) * config.threads
    assert 0.3 <= float(busy["metadata"]["threshold"]) / threads_per_pod <= 0.9


def test_k8s_autoscaling_pods_serve_metrics_on_the_pod_address_to_the_allowed_only(tmp_path):
    pod, container, env = pod_container()
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    bind = env["FORKSERVER_STATS_BIND"]["value"]
    assert bind.startswith("$(POD_IP):"), "the endpoint belongs on the pod's own address"
    port = int(bind.rpartition(":")[2])
    ports = {entry["name"]: entry["containerPort"] for entry in container["ports"]}
    annotations = pod["metadata"]["annotations"]
    assert ports["metrics"] == port == int(annotations["prometheus.io/port"])
    assert (annotations["prometheus.io/scrape"], annotations["prometheus.io/path"]) == ("true", "/metrics")
    # The environment as the kubelet expands it, read by forkserver's own loader.
    environ = {"FORKSERVER_STATS_BIND": bind.replace("$(POD_IP)", "10.1.2.3"),
               "FORKSERVER_STATS_ALLOW_IPS": env["FORKSERVER_STATS_ALLOW_IPS"]["value"]}
    config = load_config(["-c", str(K8S_TOML)], environ).config
    assert config.stats_bind == f"10.1.2.3:{port}" and config.stats_allow_ips
    # A bind beyond loopback is refused without an allow-list; with the pod's it
    # starts, and a client not on the list (loopback here) is cut off unanswered.
    server = StatusServer("0.0.0.0:0", lambda reader: {}, allow=config.stats_allow_ips)
    try:
        with serving_in_thread(server, DEADLINE):
            with socket.create_connection(("127.0.0.1", int(server.address.rpartition(":")[2])), timeout=5) as conn:
                conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                assert read_all(conn) == b""
    finally:
        server.close()
