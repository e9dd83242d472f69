"""Python logging configured by the user (logconfig, logconfig_dict), as gunicorn applies it.

gunicorn users configure its two loggers, ``gunicorn.error`` and
``gunicorn.access``, with ``logging.config``.  Here those names mean
forkserver's error logger (``forkserver``) and access logger
(``forkserver_access``, outside the ``forkserver`` tree so that its lines
propagate to the root logger, as gunicorn's do, and not into the error log).
The master applies the configuration once, after opening its own logs, and
the workers inherit it at fork.  What gunicorn does, and so what happens here:

* ``logconfig_dict`` is laid over defaults, one top-level key at a time
  (a ``loggers`` given replaces every default logger): the error logger to
  stderr, the access logger and the root logger to stdout, at INFO.
* ``logconfig`` is read by ``fileConfig``, without disabling the loggers that
  exist; only ``logconfig_dict`` is applied when both are given.
* Loggers configured so lose forkserver's own handler (error_logfile).
* Once the access logger has handlers, every worker sends its access lines
  there, one record each (``open_access_log``).
* On USR1 every ``FileHandler`` reopens its file, for logrotate.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import TYPE_CHECKING, Any

from .config import Config
from .errors import ConfigError
from .logs import ACCESS_LOGGER_NAME, ERROR_LOG_DATEFMT, ERROR_LOG_FORMAT, LOGGER_NAME

if TYPE_CHECKING:
    import configparser

# configparser and logging.config are imported only when a configuration is
# given: every other start would pay about a millisecond for them.

# gunicorn's logger names, and what they mean here.
LOGGER_NAMES = {"gunicorn.error": LOGGER_NAME, "gunicorn.access": ACCESS_LOGGER_NAME}


def default_dict() -> dict[str, Any]:
    """gunicorn's defaults for ``logconfig_dict``, with forkserver's names and line format."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "root": {"level": "INFO", "handlers": ["console"]},
        "loggers": {
            LOGGER_NAME: {"level": "INFO", "handlers": ["error_console"], "propagate": True},
            ACCESS_LOGGER_NAME: {"level": "INFO", "handlers": ["console"], "propagate": True},
        },
        "handlers": {
            "console": {"class": "logging.StreamHandler", "formatter": "generic", "stream": "ext://sys.stdout"},
            "error_console": {"class": "logging.StreamHandler", "formatter": "generic", "stream": "ext://sys.stderr"},
        },
        "formatters": {"generic": {"format": ERROR_LOG_FORMAT, "datefmt": ERROR_LOG_DATEFMT}},
    }


def effective_dict(given: dict[str, Any]) -> dict[str, Any]:
    """The defaults with ``given``'s top-level keys over them, gunicorn's logger names translated."""
    merged = default_dict()
    merged.update(copy.deepcopy(given))
    loggers = merged.get("loggers")
    if isinstance(loggers, dict):
        merged["loggers"] = {LOGGER_NAMES.get(name, name): spec for name, spec in loggers.items()}
    return merged


def read_ini(path: str) -> configparser.ConfigParser:
    """Read a fileConfig file, pointing each logger section's gunicorn ``qualname`` at ours.

    ``%(here)s`` and ``%(__file__)s`` are available to the file, as gunicorn offers them.

    Raises:
        ConfigError: if the file is missing or not valid INI.
    """
    import configparser

    parser = configparser.ConfigParser(defaults={"here": os.path.dirname(os.path.abspath(path)),
                                                 "__file__": os.path.abspath(path)})
    try:
        with open(path, encoding="utf-8") as fh:
            parser.read_file(fh)
    except OSError as exc:
        raise ConfigError(f"logconfig: cannot read '{path}': {exc.strerror}") from None
    except configparser.Error as exc:
        raise ConfigError(f"logconfig '{path}': {' '.join(str(exc).split())}") from None
    for section in parser.sections():
        qualname = parser.get(section, "qualname", fallback="")
        if section.startswith("logger_") and qualname in LOGGER_NAMES:
            parser.set(section, "qualname", LOGGER_NAMES[qualname])
    return parser


def apply(config: Config, base_dir: str) -> None:
    """Apply ``logconfig_dict`` if given, else ``logconfig`` (relative to ``base_dir``).

    Raises:
        ConfigError: naming the setting and what logging.config said is wrong.
    """
    import logging.config

    # Both raise nearly anything on a bad configuration: a handler's class
    # may not import, its arguments are evaluated, a section may be missing.
    if config.logconfig_dict:
        given = config.logconfig_dict
        try:
            logging.config.dictConfig(effective_dict(given))
        except Exception as exc:  # noqa: BLE001
            hint = ""
            handlers = set(given.get("handlers") or {"console", "error_console"})
            if ("root" not in given and "console" not in handlers) or (
                    "loggers" not in given and not {"console", "error_console"} <= handlers):
                # gunicorn's most reported logconfig_dict error; the same dict fails there too.
                hint = (" (as in gunicorn, the default root and loggers write to handlers 'console' and "
                        "'error_console', which a 'handlers' given replaces: define them, or give 'root' and "
                        "'loggers' too)")
            raise ConfigError(f"logconfig_dict: {one_line(exc)}{hint}") from None
        return
    path = os.path.join(base_dir, config.logconfig)
    parser = read_ini(path)
    try:
        logging.config.fileConfig(parser, disable_existing_loggers=False)
    except Exception as exc:  # noqa: BLE001
        missing = " (a section or option the file lacks)" if isinstance(exc, KeyError) else ""
        raise ConfigError(f"logconfig '{path}': {one_line(exc)}{missing}") from None


def one_line(exc: BaseException) -> str:
    """logging.config's message, with the causes it does not already quote, on one line."""
    text = f"{type(exc).__name__}: {exc}"
    cause = exc.__cause__ or exc.__context__
    while cause is not None:
        if str(cause) not in text:
            text += f": {cause}"
        cause = cause.__cause__ or cause.__context__
    return " ".join(text.split())


class FileHandlers:
    """The files of every ``logging.FileHandler`` a logging configuration made, reopened on USR1.

    A configured handler keeps writing to a file logrotate moved away;
    gunicorn reopens every one of them on USR1, and so do the master and the
    workers.  Unlike forkserver's own logs these are opened by path in each
    process, so a worker running as ``user`` reopens only files that user may
    open; one it cannot keeps its old file, and one error line says why.
    """

    def reopen(self) -> bool:
        """Reopen every handler's file; False if any had to keep its old one."""
        loggers = [logging.root, *(found for found in list(logging.root.manager.loggerDict.values())
                                   if isinstance(found, logging.Logger))]
        whole = True
        for logger in loggers:
            for handler in logger.handlers:
                if isinstance(handler, logging.FileHandler) and handler.stream is not None:
                    try:
                        fresh = handler._open()
                    except OSError as exc:
                        logging.getLogger(LOGGER_NAME).error(
                            "cannot reopen %s: %s; still writing to the file it had open",
                            handler.baseFilename, exc.strerror or exc)
                        whole = False
                        continue
                    old = handler.setStream(fresh)
                    if old is not None:
                        old.close()
        return whole
