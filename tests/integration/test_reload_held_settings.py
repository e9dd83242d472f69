"""A HUP whose config file changes a setting that holds until restart: kept, said, and the rest applied.

The master keeps such a setting by copying the reloaded config with the
running value (``Config.replace``).  The server is started here without the
harness's ``-b``: a bind on the command line outranks the file's, so a
changed file could not change it.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import psutil

from harness import APPS, poll, stop_process_tree
from test_nginx import unix_health


def test_hup_keeps_a_changed_bind_and_applies_the_rest_of_the_file(tmp_path):
    first, second = tmp_path / "first.sock", tmp_path / "second.sock"
    config = tmp_path / "fs.toml"
    config.write_text(f'app = "basic:hello"\nworkers = 1\nbind = ["unix:{first}"]\n')
    error_log = tmp_path / "error.log"
    with open(error_log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "forkserver", "-c", str(config), "--pythonpath", str(APPS)],
                                stdout=subprocess.DEVNULL, stderr=err, cwd=tmp_path)
    try:
        poll(lambda: unix_health(first), timeout=15, what="the server on its first socket")
        master = psutil.Process(proc.pid)
        old = {child.pid for child in master.children()}
        config.write_text(config.read_text().replace(str(first), str(second)).replace("workers = 1", "workers = 2"))
        proc.send_signal(signal.SIGHUP)
        poll(lambda: len(new := {child.pid for child in master.children()}) == 2 and not old & new,
             timeout=30, what="two workers of the new generation")
        log = error_log.read_text()
        assert f"bind changed from unix:{first} to unix:{second}" in log, log
        assert unix_health(first), "the running listener is kept"
        assert not second.exists(), "no listener is bound on a reload"
    finally:
        stop_process_tree(proc, signal.SIGQUIT)
