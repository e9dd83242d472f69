"""Process identity: resolve ``user``/``group`` settings and drop privileges.

The master keeps its identity (it may need root to bind port 80 and to read
its config again on HUP); each worker drops to the configured user and group
right after fork, before it imports a line of app code.

Dropping is complete: the supplementary groups are replaced as well, never
inherited from the master, or a worker running as ``nobody`` would still
read every file open to root's group 0.
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


def resolve_identity(user: str, group: str) -> tuple[int | None, int | None]:
    """Return the (uid, gid) workers run as; with only ``user``, the gid is that user's own.

    A uid without a passwd entry has no group of its own, and keeping the
    master's (root's) would defeat the point, so it needs ``group`` too.
    """
    uid, gid = resolve_user(user), resolve_group(group)
    if uid is not None and gid is None:
        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            raise ConfigError(f"user: uid {uid} has no passwd entry, so it has no group of its own; "
                              "set group as well") from None
    return uid, gid


def supplementary_groups(uid: int | None, gid: int) -> list[int]:
    """The groups a worker of ``uid`` gets besides ``gid``: what login would give that user.

    That is ``initgroups(3)``'s list (the user's groups in the group
    database, plus ``gid``); a uid without a passwd entry, or no user at
    all (only ``group`` set), gets none.
    """
    if uid is None:
        return []
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return []
    return os.getgrouplist(name, gid)


def drop_privileges(uid: int | None, gid: int | None) -> None:
    """Become ``uid``/``gid`` for good, as ``resolve_identity`` gave them.

    Groups go first, while we still may change them: supplementary groups,
    then the gid, then the uid.  A master that already is the target (a
    non-root server whose config names its own user) skips the calls it
    has no right to make and needs none of.
    """
    if uid is None and gid is None:
        return
    if gid is None:
        raise ValueError(f"uid {uid} without a gid: resolve_identity gives both")
    groups = supplementary_groups(uid, gid)
    if sorted(set(os.getgroups())) != sorted(set(groups)):
        os.setgroups(groups)
    os.setgid(gid)
    if uid is not None:
        os.setuid(uid)
