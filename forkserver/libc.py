"""The few C library calls Python does not wrap, reached through ctypes.

They are looked up among the process's own symbols (``CDLL(None)``), which
hold libc's: ``ctypes.util.find_library("c")`` would run ``ldconfig`` in a
subprocess to name the same library, slowing every start that asks.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any


def function(name: str) -> Any:
    """libc's ``name``, setting ``ctypes.get_errno()``; None where this C library lacks it."""
    try:
        return getattr(_process_symbols(), name)
    except (OSError, AttributeError):
        return None


@functools.cache
def _process_symbols() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)
