"""Static-file mounts: the ``PREFIX=DIRECTORY`` mappings the settings describe.

Read by the master at start (and by ``--check-config``), which refuses a
directory that is missing, and by each worker, which serves from them
(``forkserver.worker.static``); so they live apart from the serving code,
which the master never loads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .config import Config
from .errors import ConfigError

# Unless configured: browsers revalidate every time, which the ETag makes a
# cheap 304, so an edited file is never served stale from a browser cache.
DEFAULT_CACHE_CONTROL = "no-cache"


@dataclass(frozen=True)
class Mount:
    """One ``PREFIX=DIRECTORY`` mapping: ``prefix`` without its trailing slash ("" for "/")."""

    prefix: str
    root: str
    cache_control: str | None = None


def split_entry(entry: str) -> tuple[str, str]:
    """Split ``PREFIX=VALUE`` at the first ``=``; the prefix loses a trailing slash."""
    prefix, _, value = entry.partition("=")
    prefix = prefix.strip()
    return (prefix.rstrip("/") if prefix != "/" else ""), value.strip()


def mounts_of(config: Config) -> list[Mount]:
    """Build the mounts from ``static`` and ``static_cache_control`` (already validated)."""
    default, per_prefix = DEFAULT_CACHE_CONTROL, {}
    for entry in config.static_cache_control:
        if entry.startswith("/"):
            prefix, value = split_entry(entry)
            per_prefix[prefix] = value
        else:
            default = entry.strip()
    mounts = []
    for entry in config.static:
        prefix, directory = split_entry(entry)
        value = per_prefix.get(prefix, default)
        mounts.append(Mount(prefix, directory, None if value.lower() == "none" else value))
    # Longest prefix first, so /static/img beats /static.
    return sorted(mounts, key=lambda m: len(m.prefix), reverse=True)


def check_roots(config: Config) -> None:
    """Raise ConfigError unless every static directory exists (relative ones from the cwd)."""
    for mount in mounts_of(config):
        if not os.path.isdir(mount.root):
            raise ConfigError(f"{config.source_of('static')}: static directory {mount.root!r} for "
                              f"{mount.prefix or '/'} is not a directory (cwd {os.getcwd()!r})")
