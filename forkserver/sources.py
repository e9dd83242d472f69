"""Where settings come from: defaults, config files (TOML or gunicorn's Python), environment, command line.

``load_config`` reads every source, in gunicorn's precedence where gunicorn
has one, turns each raw value into a setting through the schema
(``forkserver.config``), and collects every problem before it raises, so
one run reports them all, one per line.  ``render_toml`` writes the result
back out with where each value came from (``--print-config``).
This module never prints and never exits; it raises ``ConfigError``.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from . import gunicorn
from .config import (
    ENV_PREFIX,
    Config,
    cli_flag,
    coerce,
    combination_problems,
    default_of,
    env_name,
    is_word,
    setting_field,
    setting_types,
    settings,
    validate,
)
from .errors import ConfigError


def toml_value(value: Any) -> str:
    """Write a setting's value as TOML (JSON's string escapes are TOML's too)."""
    import json  # deferred: only --print-config writes TOML
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items()) + " }"
    return "[" + ", ".join(toml_value(item) for item in value) + "]"


def render_toml(config: Config) -> str:
    """The effective settings as a TOML config file, each line saying where its value came from.

    Defaults are commented out, so the file pins only what was chosen; hook
    functions from a gunicorn config file, which TOML cannot hold, are named
    in comments with what to do instead.
    """
    lines = ["# forkserver's effective settings, usable as a config file: forkserver -c FILE",
             "# Each line says where its value came from; commented lines are defaults."]
    lines += [f"# warning: {line}" for line in config.warnings] + [f"# note: {line}" for line in config.notices]
    for f in settings():
        source = config.source_of(f.name)
        if f.name in config.gunicorn_hooks:
            lines.append(f"# {f.name}: a function in {source}; to keep it here, move it into a module and set "
                         f"{f.name} = \"module:function\" (it then gets one HookContext argument)")
            continue
        value = getattr(config, f.name)
        if value is None:
            continue
        # A value a word stands for is written as the word (workers = "auto"), which reads back.
        word = next((w for w, v in f.metadata["words"].items() if v == value and type(v) is type(value)), None)
        text = f"{f.name} = {toml_value(value if word is None else word)}"
        lines.append(f"# {text}" if source == "default" else f"{text}  # from {source}")
    lines += [f"# {name}: a gunicorn hook function in the config file; TOML has no equivalent, "
              "so keep the gunicorn config file for it"
              for name in config.gunicorn_hooks if name not in _setting_names()]
    return "\n".join(lines) + "\n"


@functools.cache
def _setting_names() -> frozenset[str]:
    return frozenset(f.name for f in settings())


def _unknown(key: str, where: str) -> str:
    """The problem line for a key that names no setting, with the right hint."""
    gunicorn_name = gunicorn.BY_NAME.get(key)
    if gunicorn_name is not None and gunicorn_name.native in _setting_names():
        return f"{where}: unknown setting '{key}' (that is gunicorn's name; forkserver's is '{gunicorn_name.native}')"
    close = _closest(key, sorted(_setting_names()))
    hint = f" (did you mean '{close}'?)" if close else " (forkserver --help lists the settings)"
    return f"{where}: unknown setting '{key}'{hint}"


def _closest(word: str, choices: list[str], cutoff: float = 0.6) -> str:
    """The choice most like ``word``, or ''.

    Only a mistyped name needs it, so difflib (and heapq with it) is imported
    here, on that error path, not by every start.
    """
    import difflib

    close = difflib.get_close_matches(word, choices, n=1, cutoff=cutoff)
    return close[0] if close else ""


def _text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as fh:
        return fh.read()


def read_toml(path: str) -> tuple[dict[str, Any], list[str]]:
    """Read a TOML config file into raw values, and a problem line for each unknown key.

    Raises:
        ConfigError: the file cannot be read or parsed.
    """
    # Deferred: most starts have no config file, and the parser takes milliseconds to import.
    import tomllib

    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        hint = "; a gunicorn config file must be named *.py" if re.search(r"^\s*(import|def) ", _text(path), re.M) else ""
        raise ConfigError(f"{path}: invalid TOML: {exc}{hint}") from None
    known = _setting_names()
    problems = [_unknown(key, path) for key in data if key not in known]
    return {key: value for key, value in data.items() if key in known}, problems


def read_env(environ: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """Collect ``FORKSERVER_<NAME>`` variables, and a problem line for each that names no setting."""
    known = _setting_names()
    found, problems = {}, []
    for var, value in environ.items():
        if not var.startswith(ENV_PREFIX) or var == ENV_PREFIX + "CONFIG":
            continue
        key = var[len(ENV_PREFIX) :].lower()
        if key in known:
            found[key] = value
        else:
            problems.append(_unknown(key, f"environment {var}"))
    return found, problems


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of printing usage and exiting."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)


ACTION_FLAGS = ("-c", "--config", "--check-config", "--print-config", "--version", "-v", "-h", "--help")


GUNICORN_DEST = "gunicorn:"


@functools.cache
def _native_flags() -> frozenset[str]:
    """Every spelling forkserver's own flags have; computed once, as the parser is built per load."""
    flags = set(ACTION_FLAGS)
    for f in settings():
        flags.update([*f.metadata["flags"], cli_flag(f.name)])
        if setting_types()[f.name] is bool:
            flags.add("--no-" + f.name.replace("_", "-"))
    return frozenset(flags)


def gunicorn_only_flags(spec: gunicorn.GunicornSetting) -> list[str]:
    """The spellings of a gunicorn setting that forkserver's own flags do not already have."""
    native = _native_flags()
    return [flag for flag in spec.flags if flag not in native]


def _gunicorn_help(spec: gunicorn.GunicornSetting) -> str:
    if spec.disposition() == "native":
        return f"gunicorn's spelling of {cli_flag(spec.native)}."
    return f"Refused: {spec.reason()}."


def build_arg_parser() -> argparse.ArgumentParser:
    """Build the CLI from the schema and gunicorn's spellings; flags left out are absent from the namespace."""
    parser = _ArgumentParser(
        prog="forkserver",
        description="Serve a WSGI application from a supervised pool of pre-forked workers. "
        "gunicorn's command lines, gunicorn.conf.py files and GUNICORN_CMD_ARGS, PORT and "
        "WEB_CONCURRENCY work too.",
        epilog="Other commands: 'forkserver stats ADDR' prints one snapshot of a running server's "
        "stats (its --stats-bind address); 'forkserver top ADDR' shows its workers live.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("-c", "--config", metavar="FILE",
                        help="Read settings from this TOML file, or from a gunicorn config file (*.py).")
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="Validate the settings and import the app, then exit: 0 if all is well.",
    )
    parser.add_argument("--print-config", action="store_true",
                        help="Print the effective settings as a TOML config file, each with where it came "
                        "from, then exit.")
    parser.add_argument("-v", "--version", action="store_true", help="Print the version and exit.")
    kinds = setting_types()
    # In a group of their own, the settings are also spared the help
    # formatter argparse builds to check each option added to the parser
    # itself (80 of them, each asking the terminal's size): building this
    # parser in a fresh interpreter takes 1.45 ms instead of 2.6.
    own = parser.add_argument_group(
        "settings", "Each is also a config file key and a FORKSERVER_<NAME> environment variable.")
    for f in settings():
        meta, kind = f.metadata, kinds[f.name]
        default = meta["default_text"] or default_of(f)
        help_text = f"{meta['help']} (default: {default!r})".replace("%", "%%")
        if f.name == "app":
            parser.add_argument("app", nargs="?", metavar=meta["metavar"], help=help_text)
            continue
        flags = [*meta["flags"], cli_flag(f.name)]
        if kind is bool:
            own.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text)
        elif kind in (str, int, float, dict):
            own.add_argument(*flags, dest=f.name, metavar=meta["metavar"] or f.name.upper(), help=help_text)
        else:
            own.add_argument(
                *flags, dest=f.name, action="append", metavar=meta["metavar"] or f.name.upper(), help=help_text
            )
    group = parser.add_argument_group(
        "gunicorn's other spellings",
        "gunicorn's options that forkserver does not need are accepted too, and named at start with "
        "the reason; docs/gunicorn.md lists every one.")
    actions = {"value": "store", "append": "append", "flag": "store_true", "off": "store_false"}
    for spec in gunicorn.SETTINGS:
        flags = gunicorn_only_flags(spec)
        if not flags:
            continue
        unneeded = spec.disposition() == "ignored"
        options: dict[str, Any] = {"dest": GUNICORN_DEST + spec.name, "action": actions[spec.takes],
                                   "help": argparse.SUPPRESS if unneeded else _gunicorn_help(spec).replace("%", "%%")}
        if spec.takes in ("value", "append"):
            options["metavar"] = spec.name.upper()
        group.add_argument(*flags, **options)
    return parser


def _takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0


def _find_option(parser: argparse.ArgumentParser, flag: str) -> tuple[argparse.Action | None, str, str]:
    """The action a flag names (exactly, or by a unique prefix as argparse allows).

    Without one: the problem to report, and the option the user most likely
    meant (the closest spelling, or the first of an ambiguous prefix's), if any.
    """
    options = parser._option_string_actions
    if flag in options:
        return options[flag], "", ""
    if flag.startswith("--"):
        matches = sorted({o for o in options if o.startswith(flag)})
        if len(matches) == 1:
            return options[matches[0]], "", ""
        if matches:
            return None, f"ambiguous option {flag!r}: it could be {', '.join(matches)}", matches[0]
    close = _closest(flag, list(options), cutoff=0.7)
    hint = f" (did you mean '{close}'?)" if close else " (forkserver --help lists the options)"
    return None, f"unknown option {flag!r}{hint}", close


def _normalized_argv(parser: argparse.ArgumentParser, argv: Sequence[str], source: str,
                     problems: list[str]) -> list[str]:
    """Check every option at once and give argparse an argv it cannot misread.

    Unknown options are reported (all of them, not the first) and dropped,
    with the value that follows one when its closest known option takes a
    value.  Values are attached (``--flag=VALUE``) so that ``-`` or
    ``-1`` are read as values.  gunicorn's ``--proxy-protocol [MODE]`` becomes
    forkserver's on/off flag.
    """
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token == "--":
            out.extend(argv[i - 1:])
            break
        if not token.startswith("-") or token == "-":
            out.append(token)
            continue
        if token.startswith("--"):
            flag, eq, value = token.partition("=")
            attached = bool(eq)
        else:
            flag, value = token[:2], token[2:]
            attached = bool(value)
        action, problem, meant = _find_option(parser, flag)
        if action is None:
            problems.append(f"{source}: {problem}")
            guess = parser._option_string_actions.get(meant)
            if (not attached and i < len(argv) and not argv[i].startswith("-")
                    and guess is not None and _takes_value(guess)):
                i += 1  # its value, not the app
            continue
        if action.dest == "proxy_protocol":
            if not attached and i < len(argv) and argv[i].lower() in gunicorn.PROXY_MODES:
                value, attached = argv[i], True
                i += 1
            mode = gunicorn.proxy_mode(value) if attached else True
            if not isinstance(mode, bool):
                problems.append(f"{source} {flag}: proxy_protocol must be one of "
                                f"{', '.join(gunicorn.PROXY_MODES)}, got {value!r}")
                continue
            out.append("--proxy-protocol" if mode and flag != "--no-proxy-protocol" else "--no-proxy-protocol")
            continue
        if not _takes_value(action) or attached:
            out.append(token)
            continue
        if i >= len(argv):
            problems.append(f"{source}: argument {'/'.join(action.option_strings)}: expected one argument")
            continue
        value = argv[i]
        i += 1
        out.append(f"{flag}={value}" if flag.startswith("--") else f"{flag}{value}")
    return out


def parse_command_line(parser: argparse.ArgumentParser, argv: Sequence[str], source: str,
                       problems: list[str]) -> argparse.Namespace:
    """Parse ``argv``, adding a line to ``problems`` for each bad option rather than stopping at one."""
    cleaned = _normalized_argv(parser, argv, source, problems)
    try:
        namespace, extras = parser.parse_known_args(cleaned)
    except ConfigError as exc:
        problems.append(f"{source}: {exc}")
        return argparse.Namespace()
    for extra in extras:
        problems.append(f"{source}: unexpected argument {extra!r} (only one APP may be given)")
    return namespace


def _cli_source(key: str, source: str = "command line") -> str:
    return source if key == "app" else f"{source} {cli_flag(key)}"


def _from_cli(namespace: argparse.Namespace) -> dict[str, Any]:
    """Turn parsed flags into raw values; repeated list flags may also hold commas."""
    raw = {}
    for f in settings():
        if hasattr(namespace, f.name):
            value = getattr(namespace, f.name)
            if isinstance(value, list):
                value = f.metadata["separator"].join(value)
            if value is not None:
                raw[f.name] = value
    return raw


def _gunicorn_from_cli(namespace: argparse.Namespace) -> dict[str, Any]:
    """gunicorn settings given with spellings forkserver's own flags lack, by gunicorn name."""
    return {dest[len(GUNICORN_DEST):]: value for dest, value in vars(namespace).items()
            if dest.startswith(GUNICORN_DEST)}


# Plain classes, not dataclasses: see forkserver.records.
class Invocation:
    """What the command line asked for besides settings: the config and an action."""

    __slots__ = ("config", "config_path", "check_only", "show_version", "print_config")

    def __init__(self, config: Config, config_path: str, check_only: bool, show_version: bool,
                 print_config: bool = False) -> None:
        self.config = config
        self.config_path = config_path
        self.check_only = check_only
        self.show_version = show_version
        self.print_config = print_config


class _Layer:
    """One source of raw values: ``where(key)`` names it; ``typed`` False for text, None for either."""

    __slots__ = ("where", "typed", "raw")

    def __init__(self, where: Callable[[str], str], typed: bool | None, raw: dict[str, Any]) -> None:
        self.where = where
        self.typed = typed
        self.raw = raw


class _Sources:
    """Everything read from the sources, before merging: layers, and what to say or refuse."""

    __slots__ = ("layers", "problems", "notices", "warnings", "hooks", "hook_file", "proxy_allow_ips")

    def __init__(self) -> None:
        self.layers: list[_Layer] = []
        self.problems: list[str] = []
        self.notices: list[str] = []
        self.warnings: list[str] = []
        self.hooks: dict[str, Callable[..., Any] | str] = {}
        self.hook_file = ""
        self.proxy_allow_ips: tuple[str, Any] | None = None  # (where, value) of the last one given


def _command_line_layers(sources: _Sources, namespace: argparse.Namespace, source: str) -> None:
    """The layers of one command line (argv, or GUNICORN_CMD_ARGS): gunicorn's spellings, then ours."""
    flags = {spec.name: gunicorn_only_flags(spec) for spec in gunicorn.SETTINGS}
    given = _gunicorn_from_cli(namespace)
    if given:
        # Text as typed, or what a conversion made of it (a dict from --log-config-json).
        _add_gunicorn(sources, given, lambda key: f"{source} {flags[key][0]}", typed=None)
    sources.layers.append(_Layer(lambda key: _cli_source(key, source), False, _from_cli(namespace)))


def _add_gunicorn(sources: _Sources, raw: Mapping[str, Any], where: Callable[[str], str],
                  typed: bool | None, native: Mapping[str, Any] | None = None,
                  own_hooks: Mapping[str, Callable[..., Any]] | None = None) -> None:
    """Translate gunicorn-named values into one layer (with ``native`` forkserver-named ones beside,
    and ``own_hooks``, functions for forkserver's own hooks)."""
    translation = gunicorn.translate(raw, where, own_hooks)
    sources.problems.extend(translation.problems)
    sources.notices.extend(translation.notices)
    sources.warnings.extend(translation.warnings)
    if "proxy_allow_ips" in translation.extras:
        sources.proxy_allow_ips = (where("proxy_allow_ips"), translation.extras["proxy_allow_ips"])
    values = dict(native or {})
    for name, function in translation.hooks.items():
        sources.hooks[name] = function
        if name in _setting_names():
            values[name] = f"{where(name)}:{name}"
    values.update(translation.values)
    named = translation.named
    sources.layers.append(_Layer(lambda key: where(named.get(key, key)), typed, values))


def _config_file_layer(sources: _Sources, path: str) -> None:
    """Read a TOML file, or run a gunicorn config file, into a layer."""
    try:
        if not path.endswith(".py"):
            raw, problems = read_toml(path)
            sources.problems.extend(problems)
            sources.layers.append(_Layer(lambda key: path, True, raw))
            return
        names = gunicorn.run_python_file(path)
    except ConfigError as exc:
        sources.problems.append(str(exc))
        return
    known, own, near = gunicorn.split_python_names(names, _setting_names())
    sources.warnings.extend(f"{path}: {line}" for line in near)
    own = {key: value for key, value in own.items() if value is not None}
    own_hooks = {name: own.pop(name) for name in gunicorn.OWN_HOOK_PARAMETERS if callable(own.get(name))}
    sources.hook_file = path
    _add_gunicorn(sources, known, lambda key: path, typed=None, native=own, own_hooks=own_hooks)


def _find_config_file(namespace: argparse.Namespace, env_namespace: argparse.Namespace,
                      environ: Mapping[str, str], base: str, sources: _Sources) -> str:
    """The config file: -c, else FORKSERVER_CONFIG, else -c in GUNICORN_CMD_ARGS, else ./gunicorn.conf.py.

    gunicorn's ``file:PATH`` and ``python:MODULE`` forms name a file too; a
    module is found on the path as it is when forkserver starts.
    """
    path = (getattr(namespace, "config", None) or environ.get(ENV_PREFIX + "CONFIG")
            or getattr(env_namespace, "config", None) or "")
    if path.startswith("python:"):  # gunicorn's -c python:package.module
        try:
            return gunicorn.module_file(path)
        except ConfigError as exc:
            sources.problems.append(str(exc))
            return ""
    if path:
        return os.path.join(base, path.removeprefix("file:"))
    candidate = os.path.join(base, gunicorn.DEFAULT_FILE)
    if not os.path.isfile(candidate):
        return ""
    unsafe = gunicorn.unsafe_because(os.stat(candidate))
    if unsafe:
        sources.warnings.append(f"{candidate}: not loaded, although gunicorn would load it: {unsafe}")
        return ""
    sources.notices.append(f"{candidate}: loaded as gunicorn does when no -c is given")
    return candidate


def _settle(values: dict[str, Any], origins: dict[str, str], sources: _Sources) -> None:
    """Decide what depends on several settings at once, and say what a gunicorn user must know."""
    notices = sources.notices
    kind = values.get("worker_class", "sync")
    if kind in ("gevent", "eventlet"):
        if "threads" in values:
            threads = f"{values['threads']} threads per worker (from {origins['threads']})"
        else:
            connections = values.get("worker_connections", 1000)
            values["threads"] = gunicorn.evented_threads(connections)
            origins["threads"] = origins["worker_class"]
            threads = (f"{values['threads']} threads per worker (from worker_connections {connections}, "
                       f"at most {gunicorn.EVENTED_THREAD_CAP})")
        notices.append(f"{origins['worker_class']}: worker_class {kind} runs on forkserver's keep-alive "
                       f"loop with {threads}; the app needs no monkey-patching")
    if sources.proxy_allow_ips is not None:
        where, value = sources.proxy_allow_ips
        if origins.get("forwarded_allow_ips", "default") == "default":
            try:
                values["forwarded_allow_ips"] = validate(
                    setting_field("forwarded_allow_ips"), coerce("forwarded_allow_ips", value, where), where)
                origins["forwarded_allow_ips"] = where
            except ConfigError as exc:
                sources.problems.append(str(exc))
    if origins.get("bind") == "environment PORT":
        sources.warnings.append(f"binding all interfaces, {values['bind'][0]}, because PORT is set and "
                                "no bind is given (as gunicorn does)")
    if origins.get("workers") == "environment WEB_CONCURRENCY":
        notices.append(f"workers: {values['workers']} from WEB_CONCURRENCY, as no workers setting is given")
    elif "workers" not in values:
        notices.append("workers: auto, one per CPU the machine or its container allows, forkserver's "
                       "default (gunicorn's is 1; set workers to choose)")


def load_config(argv: Sequence[str], environ: Mapping[str, str], base_dir: str | None = None) -> Invocation:
    """Merge every source into one checked Config.

    Precedence, lowest first: defaults (which gunicorn's PORT, WEB_CONCURRENCY
    and FORWARDED_ALLOW_IPS change, as in gunicorn) < the config file (TOML, or
    a gunicorn ``*.py``, or ``./gunicorn.conf.py`` found as gunicorn finds it)
    < ``GUNICORN_CMD_ARGS`` < ``FORKSERVER_*`` < the command line.

    Raises:
        ConfigError: naming every problem found, one per line, each with where it came from.
    """
    base = base_dir or os.getcwd()
    sources = _Sources()
    parser = build_arg_parser()
    namespace = parse_command_line(parser, argv, "command line", sources.problems)
    env_argv: list[str] = []
    if environ.get("GUNICORN_CMD_ARGS"):
        import shlex  # deferred: importing it compiles a Unicode regex (about 1 ms) that few starts need

        try:
            env_argv = shlex.split(environ["GUNICORN_CMD_ARGS"])
        except ValueError as exc:
            sources.problems.append(f"environment GUNICORN_CMD_ARGS: cannot split it as a shell would: {exc}")
        if env_argv:
            sources.notices.append(f"environment GUNICORN_CMD_ARGS read as command-line options: {shlex.join(env_argv)}")
    env_namespace = parse_command_line(parser, env_argv, "environment GUNICORN_CMD_ARGS", sources.problems)

    for name, value, source in gunicorn.environment_defaults(environ):
        sources.layers.append(_Layer(lambda key, source=source: source, False, {name: value}))
    config_path = _find_config_file(namespace, env_namespace, environ, base, sources)
    if config_path:
        _config_file_layer(sources, config_path)
    _command_line_layers(sources, env_namespace, "environment GUNICORN_CMD_ARGS")
    env_values, env_problems = read_env(environ)
    sources.problems.extend(env_problems)
    sources.layers.append(_Layer(lambda key: f"environment {env_name(key)}", False, env_values))
    _command_line_layers(sources, namespace, "command line")

    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    fields = {f.name: f for f in settings()}
    for layer in sources.layers:
        for key, value in layer.raw.items():
            where = layer.where(key)
            typed = layer.typed if layer.typed is not None else not isinstance(value, str)
            try:
                coerced = coerce(key, value, where, typed=typed)
                # A word (workers = "auto") names a value outside the setting's range on purpose.
                values[key] = coerced if is_word(fields[key], value) else validate(fields[key], coerced, where)
                origins[key] = where
            except ConfigError as exc:
                sources.problems.append(str(exc))
    _settle(values, origins, sources)
    # Relative directories mean "from where forkserver was started", also when
    # the master, which changed into ``chdir`` long ago, reads them again on HUP.
    if values.get("chdir"):
        values["chdir"] = os.path.join(base, values["chdir"])
    if values.get("pythonpath"):
        values["pythonpath"] = tuple(os.path.join(base, path) for path in values["pythonpath"])
    for name in ("certfile", "keyfile", "ca_certs"):  # read again on HUP, after chdir
        if values.get(name):
            values[name] = os.path.join(base, values[name])
    # A hook function from the gunicorn file counts unless a later source named another hook.
    hooks = {name: function for name, function in sources.hooks.items()
             if name not in fields or origins.get(name) == sources.hook_file}
    problems = sources.problems
    if not problems:
        config = Config(**values, origins=origins, notices=tuple(dict.fromkeys(sources.notices)),
                        warnings=tuple(dict.fromkeys(sources.warnings)),
                        gunicorn_hooks=hooks)
        problems = combination_problems(config)
    if problems:
        raise ConfigError("\n".join(dict.fromkeys(problems)))
    return Invocation(
        config=config,
        config_path=config_path,
        check_only=bool(getattr(namespace, "check_config", False) or getattr(env_namespace, "check_config", False)),
        show_version=bool(getattr(namespace, "version", False)),
        print_config=bool(getattr(namespace, "print_config", False)
                          or getattr(env_namespace, "print_config", False)),
    )
