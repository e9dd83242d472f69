"""Keep a generated block of a Markdown page in step with the code it is generated from.

The pages' tables (docs/options.md, docs/gunicorn.md) sit between two HTML
comments; a generator script builds the block and hands it here, which
rewrites the page or, with ``--check``, only says whether it is out of date
(the unit tests run the check, so the documentation cannot drift).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path


def rewrite_block(page: Path, begin: str, end: str, block: str, argv: Sequence[str], command: str) -> int:
    """Put ``block`` (markers included) in place of the one between ``begin`` and ``end``; the exit status.

    With ``--check`` in ``argv`` nothing is written: 1 if the page differs, naming ``command`` to fix it.
    """
    text = page.read_text()
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        print(f"{page}: markers {begin} ... {end} not found", file=sys.stderr)
        return 2
    updated = text[:start] + block + text[stop + len(end):]
    if "--check" in argv:
        if updated != text:
            print(f"{page.name}: the generated table is out of date: run {command}", file=sys.stderr)
            return 1
        return 0
    page.write_text(updated)
    return 0
