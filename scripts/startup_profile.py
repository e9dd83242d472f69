#!/usr/bin/env python3
"""Where forkserver's start-up time goes, from exec to the first 200.

    python3 scripts/startup_profile.py                  # bench_apps:app, -w 2, as scripts/bench.py starts it
    python3 scripts/startup_profile.py --app mod:app -w 1
    python3 scripts/startup_profile.py --modules        # also list every module each process imported
    python3 scripts/startup_profile.py --runs 11 --no-importtime   # each step's median over 11 starts
    python3 scripts/startup_profile.py --app hello_app:app --runs 25 --against /tmp/before   # two checkouts

Like scripts/bench.py it first writes the .pyc files of forkserver's package
and of the scripts (an installed package has them; a checkout may not).

forkserver is started as scripts/bench.py starts it (on a pre-bound loopback
socket, so a client's connect succeeds at once and its answer comes when the
first worker serves), but under ``python -X importtime`` and through
scripts/startup_hook.py, which installs an audit hook and then runs
``python -m forkserver`` in the same interpreter. The hook writes one line per event to a file, with
the process's PID and the system-wide monotonic clock: every module import
(``import``: only modules not imported yet, and not those named to
``importlib.import_module``, which raises no event, though their own
imports do), every ``os.fork``, and when a process first asks the kernel
for a socket operation (``socket.__new__``/``bind``/``connect``). The
client, in this process, stamps the first 200 on the same clock. The
master's part is split where its imports change hands
(``MASTER_LANDMARKS``): the entry point with the settings, the master's and
the worker's modules, ``share_stdlib``. So the report is exact about what
was imported where and in which order (the same on every run), and its
milliseconds are one start's, which on a shared machine vary by tens of
percent: the module lists and counts are the deterministic part. Last, it
times a bare ``python -c pass`` and ``python -c 'import APP_MODULE'``: no
server of this app can answer sooner than the second.

With ``--against CHECKOUT`` it instead compares this checkout's forkserver
with another's (a directory holding a ``forkserver/`` package, e.g. a
``git worktree`` of the commit before a change), and with the pure-Python
floor (``scripts/floor_server.py``): the three take turns, start by start,
as ``python -m forkserver`` runs them (no hook, no ``-X importtime``), and
for each it prints the median and minimum of the wall time to the first
200 and of the CPU time the master and the first worker had used by then
(``/proc/PID/schedstat``). On a shared machine the wall times follow the
load; the CPU times move far less, and the turns put both checkouts under
the same load.

Every process started is stopped by its PID (SIGINT, then SIGKILL).
"""

from __future__ import annotations

import argparse
import collections
import compileall
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import compile_bytecode
from stopping import stop, tree

SCRIPTS = Path(__file__).resolve().parent
TIMEOUT = 30.0  # seconds the server gets to answer its first request
FLOOR_RUNS = 5  # starts of a bare interpreter, and of one importing the app, for comparison
IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)$")
# Where the master's steps change, as the import each step ends with: forkserver.cli's run imports
# the master's module once the settings are read, and Master.start's share_stdlib begins with
# hashlib, whose first import is _hashlib (importlib.import_module raises no audit event itself).
MASTER_LANDMARKS = (
    ("forkserver.master.process", "master: importing forkserver.cli ({count} modules) and reading the settings"),
    ("_hashlib", "master: importing the master's and the worker's modules ({count})"),
)


def first_response(port: int, proc: subprocess.Popen[bytes]) -> float:
    """Monotonic time at which the first response's status line arrived (it must be a 200)."""
    deadline = time.monotonic() + TIMEOUT
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: startup\r\nConnection: close\r\n\r\n")
        conn.settimeout(0.01)
        data = b""
        while b"\r\n" not in data:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"forkserver exited or did not answer within {TIMEOUT:.0f} s")
            try:
                chunk = conn.recv(4096)
            except TimeoutError:
                continue
            if not chunk:
                raise SystemExit("forkserver closed the first connection without answering")
            data += chunk
        stamp = time.monotonic()
    status = data.split(b" ", 2)[1]
    if status != b"200":
        raise SystemExit(f"the first response was {status.decode()}, not 200")
    return stamp


def import_times(stderr: str) -> dict[str, tuple[int, int, int]]:
    """``-X importtime``'s lines: module -> (self us, cumulative us, nesting depth)."""
    times = {}
    for line in stderr.splitlines():
        if match := IMPORT_LINE.match(line):
            self_us, cumulative, indent, name = match.groups()
            times.setdefault(name, (int(self_us), int(cumulative), (len(indent) - 1) // 2))
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--app", default="bench_apps:app", help="the app to serve (default bench_apps:app)")
    parser.add_argument("-w", "--workers", type=int, default=2, help="workers (default 2, as scripts/bench.py)")
    parser.add_argument("--modules", action="store_true", help="list every module each process imported")
    parser.add_argument("--top", type=int, default=15, help="modules shown by import time (default 15)")
    parser.add_argument("--runs", type=int, default=1,
                        help="starts to time; with more than one, each step's median is printed (default 1)")
    parser.add_argument("--no-importtime", dest="importtime", action="store_false",
                        help="run without -X importtime, which slows every import: true milliseconds, "
                             "but no per-module times")
    parser.add_argument("--against", metavar="CHECKOUT",
                        help="compare with another checkout's forkserver and the floor, --runs starts each")
    args = parser.parse_args()

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SCRIPTS), env.get("PYTHONPATH", "")]))
    compile_bytecode()  # as scripts/bench.py does: an installed package has its .pyc files
    if args.against:
        compare(args, env)
        return 0
    paths = []
    for _ in range(args.runs):
        events, times, began, answered, master = start_once(args, env)
        paths.append(first_200_path(events, began, answered, master))
    if args.runs > 1:
        print_medians(paths, args)
    report(events, times, began, answered, master, args)
    print_floor(args.app, env)
    return 0


def start_once(args: argparse.Namespace, env: dict[str, str]) -> tuple[list[list[str]], dict[str, tuple[int, int, int]],
                                                                       float, float, int]:
    """Start forkserver once, wait for its first 200, stop it; return what the hook and importtime saw."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    with listener, tempfile.TemporaryDirectory(prefix="forkserver-startup-") as tmp:
        events_path = os.path.join(tmp, "events")
        stderr_path = os.path.join(tmp, "stderr")
        cmd = [sys.executable, *(("-X", "importtime") if args.importtime else ()), str(SCRIPTS / "startup_hook.py"),
               events_path, args.app, "-w", str(args.workers), "-b", f"fd://{listener.fileno()}",
               "--log-level", "warning"]
        with open(stderr_path, "wb") as stderr:
            began = time.monotonic()
            proc = subprocess.Popen(cmd, pass_fds=[listener.fileno()], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=stderr, env=env, cwd=str(SCRIPTS))
        try:
            answered = first_response(port, proc)
        finally:
            stop(proc, tree(proc))
        events = [line.split(" ", 3) for line in Path(events_path).read_text().splitlines()]
        times = import_times(Path(stderr_path).read_text(errors="replace"))
    return events, times, began, answered, proc.pid


def compare(args: argparse.Namespace, env: dict[str, str]) -> None:
    """Start this checkout's forkserver, the other's and the floor in turns; print wall and CPU to the first 200."""
    other = Path(args.against).resolve()
    if not (other / "forkserver").is_dir():
        raise SystemExit(f"--against {other}: no forkserver/ package there")
    compileall.compile_dir(str(other / "forkserver"), quiet=1)
    forkserver = [sys.executable, "-m", "forkserver", args.app, "-w", str(args.workers), "--log-level", "warning"]
    runs = {
        # Each named first on the path: an editable install would otherwise answer for "this checkout".
        "this checkout": (forkserver, {**env, "PYTHONPATH": os.pathsep.join([str(SCRIPTS), str(SCRIPTS.parent)])}),
        str(other): (forkserver, {**env, "PYTHONPATH": os.pathsep.join([str(SCRIPTS), str(other)])}),
        "floor": ([sys.executable, str(SCRIPTS / "floor_server.py"), "{fd}", str(args.workers)], env),
    }
    samples: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    for _ in range(args.runs):
        for name, (cmd, run_env) in runs.items():
            samples[name].append(timed_start(cmd, run_env, with_bind=name != "floor"))
    print(f"{args.app} -w {args.workers}, {args.runs} starts each, taking turns: median (min) of")
    print("  the wall time from exec to the first 200, and the CPU time the master and the first worker used by then")
    for name, pairs in samples.items():
        walls, cpus = [wall for wall, _ in pairs], [cpu for _, cpu in pairs]
        print(f"  {statistics.median(walls):6.1f} ms ({min(walls):5.1f})   CPU {statistics.median(cpus):6.1f} ms "
              f"({min(cpus):5.1f})   {name}")


def timed_start(cmd: list[str], env: dict[str, str], *, with_bind: bool) -> tuple[float, float]:
    """Start ``cmd`` on a pre-bound listener, wait for its first 200, stop it: (wall ms, CPU ms of it and its first child)."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    with listener:
        fd = str(listener.fileno())
        argv = [arg.replace("{fd}", fd) for arg in cmd] + (["-b", f"fd://{fd}"] if with_bind else [])
        began = time.monotonic()
        proc = subprocess.Popen(argv, pass_fds=[listener.fileno()], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=str(SCRIPTS))
        try:
            answered = first_response(listener.getsockname()[1], proc)
            cpu = sum(cpu_ns(pid) for pid in [proc.pid, *first_child(proc.pid)]) / 1e6
        finally:
            stop(proc, tree(proc))
    return (answered - began) * 1000, cpu


def first_child(pid: int) -> list[int]:
    """The first child ``pid`` forked (the first worker), as a one-item list; empty if none yet."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(children[0])] if children else []


def cpu_ns(pid: int) -> int:
    """Nanoseconds ``pid`` has run on a CPU (the first field of ``/proc/PID/schedstat``)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def print_medians(paths: list[list[tuple[str, float, float]]], args: argparse.Namespace) -> None:
    """Each step's median (and range) over the runs; steps are matched by their place on the path."""
    print(f"the path to the first 200, median (min-max) of {len(paths)} starts"
          f"{' under -X importtime' if args.importtime else ''}:")
    for index, (what, _, _) in enumerate(paths[-1]):
        spans = [(path[index][2] - path[index][1]) * 1000 for path in paths if len(path) > index]
        print(f"  {statistics.median(spans):7.1f} ms ({min(spans):.1f}-{max(spans):.1f})  {what}")
    totals = [(path[-1][2] - path[0][1]) * 1000 for path in paths]
    print(f"  {statistics.median(totals):7.1f} ms ({min(totals):.1f}-{max(totals):.1f})  exec to the first 200\n")


def print_floor(app: str, env: dict[str, str]) -> None:
    """What any server of this app pays before it can answer: starting Python, and importing the app."""
    module = app.partition(":")[0]

    def wall_ms(code: str) -> float:
        """Median ms from exec to the end of ``code``, stamped by the child on the system-wide clock.

        Timing the child's exit from here would add the wait's polling:
        ``subprocess.run`` with a timeout sleeps 0.5, 1, 2 ... 50 ms between
        looks, which made a 33 ms ``python -c pass`` read 64 ms.
        """
        samples = []
        for _ in range(FLOOR_RUNS):
            began = time.monotonic()
            done = subprocess.run([sys.executable, "-c", f"{code}; import time; print(time.monotonic())"], check=True,
                                  env=env, cwd=str(SCRIPTS), timeout=60, capture_output=True, text=True)
            samples.append((float(done.stdout.split()[-1]) - began) * 1000)
        return statistics.median(samples)

    bare = wall_ms("pass")
    loaded = wall_ms(f"import {module}")
    print(f"for comparison (median of {FLOOR_RUNS} runs each, from exec to the end of the code): python -c pass "
          f"{bare:.0f} ms; python -c 'import {module}' {loaded:.0f} ms, so importing the app in a fresh "
          f"interpreter costs {loaded - bare:.0f} ms")


def events_by_pid(events: list[list[str]]) -> dict[int, list[tuple[float, str, str]]]:
    """The hook's lines per process, in order; a module counted once."""
    by_pid: dict[int, list[tuple[float, str, str]]] = collections.defaultdict(list)
    for stamp, pid, event, name in events:
        if event == "import" and any(e == "import" and n == name for _, e, n in by_pid[int(pid)]):
            continue  # an extension module raises the event twice (finding, then loading)
        by_pid[int(pid)].append((float(stamp), event, name))
    return by_pid


def first_200_path(events: list[list[str]], began: float, answered: float,
                   master: int) -> list[tuple[str, float, float]]:
    """(step, start, end) from exec to the first 200: the master until its first fork, then the first worker."""
    by_pid = events_by_pid(events)
    mine = by_pid.get(master, [])
    fork = next((stamp for stamp, event, _ in mine if event == "os.fork"), None)
    workers = [items for pid, items in by_pid.items() if pid != master]
    if not (mine and fork is not None and workers):
        return [("exec to the first 200", began, answered)]
    first = min(workers, key=lambda items: items[0][0])
    master_imports = [(stamp, name) for stamp, event, name in mine if event == "import" and stamp < fork]
    worker_imports = [stamp for stamp, event, _ in first if event == "import"]
    accept = next((stamp for stamp, event, _ in first if event.startswith("socket.")), None)
    steps = [("interpreter start-up, before the hook (python itself, site)", began, mine[0][0])]
    start = mine[0][0]
    for landmark, what in MASTER_LANDMARKS:
        stamp = next((stamp for stamp, name in master_imports if name == landmark), None)
        if stamp is not None:
            count = sum(1 for s, _ in master_imports if start <= s < stamp)
            steps.append((what.format(count=count), start, stamp))
            start = stamp
    if master_imports:
        count = sum(1 for s, _ in master_imports if s >= start)
        what = ("share_stdlib" if len(steps) == len(MASTER_LANDMARKS) + 1 else "imports") + f" ({count} modules)"
        steps.append((f"master: {what} and set-up until its last import", start, master_imports[-1][0]))
    steps.append(("master: from its last import to the first fork", steps[-1][2], fork))
    steps.append(("worker: from the fork to its first import" if worker_imports else
                  "worker: from the fork to its first event", fork, first[0][0]))
    if worker_imports:
        steps.append((f"worker: importing the app ({len(worker_imports)} modules)", first[0][0], worker_imports[-1]))
    if accept is not None:
        steps.append(("worker: from the app's import to its first socket call (the accept)", steps[-1][2], accept))
        steps.append(("the first request: accept to the client's first 200", accept, answered))
    return steps


def report(events: list[list[str]], times: dict[str, tuple[int, int, int]], began: float, answered: float,
           master: int, args: argparse.Namespace) -> None:
    def ms(stamp: float) -> str:
        return f"{(stamp - began) * 1000:7.1f} ms"

    by_pid = events_by_pid(events)
    print(f"forkserver {args.app} -w {args.workers}: first 200 {ms(answered).strip()} after exec\n")
    print("every process (ms after exec; the audit hook starts once the interpreter has started):")
    for pid, items in sorted(by_pid.items(), key=lambda kv: kv[1][0][0]):
        role = "master" if pid == master else "worker"
        imports = [(stamp, name) for stamp, event, name in items if event == "import"]
        forks = [stamp for stamp, event, _ in items if event == "os.fork"]
        first_socket = next((stamp for stamp, event, _ in items if event.startswith("socket.")), None)
        print(f"  {role} {pid}: first event {ms(items[0][0])}, {len(imports)} modules imported"
              + (f" ({ms(imports[0][0]).strip()} to {ms(imports[-1][0]).strip()})" if imports else "")
              + (f", forks at {', '.join(ms(s).strip() for s in forks)}" if forks else "")
              + (f", first socket call {ms(first_socket).strip()}" if first_socket else ""))
    print(f"  client: first 200 at {ms(answered)}\n")

    if len(path := first_200_path(events, began, answered, master)) > 1:
        print("the path to the first 200:")
        for what, start, end in path:
            print(f"  {(end - start) * 1000:7.1f} ms  {what}")
        print()

    for pid, items in sorted(by_pid.items(), key=lambda kv: kv[1][0][0]):
        role = "master" if pid == master else "worker"
        names = [name for _, event, name in items if event == "import"]
        if not names:
            continue
        packages = collections.Counter(name.split(".")[0] for name in names)
        own = {package: sum(times.get(n, (0, 0, 0))[0] for n in names if n.split(".")[0] == package)
               for package in packages}
        if not times:  # --no-importtime: counts only
            print(f"{role} {pid}: {len(names)} modules; by top-level package: "
                  + ", ".join(f"{package} {count}" for package, count in packages.most_common(args.top)))
        else:
            total = sum(own.values())
            print(f"{role} {pid}: {len(names)} modules, {total / 1000:.1f} ms of import time (self, under "
                  "-X importtime); by top-level package:")
            for package, us in sorted(own.items(), key=lambda kv: -kv[1])[:args.top]:
                print(f"  {us / 1000:6.1f} ms  {packages[package]:3d} modules  {package}")
            print(f"  the {args.top} slowest modules (self time):")
            for name in sorted(names, key=lambda n: -times.get(n, (0, 0, 0))[0])[:args.top]:
                print(f"  {times.get(name, (0, 0, 0))[0] / 1000:6.1f} ms  {name}")
        if args.modules:
            print("  every module, in import order: " + " ".join(names))
        print()


if __name__ == "__main__":
    sys.exit(main())
