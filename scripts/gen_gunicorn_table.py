"""Generate docs/gunicorn.md's option-by-option table from forkserver/gunicorn.py.

Every gunicorn setting is listed once, in ``forkserver.gunicorn.SETTINGS``,
with its spellings and what forkserver does with it; the command line and the
config-file reader are derived from that list, and so is this table, so the
guide cannot drift from the code.  ``tests/unit/test_gunicorn_compat.py`` runs
``--check`` to enforce it.

    python scripts/gen_gunicorn_table.py           # rewrite the table in docs/gunicorn.md
    python scripts/gen_gunicorn_table.py --check   # exit 1 if docs/gunicorn.md is out of date
"""

from __future__ import annotations

import sys
from pathlib import Path

from doc_block import rewrite_block

from forkserver.config import cli_flag
from forkserver.gunicorn import HOOK_PARAMETERS, SETTINGS, GunicornSetting

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "gunicorn.md"
BEGIN, END = "<!-- gunicorn-options:begin -->", "<!-- gunicorn-options:end -->"
ACTIONS = {
    "config": "reads the file: TOML, or a gunicorn `*.py` file run as gunicorn runs it",
    "check_config": "runs the checks a start makes (settings, addresses, file locations, hooks, the app's import), binding, writing and forking nothing",
    "print_config": "prints the effective settings as TOML, each with where it came from",
}


def effect(spec: GunicornSetting) -> str:
    kind = spec.disposition()
    if kind == "native" and spec.native == "app":
        return "sets the app, as `APP` on the command line does"
    if kind == "native":
        return f"sets `{spec.native}` (`{cli_flag(spec.native)}`)"
    if kind == "hook":
        return f"called as `{spec.name}({HOOK_PARAMETERS[spec.name]})`"
    if kind == "action":
        return ACTIONS[spec.name]
    reason = spec.reason().replace("|", "\\|")
    return f"**refused**: {reason}" if kind == "refused" else f"accepted, not needed: {reason}"


def table() -> str:
    """Return the whole generated block, markers included."""
    lines = [
        BEGIN,
        "This table is generated from `forkserver/gunicorn.py` by `python scripts/gen_gunicorn_table.py`.",
        "",
        "| gunicorn setting | command line | what forkserver does |",
        "|---|---|---|",
    ]
    for spec in SETTINGS:
        flags = ", ".join(f"`{flag}`" for flag in spec.flags) or "config file only"
        lines.append(f"| `{spec.name}` | {flags} | {effect(spec)} |")
    lines.append(END)
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    return rewrite_block(GUIDE, BEGIN, END, table(), argv, "python scripts/gen_gunicorn_table.py")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
