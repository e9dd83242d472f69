"""Value records: equality, hashing and a repr from ``__slots__``, without ``dataclasses``.

forkserver's records are plain classes with ``__slots__`` and a written
``__init__``, not dataclasses: a ``@dataclass`` compiles its generated
methods with ``exec()`` when the class is defined, 0.1-1 ms a class, and
the 23 records the start defined cost it 10-11 ms.  (The HTTP events are
plain classes too, with equality and a repr of their own:
``forkserver.http`` imports nothing of ours, this module included.)  The few that
are compared by value subclass ``Record``: two records are equal when
they are of the same class and their fields are, as with a dataclass,
and they hash by value, as the frozen dataclasses they replaced did.  They
are not frozen: nothing assigns a field after ``__init__``, and a frozen
``__init__`` would go through ``object.__setattr__`` for each field of
records made per request (``Origin``, ``ProxyHeader``).
"""

from __future__ import annotations

from typing import Any


class Record:
    """Base of a value record whose fields are its ``__slots__``."""

    __slots__ = ()

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"
