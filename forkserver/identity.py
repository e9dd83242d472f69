"""Process identity: resolve ``user``/``group`` settings and drop privileges.

The master keeps its identity (it may need root to bind port 80 and to read
its config again on HUP); each worker drops to the configured user and group
right after fork, before it imports a line of app code.
"""

from __future__ import annotations

import grp
import os
import pwd

from .errors import ConfigError


def resolve_user(value: str) -> int | None:
    """Return the uid for a user name or number; None for an empty setting."""
    if not value:
        return None
    if value.isdigit():
        return int(value)
    try:
        return pwd.getpwnam(value).pw_uid
    except KeyError:
        raise ConfigError(f"user: no such user {value!r}") from None


def resolve_group(value: str) -> int | None:
    """Return the gid for a group name or number; None for an empty setting."""
    if not value:
        return None
    if value.isdigit():
        return int(value)
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        raise ConfigError(f"group: no such group {value!r}") from None


def drop_privileges(uid: int | None, gid: int | None) -> None:
    """Become ``uid``/``gid`` for good: group first, while we still may change it."""
    if gid is not None:
        os.setgroups([])
        os.setgid(gid)
    if uid is not None:
        if gid is None:
            os.setgid(pwd.getpwuid(uid).pw_gid)
        os.setuid(uid)
