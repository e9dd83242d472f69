"""The settings schema and its merge: default < TOML file < FORKSERVER_* env < CLI.

Every error a user can make in a setting must come back as one ConfigError
line that names where the value came from (file, env var or flag), the key,
and what was expected.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from forkserver.config import (
    AUTO_WORKERS,
    DEFAULT_ACCESS_LOG_FORMAT,
    Config,
    cli_flag,
    default_of,
    env_name,
    settings,
)
from forkserver.errors import EXIT_CONFIG, ConfigError
from forkserver.sources import load_config, render_toml

ROOT = Path(__file__).resolve().parents[2]
REFERENCE_CONF = ROOT / "conf" / "forkserver.toml"


@pytest.fixture
def toml(tmp_path):
    """Return ``write(text)``: writes a TOML file and returns its path as a string."""

    def write(text: str) -> str:
        path = tmp_path / "forkserver.toml"
        path.write_text(text)
        return str(path)

    return write


def load(*argv: str, env: dict[str, str] | None = None) -> Config:
    return load_config(list(argv), env or {}).config


def config_error(*argv: str, env: dict[str, str] | None = None) -> str:
    """Load a config that must fail; return the error's message, checked to be one line."""
    with pytest.raises(ConfigError) as info:
        load(*argv, env=env)
    message = str(info.value)
    assert message.strip() and "\n" not in message, f"not one line: {message!r}"
    assert info.value.exit_code == EXIT_CONFIG
    return message


def assert_mentions(message: str, *fragments: str) -> None:
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


# -- defaults and precedence ----------------------------------------------------


def test_defaults_come_from_the_schema_with_default_provenance():
    config = load()
    assert config.workers == AUTO_WORKERS
    assert config.bind == ("127.0.0.1:8000",)
    assert config.timeout == 30.0
    assert config.access_logformat == DEFAULT_ACCESS_LOG_FORMAT
    assert config.preload is False
    for f in settings():
        assert config.source_of(f.name) == "default"


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        load().workers = 3  # type: ignore[misc]


# name, TOML line, env value, CLI args, (file value, env value, CLI value)
PRECEDENCE = [
    ("workers", "workers = 3", "5", ["-w", "7"], (3, 5, 7)),
    ("timeout", "timeout = 12.5", "20", ["--timeout", "40"], (12.5, 20.0, 40.0)),
    ("log_level", 'log_level = "debug"', "warning", ["--log-level", "error"], ("debug", "warning", "error")),
    ("preload", "preload = true", "false", ["--preload"], (True, False, True)),
    ("bind", 'bind = ["127.0.0.1:1"]', "127.0.0.1:2", ["-b", "127.0.0.1:3"],
     (("127.0.0.1:1",), ("127.0.0.1:2",), ("127.0.0.1:3",))),
]


@pytest.mark.parametrize("name, line, env_value, cli, expected", PRECEDENCE, ids=[c[0] for c in PRECEDENCE])
def test_cli_beats_env_beats_file_beats_default(toml, name, line, env_value, cli, expected):
    path = toml(line + "\n")
    env = {env_name(name): env_value}
    from_file, from_env, from_cli = expected
    default = default_of(next(f for f in settings() if f.name == name))

    assert getattr(load(), name) == default

    config = load("-c", path)
    assert getattr(config, name) == from_file
    assert config.source_of(name) == path

    config = load("-c", path, env=env)
    assert getattr(config, name) == from_env
    assert config.source_of(name) == f"environment {env_name(name)}"

    config = load("-c", path, *cli, env=env)
    assert getattr(config, name) == from_cli
    assert config.source_of(name) == f"command line {cli_flag(name)}"

    config = load(*cli)  # the CLI alone, too
    assert getattr(config, name) == from_cli


def test_each_setting_keeps_its_own_provenance(toml):
    path = toml('app = "basic:hello"\nworkers = 3\nthreads = 2\n')
    config = load("-c", path, "--threads", "4", env={"FORKSERVER_WORKERS": "5"})
    assert (config.app, config.workers, config.threads) == ("basic:hello", 5, 4)
    assert config.source_of("app") == path
    assert config.source_of("workers") == "environment FORKSERVER_WORKERS"
    assert config.source_of("threads") == "command line --threads"
    assert config.source_of("backlog") == "default"


def test_positional_app_comes_from_the_command_line(toml):
    config = load("-c", toml('app = "from.file:app"\n'), "from.cli:app", env={"FORKSERVER_APP": "from.env:app"})
    assert config.app == "from.cli:app"
    assert config.source_of("app") == "command line"


def test_config_file_from_env_and_c_flag_wins(tmp_path):
    env_file, flag_file = tmp_path / "env.toml", tmp_path / "flag.toml"
    env_file.write_text("workers = 3\n")
    flag_file.write_text("workers = 4\n")
    env = {"FORKSERVER_CONFIG": str(env_file)}
    assert load(env=env).workers == 3
    invocation = load_config(["-c", str(flag_file)], env)
    assert invocation.config.workers == 4
    assert invocation.config_path == str(flag_file)


# -- list and bool settings -----------------------------------------------------


@pytest.mark.parametrize("name", ["bind", "pythonpath"])
def test_list_settings_accept_toml_string_or_array_and_comma_separated_env(toml, name):
    assert getattr(load("-c", toml(f'{name} = "/one"\n')), name) == ("/one",)
    assert getattr(load("-c", toml(f'{name} = ["/one", "/two"]\n')), name) == ("/one", "/two")
    assert getattr(load(env={env_name(name): "/one, /two,/three"}), name) == ("/one", "/two", "/three")


def test_repeated_bind_flag_collects_every_address_and_replaces_lower_layers():
    config = load("-b", "127.0.0.1:1", "--bind", "unix:/tmp/a.sock", "-b", "fd://3",
                  env={"FORKSERVER_BIND": "127.0.0.1:9"})
    assert config.bind == ("127.0.0.1:1", "unix:/tmp/a.sock", "fd://3")


def test_repeated_pythonpath_flag_may_also_hold_commas():
    assert load("--pythonpath", "/a,/b", "--pythonpath", "/c").pythonpath == ("/a", "/b", "/c")


@pytest.mark.parametrize("text, expected", [
    ("true", True), ("TRUE", True), ("1", True), ("yes", True), ("on", True),
    ("false", False), ("0", False), ("no", False), ("Off", False),
])
def test_bool_from_env(text, expected):
    config = load(env={"FORKSERVER_PRELOAD": text})
    assert config.preload is expected
    assert config.source_of("preload") == "environment FORKSERVER_PRELOAD"


def test_bool_flags_turn_on_and_off_over_env():
    assert load("--preload").preload is True
    assert load("--no-preload", env={"FORKSERVER_PRELOAD": "true"}).preload is False
    assert load("-D").daemon is True


def test_numbers_from_text_and_ints_for_floats(toml):
    assert load("-c", toml("timeout = 5\n")).timeout == 5.0  # a TOML int is fine for a float
    assert load(env={"FORKSERVER_KEEPALIVE": " 2.5 "}).keepalive == 2.5
    assert load("--limit-request-body", "1024").limit_request_body == 1024


@pytest.mark.parametrize("fmt", ["json", "%(h)s %(r)s %(s)s", "%(h)s %({x-forwarded-for}i)s %({content-type}o)s"])
def test_good_access_log_formats(fmt):
    assert load("--access-logformat", fmt).access_logformat == fmt


@pytest.mark.parametrize("mask", ["022", "0", "777", "0o027"])
def test_good_umasks(mask):
    assert load("--umask", mask).umask == mask


# -- error paths: one line naming where, the key and what was expected -----------


def test_unknown_toml_key_with_did_you_mean(toml):
    path = toml("wrokers = 2\n")
    message = config_error("-c", path)
    assert_mentions(message, path, "wrokers", "unknown setting", "did you mean 'workers'")


def test_unknown_toml_key_without_a_close_match(toml):
    path = toml('[xyzzy]\nport = 80\n')
    assert_mentions(config_error("-c", path), path, "unknown setting 'xyzzy'", "forkserver --help lists the settings")


def test_unknown_env_var_with_did_you_mean():
    message = config_error(env={"FORKSERVER_WROKERS": "2"})
    assert_mentions(message, "environment FORKSERVER_WROKERS", "unknown setting 'wrokers'", "did you mean 'workers'")


def test_env_vars_without_the_prefix_are_ignored():
    assert load(env={"WORKERS": "x", "FORKSERVER": "1"}).workers == load().workers


def test_unknown_cli_flag_with_did_you_mean():
    assert_mentions(config_error("--wrkers", "3"), "command line", "'--wrkers'", "did you mean '--workers'")


def test_cli_flag_missing_its_value():
    assert_mentions(config_error("-w"), "command line", "-w/--workers", "expected one argument")


def test_second_positional_is_an_error():
    assert_mentions(config_error("a:app", "b:app"), "command line", "'b:app'")


TYPE_ERRORS = [
    # (TOML text | None, env | None, argv, fragments)
    ('workers = "4"', None, [], ["workers", "must be an integer", "'4'"]),
    ("workers = true", None, [], ["workers", "must be an integer", "True"]),
    ("workers = 2.5", None, [], ["workers", "must be an integer"]),
    ("preload = 1", None, [], ["preload", "must be true or false", "1"]),
    ('preload = "true"', None, [], ["preload", "must be true or false"]),
    ('timeout = "30"', None, [], ["timeout", "must be a number"]),
    ("timeout = nan", None, [], ["timeout", "must be a number"]),
    ("log_level = 3", None, [], ["log_level", "must be a string"]),
    ("bind = [8000]", None, [], ["bind", "must be a string or a list of strings"]),
    (None, {"FORKSERVER_WORKERS": "four"}, [], ["environment FORKSERVER_WORKERS", "workers", "an integer", "'four'"]),
    (None, {"FORKSERVER_WORKERS": "2.5"}, [], ["environment FORKSERVER_WORKERS", "an integer"]),
    (None, {"FORKSERVER_PRELOAD": "maybe"}, [], ["environment FORKSERVER_PRELOAD", "true or false", "'maybe'"]),
    (None, {"FORKSERVER_PRELOAD": ""}, [], ["environment FORKSERVER_PRELOAD", "true or false"]),
    (None, None, ["--threads", "many"], ["command line --threads", "threads", "an integer", "'many'"]),
    (None, None, ["--timeout", "soon"], ["command line --timeout", "a number", "'soon'"]),
    (None, None, ["--keepalive", "inf"], ["command line --keepalive", "a number"]),
]


def case_id(text: str | None, env: dict[str, str] | None, argv: list[str], fragments: list[str]) -> str:
    if text is not None:
        return f"toml[{text}]"
    if env:
        return "env[" + " ".join(f"{k}={v}" for k, v in env.items()) + "]"
    return "cli[" + " ".join(argv) + "]"


@pytest.mark.parametrize("text, env, argv, fragments", TYPE_ERRORS, ids=[case_id(*c) for c in TYPE_ERRORS])
def test_wrong_type(toml, text, env, argv, fragments):
    args = list(argv)
    if text is not None:
        path = toml(text + "\n")
        args = ["-c", path, *args]
        fragments = [path, *fragments]
    assert_mentions(config_error(*args, env=env), *fragments)


RANGE_ERRORS = [
    ("workers = 0", None, [], ["workers", "at least 1", "0"]),
    (None, {"FORKSERVER_WORKERS": "-2"}, [], ["environment FORKSERVER_WORKERS", "at least 1", "-2"]),
    (None, None, ["-w", "0"], ["command line --workers", "at least 1"]),
    ("timeout = -1", None, [], ["timeout", "at least 0", "-1"]),
    (None, {"FORKSERVER_GRACEFUL_TIMEOUT": "-0.5"}, [], ["environment FORKSERVER_GRACEFUL_TIMEOUT", "at least 0"]),
    (None, None, ["--timeout", "-1"], ["command line --timeout", "timeout must be at least 0"]),
    (None, None, ["--header-timeout", "0"], ["command line --header-timeout", "at least 0.1"]),
    (None, None, ["--backlog", "0"], ["command line --backlog", "at least 1"]),
    (None, None, ["--limit-request-body", "-1"], ["command line --limit-request-body", "at least 0"]),
    ("bind = []", None, [], ["bind", "at least one address"]),
    (None, {"FORKSERVER_BIND": " , "}, [], ["environment FORKSERVER_BIND", "at least one address"]),
    (None, None, ["--bind="], ["command line --bind", "at least one address"]),
]


@pytest.mark.parametrize("text, env, argv, fragments", RANGE_ERRORS, ids=[case_id(*c) for c in RANGE_ERRORS])
def test_out_of_range(toml, text, env, argv, fragments):
    args = list(argv)
    if text is not None:
        path = toml(text + "\n")
        args = ["-c", path, *args]
        fragments = [path, *fragments]
    assert_mentions(config_error(*args, env=env), *fragments)


def test_bad_choice_lists_the_choices(toml):
    path = toml('log_level = "loud"\n')
    assert_mentions(config_error("-c", path), path, "log_level", "one of debug, info, warning, error, critical",
                    "'loud'")
    assert_mentions(config_error("--log-level", "LOUD"), "command line --log-level", "one of debug")


@pytest.mark.parametrize("given, level", [("INFO", "info"), ("Info", "info"), ("info", "info"),
                                          ("WARN", "warning"), ("fatal", "critical")])
def test_log_level_in_any_case_as_gunicorn_reads_it(given, level):
    assert load("--log-level", given).log_level == level


@pytest.mark.parametrize("name, value", [
    ("umask", "9"), ("umask", "abc"), ("umask", "1000"), ("umask", "-1"),
    ("unix_socket_mode", "888"), ("unix_socket_mode", ""),
])
def test_bad_octal(name, value):
    message = config_error(env={env_name(name): value})
    assert_mentions(message, f"environment {env_name(name)}", name, "an octal number", repr(value))


def test_empty_umask_keeps_the_inherited_one():
    assert load("--umask", "").umask == ""


@pytest.mark.parametrize("fmt, fragments", [
    ("%(h)s %(zz)s", ["'zz' is not one", "known atoms"]),
    ("%(h)s %", ["a valid %-format"]),
])
def test_bad_access_log_format(fmt, fragments):
    message = config_error("--access-logformat", fmt)
    assert_mentions(message, "command line --access-logformat", "access_logformat", *fragments)


def test_bad_access_log_format_in_file(toml):
    path = toml("access_logformat = '%(nope)s'\n")
    assert_mentions(config_error("-c", path), path, "access_logformat", "'nope' is not one")


def test_toml_syntax_error(toml):
    path = toml("workers = \n")
    assert_mentions(config_error("-c", path), path, "invalid TOML", "line 1")


def test_missing_config_file(tmp_path):
    path = str(tmp_path / "nope.toml")
    assert_mentions(config_error("-c", path), path, "config file not found")
    assert_mentions(config_error(env={"FORKSERVER_CONFIG": path}), path, "config file not found")


def test_config_path_that_is_a_directory(tmp_path):
    assert_mentions(config_error("-c", str(tmp_path)), str(tmp_path), "cannot read config file")


# -- the reference config and the option table of docs/options.md ----------------------


def test_reference_config_lists_every_setting_and_nothing_else():
    text = REFERENCE_CONF.read_text()
    keys = set(tomllib.loads(text))
    commented = set(re.findall(r"^#\s*([a-z_]+)\s*=", text, re.MULTILINE))
    schema = {f.name for f in settings()}
    assert not (keys | commented) - schema, "keys that are not settings"
    assert not schema - (keys | commented), "settings missing from conf/forkserver.toml"
    assert not keys & commented, "settings both set and commented out"


def test_reference_config_commented_values_are_the_defaults():
    """``# key = value`` lines claim to show the default; they must parse to it."""
    text = REFERENCE_CONF.read_text()
    defaults = {f.name: default_of(f) for f in settings()}
    for line in re.findall(r"^#\s*([a-z_]+\s*=.*)$", text, re.MULTILINE):
        ((key, value),) = tomllib.loads(line).items()
        if key == "workers":
            continue  # its default depends on the machine
        expected = defaults[key]
        assert (tuple(value) if isinstance(value, list) else value) == expected, line


def test_reference_config_loads():
    invocation = load_config(["-c", str(REFERENCE_CONF)], {})
    config = invocation.config
    assert config.app == "forkserver.demo:application"
    assert config.workers == 2
    assert config.source_of("workers") == str(REFERENCE_CONF)


def test_documented_option_table_is_up_to_date():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_options.py"), "--check"],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(("toml_text", "env", "argv"), [
    ('workers = "auto"\n', None, []),
    ("", "AUTO", []),
    ("", None, ["-w", "Auto"]),
])
def test_workers_auto_is_a_word_in_every_source(toml, toml_text, env, argv):
    args = list(argv)
    if toml_text:
        args += ["-c", toml(toml_text)]
    assert load(*args, env={"FORKSERVER_WORKERS": env} if env else None).workers == AUTO_WORKERS


def test_workers_names_auto_when_the_value_is_wrong():
    assert "workers must be an integer or auto, got 'many'" in config_error("-w", "many")


def test_print_config_writes_workers_auto_as_the_word_it_reads_back(tmp_path):
    text = render_toml(load("basic:hello", "-w", "auto"))
    assert 'workers = "auto"  # from command line --workers' in text.splitlines()
    path = tmp_path / "printed.toml"
    path.write_text(text)
    assert load("-c", str(path)).workers == AUTO_WORKERS


def test_trusted_proxies_get_a_keepalive_above_the_proxies_own_unless_keepalive_is_set(tmp_path):
    # nginx's upstream keepalive_timeout and AWS ALB's idle timeout are 60 s:
    # a proxy's idle connection must outlive them, so the proxy closes it first.
    assert load().keepalive == 5.0 and load().proxy_keepalive == 75.0 > 60.0
    assert load("--keepalive", "3").proxy_keepalive == 3.0  # set on the command line: it wins
    assert load(env={"FORKSERVER_KEEPALIVE": "620"}).proxy_keepalive == 620.0
    assert load("--keepalive", "0").proxy_keepalive == 0.0  # keep-alive off is off for proxies too
    config_file = tmp_path / "f.toml"
    config_file.write_text('keepalive = 5.0\n')
    assert load("-c", str(config_file)).proxy_keepalive == 5.0  # set to the default value: still set
    assert load("--shutdown-delay", "4").shutdown_delay == 4.0 and load().shutdown_delay == 0.0
