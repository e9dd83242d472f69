"""gunicorn's logging settings: read from every source, and translated to forkserver's logger names."""

from __future__ import annotations

import pytest

from forkserver.sources import load_config
from forkserver.errors import ConfigError
from forkserver.logconfig import effective_dict, one_line, read_ini


def test_logconfig_dict_is_a_toml_table_or_json_text(tmp_path):
    conf = tmp_path / "f.toml"
    conf.write_text('[logconfig_dict]\nversion = 1\n[logconfig_dict.loggers."gunicorn.error"]\nlevel = "DEBUG"\n')
    from_file = load_config(["-c", str(conf)], {}).config
    assert from_file.logconfig_dict == {"version": 1, "loggers": {"gunicorn.error": {"level": "DEBUG"}}}
    from_env = load_config([], {"FORKSERVER_LOGCONFIG_DICT": '{"version": 1}'}).config
    assert from_env.logconfig_dict == {"version": 1}
    assert from_env.source_of("logconfig_dict") == "environment FORKSERVER_LOGCONFIG_DICT"
    assert load_config([], {}).config.logconfig_dict == {}


@pytest.mark.parametrize("argv, fragment", [
    (["--logconfig-dict", "{not json"], "logconfig_dict must be a table"),
    (["--logconfig-dict", '"text"'], "logconfig_dict must be a table"),
    (["--statsd-host", "localhost:port"], "statsd_host must be empty, HOST:PORT"),
    (["--statsd-prefix", "my app"], "statsd_prefix must be printable ASCII"),
    (["--capture-output=maybe"], "capture-output"),
])
def test_bad_values_are_named(argv, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(argv, {})


def test_gunicorn_logger_names_become_ours_and_the_defaults_fill_in():
    merged = effective_dict({"loggers": {"gunicorn.error": {"level": "DEBUG"}, "gunicorn.access": {},
                                         "myapp": {"level": "INFO"}}})
    assert set(merged["loggers"]) == {"forkserver", "forkserver_access", "myapp"}
    assert merged["loggers"]["forkserver"] == {"level": "DEBUG"}, "a given 'loggers' replaces the defaults whole"
    assert merged["root"] == {"level": "INFO", "handlers": ["console"]}
    assert merged["disable_existing_loggers"] is False


def test_the_given_dict_is_not_changed():
    given = {"loggers": {"gunicorn.error": {"level": "DEBUG"}}}
    effective_dict(given)
    assert given == {"loggers": {"gunicorn.error": {"level": "DEBUG"}}}


def test_ini_qualnames_are_translated_and_here_is_the_files_directory(tmp_path):
    ini = tmp_path / "logging.conf"
    ini.write_text("[logger_gunicorn.error]\nqualname=gunicorn.error\n[logger_app]\nqualname=app\n"
                   "[handler_file]\nargs=('%(here)s/x.log',)\n")
    parser = read_ini(str(ini))
    assert parser.get("logger_gunicorn.error", "qualname") == "forkserver"
    assert parser.get("logger_app", "qualname") == "app"
    assert parser.get("handler_file", "args") == f"('{tmp_path}/x.log',)"


def test_an_ini_that_is_not_ini_is_one_line(tmp_path):
    ini = tmp_path / "logging.conf"
    ini.write_text("keys=root\n")
    with pytest.raises(ConfigError, match="logconfig") as info:
        read_ini(str(ini))
    assert "\n" not in str(info.value)


def test_a_chain_of_causes_is_one_line_without_repeats():
    try:
        try:
            raise ModuleNotFoundError("No module named 'no'")
        except ImportError as exc:
            raise ValueError("Cannot resolve 'no.Handler':\n No module named 'no'") from exc
    except ValueError as exc:
        assert one_line(exc) == "ValueError: Cannot resolve 'no.Handler': No module named 'no'"
