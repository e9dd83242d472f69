"""Same-page merging (Linux KSM): the server's processes offer their memory for the kernel to deduplicate.

A worker forked from the master or the refork mold shares its parent's
pages until it writes to them.  CPython writes an object's reference count
whenever code uses the object, so a request copies every page it touches,
and most of those copies end with the same bytes as the original (the count
was raised and lowered again) or as a sibling worker's copy.  The kernel's
KSM daemon (ksmd) scans the memory of the processes that opted in, and maps
pages whose content is identical onto one read-only frame again, copied on
the next write as after a fork.

``memory_merge`` opts the master in with ``prctl(PR_SET_MEMORY_MERGE)``
(Linux 6.4) before its first fork: the flag is inherited by every process
it forks, and by the mold's workers, so the whole tree is scanned.  Nothing
merges unless the host runs ksmd (``/sys/kernel/mm/ksm/run`` is 1), which
only root on the host can turn on; a kernel state that can change later is
not a configuration error, so the server warns and serves on.  A reload
that changes the setting sets or clears the master's flag (the master
never clears one it found set), and an upgrade clears the one the
old master set in the new master, since Linux 6.7 keeps it across exec.
"""

from __future__ import annotations

import ctypes
import errno
import os

from . import libc

PR_SET_MEMORY_MERGE = 67  # linux/prctl.h, since 6.4
PR_GET_MEMORY_MERGE = 68
KSM_RUN = "/sys/kernel/mm/ksm/run"
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_RUN_MERGING = "1"  # 0 stops ksmd keeping merged pages, 2 stops it and unmerges them


def ksm_problem() -> str | None:
    """Why ksmd will not merge anything now (the whole warning line), or None if it runs."""
    try:
        with open(KSM_RUN, encoding="ascii") as run:
            state = run.read().strip()
    except OSError:
        return (f"memory_merge: this kernel has no same-page merging ({KSM_RUN} is missing: "
                "built without CONFIG_KSM?); serving without it")
    if state != _RUN_MERGING:
        return (f"memory_merge: the kernel's same-page merging is not running ({KSM_RUN} is {state}); "
                f"nothing will be merged until root on the host runs: echo 1 > {KSM_RUN}")
    return None


def check_problem() -> str | None:
    """``--check-config``: what ``opt_in`` would warn about, asking the kernel without opting in."""
    return _warning(_prctl(PR_GET_MEMORY_MERGE, 0))


def opt_in() -> str | None:
    """Offer this process's memory, and its future children's, to ksmd; a warning line if that is in vain.

    The flag is set even when ksmd is not running, so that turning it on
    later merges a server that is already up.
    """
    return _warning(_prctl(PR_SET_MEMORY_MERGE, 1))


def opt_out() -> str | None:
    """Stop offering this process's memory, and its future children's, to ksmd; a warning line if refused.

    For a reload that turns ``memory_merge`` off: the flag is inherited, so
    without this the new generation would go on merging.  The kernel copies
    back this process's merged pages; workers already forked keep the flag
    until they are replaced.
    """
    error = _prctl(PR_SET_MEMORY_MERGE, 0)
    if error is None or error.errno in (errno.EINVAL, errno.ENOSYS):
        return None  # cleared, or a kernel without the flag: nothing to clear
    return _refused(error, "new workers may still be merged")


def _prctl(option: int, value: int) -> OSError | None:
    """Call ``prctl(option, value, 0, 0, 0)``: None if the kernel accepted it, else the error."""
    prctl = libc.function("prctl")
    if prctl is None:
        return OSError(errno.ENOSYS, "no prctl in this C library")
    if prctl(option, value, 0, 0, 0) >= 0:
        return None
    code = ctypes.get_errno()
    return OSError(code, os.strerror(code))


def _warning(error: OSError | None) -> str | None:
    """The one warning to give: the kernel's refusal, else ksmd's state.

    A kernel built without KSM refuses the call too (EINVAL), and then the
    missing KSM is the reason to name, not the kernel's version.
    """
    if error is None or not os.path.exists(KSM_RUN):
        return ksm_problem()
    return _refused(error, "serving without it")


def _refused(error: OSError, outcome: str) -> str:
    version = "; it needs Linux 6.4 or later" if error.errno == errno.EINVAL else ""  # EPERM: a seccomp filter
    return f"memory_merge: the kernel refused PR_SET_MEMORY_MERGE ({error.strerror}{version}); {outcome}"


def offered() -> bool:
    """Whether this process's memory is offered to ksmd now (False where the kernel has no such flag)."""
    prctl = libc.function("prctl")
    return prctl is not None and prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0) == 1


def merged_bytes(pid: int) -> int | None:
    """Memory of ``pid`` that ksmd maps onto a frame shared with identical pages; None where the kernel does not say.

    ``/proc/PID/ksm_merging_pages`` (Linux 5.19) counts this process's
    pages that are merged, whether with its own, a sibling's or its
    parent's; the kernel reads it from a counter, so it costs nothing like
    a walk of smaps.
    """
    try:
        with open(f"/proc/{pid}/ksm_merging_pages", encoding="ascii") as pages:
            return int(pages.read()) * PAGE_SIZE
    except (OSError, ValueError):
        return None
