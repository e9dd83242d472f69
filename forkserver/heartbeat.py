"""Worker liveness timestamps in shared memory: workers write, the master reads.

One anonymous shared mapping holds a float per cell.  A worker overwrites
its cell with ``time.monotonic()`` (one system-wide clock on Linux) each time it
makes progress; the master compares cells with its own clock.  There is no
file (gunicorn's temp-file heartbeat stalls on disk-backed /tmp) and no queue,
so a wedged stats queue can never look like a hung worker.
"""

from __future__ import annotations

import mmap
import struct
import time

CELL = struct.Struct("d")
MAX_CELLS = 4096


class Heartbeat:
    """Shared timestamps, indexed by cell number; allocate cells with ``take``."""

    def __init__(self, cells: int = MAX_CELLS) -> None:
        self._map = mmap.mmap(-1, cells * CELL.size)
        self._free = list(range(cells - 1, -1, -1))

    def take(self) -> int:
        """Reserve a cell for a new worker and stamp it now (master side)."""
        cell = self._free.pop()
        self.beat(cell)
        return cell

    def give_back(self, cell: int) -> None:
        """Return a dead worker's cell to the pool (master side)."""
        self._free.append(cell)

    def beat(self, cell: int) -> None:
        """Record progress now (worker side)."""
        CELL.pack_into(self._map, cell * CELL.size, time.monotonic())

    def age(self, cell: int) -> float:
        """Seconds since the cell was last stamped."""
        return time.monotonic() - CELL.unpack_from(self._map, cell * CELL.size)[0]
