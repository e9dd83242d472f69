"""logconfig (fileConfig INI) and logconfig_dict (dictConfig), written as gunicorn users write them."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import requests

from harness import APPS, poll

DICT_TOML = """\
app = "basic:hello"
[logconfig_dict]
version = 1
disable_existing_loggers = false
[logconfig_dict.root]
level = "WARNING"
handlers = []
[logconfig_dict.formatters.plain]
format = "ERR %(levelname)s %(message)s"
[logconfig_dict.formatters.access]
format = "ACC %(message)s"
[logconfig_dict.handlers.error_file]
class = "logging.FileHandler"
filename = "{dir}/errors.log"
formatter = "plain"
[logconfig_dict.handlers.access_file]
class = "logging.FileHandler"
filename = "{dir}/access.log"
formatter = "access"
[logconfig_dict.loggers."gunicorn.error"]
level = "INFO"
handlers = ["error_file"]
propagate = false
[logconfig_dict.loggers."gunicorn.access"]
level = "INFO"
handlers = ["access_file"]
propagate = false
"""

INI = """\
[loggers]
keys=root, gunicorn.error, gunicorn.access

[handlers]
keys=error_file, access_file

[formatters]
keys=generic, access

[logger_root]
level=INFO
handlers=

[logger_gunicorn.error]
level=INFO
handlers=error_file
propagate=0
qualname=gunicorn.error

[logger_gunicorn.access]
level=INFO
handlers=access_file
propagate=0
qualname=gunicorn.access

[handler_error_file]
class=logging.FileHandler
formatter=generic
args=('%(here)s/errors.log', 'a')

[handler_access_file]
class=logging.FileHandler
formatter=access
args=('%(here)s/access.log', 'a')

[formatter_generic]
format=INI %(asctime)s [%(process)d] [%(levelname)s] %(message)s
datefmt=%Y-%m-%d %H:%M:%S

[formatter_access]
format=INI-ACCESS %(message)s
"""


def text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def has_access_line(path: Path, target: str, prefix: str) -> bool:
    return any(line.startswith(prefix) and f'"GET {target} HTTP/1.1" 200' in line for line in text(path).splitlines())


def test_a_dict_config_from_toml_routes_gunicorns_loggers_to_its_files(server, tmp_path):
    conf = tmp_path / "forkserver.toml"
    conf.write_text(DICT_TOML.format(dir=tmp_path))
    srv = server("-c", str(conf), "-w", "2", "--access-logfile", str(tmp_path / "native-access.log"))
    errors, access = tmp_path / "errors.log", tmp_path / "access.log"
    assert requests.get(f"{srv.url}/one").status_code == 200
    poll(lambda: "ERR INFO master started" in text(errors), what="the error log through the dict's handler")
    poll(lambda: has_access_line(access, "/one", "ACC 127.0.0.1 "), what="an access line through the dict's handler")
    assert "master started" not in srv.log(), "the configured handlers replace the error_logfile"
    assert "/one" not in text(tmp_path / "native-access.log"), "the configured access logger takes the lines"

    # logrotate: move both files away, USR1, and the handlers write to new files.
    errors.rename(tmp_path / "errors.log.1")
    access.rename(tmp_path / "access.log.1")
    srv.signal(signal.SIGUSR1)
    poll(lambda: "ERR INFO logs reopened" in text(errors), what="the master's reopened error file")
    # Every worker reopens when it next wakes: ask until a request is logged in the new file.
    poll(lambda: requests.get(f"{srv.url}/two", headers={"Connection": "close"}) and has_access_line(access, "/two", "ACC "),
         what="an access line in the new file")


def test_an_ini_file_with_gunicorn_qualnames_configures_the_logs(server, tmp_path):
    ini = tmp_path / "logging.conf"
    ini.write_text(INI)
    srv = server("basic:hello", "--logconfig", str(ini))
    assert requests.get(f"{srv.url}/ini").status_code == 200
    poll(lambda: "[INFO] master started" in text(tmp_path / "errors.log"), what="the INI's error handler")
    assert text(tmp_path / "errors.log").startswith("INI ")
    poll(lambda: has_access_line(tmp_path / "access.log", "/ini", "INI-ACCESS 127.0.0.1 "), what="the INI's access handler")
    assert "master started" not in srv.log()


def test_a_partial_dict_is_laid_over_gunicorns_defaults(server, tmp_path):
    """Only the formatter is given: as in gunicorn, errors go to stderr and access lines to stdout with it."""
    formatters = {"generic": {"format": "G %(name)s %(message)s"}}
    srv = server("basic:hello", "--logconfig-dict", json.dumps({"formatters": formatters}))
    assert requests.get(f"{srv.url}/partial").status_code == 200
    poll(lambda: "G forkserver master started" in srv.log(), what="the error logger on stderr, in the new format")
    poll(lambda: any(line.startswith("G forkserver_access 127.0.0.1 ") and "/partial" in line
                     for line in srv.stdout().splitlines()), what="the access line on stdout, in the new format")


def run_to_exit(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "forkserver", "basic:hello", "-b", "127.0.0.1:0",
                           "--pythonpath", str(APPS), *args], capture_output=True, text=True, cwd=tmp_path,
                          timeout=30)


def test_broken_configs_stop_the_start_with_one_line_and_exit_78(tmp_path):
    bad_ini = tmp_path / "bad.conf"
    bad_ini.write_text("[loggers]\nkeys=root\n")  # no [handlers], no [logger_root]
    bad_handler = json.dumps({"handlers": {"x": {"class": "no.such.Handler"}}, "root": {"handlers": ["x"]}})
    no_root = json.dumps({"handlers": {"x": {"class": "logging.StreamHandler"}}})
    cases = [
        (["--logconfig-dict", no_root], "the default root and loggers write to handlers 'console' and 'error_console'"),
        (["--logconfig", str(tmp_path / "missing.conf")], "missing.conf"),
        (["--logconfig", str(bad_ini)], "bad.conf"),
        (["--logconfig-dict", bad_handler], "logconfig_dict"),
        (["--logconfig-dict", "[1, 2]"], "must be a table"),
    ]
    for args, fragment in cases:
        result = run_to_exit(tmp_path, *args)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 78, result.stderr
        assert len(lines) == 1 and lines[0].startswith("forkserver: error: ") and fragment in lines[0], lines
