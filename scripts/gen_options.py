"""Generate the option table of docs/options.md from the settings schema in forkserver/config.py.

Every setting is declared once, in ``forkserver.config.Config``; the CLI, the
TOML keys and the environment variables are derived from it.  This script
derives the documented table the same way, so the documentation cannot drift
from the code.  ``tests/unit/test_config.py`` runs ``--check`` to enforce it.

    python scripts/gen_options.py           # rewrite the table in docs/options.md
    python scripts/gen_options.py --check   # exit 1 if docs/options.md is out of date
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path
from typing import Any

from doc_block import rewrite_block

from forkserver.config import Config, cli_flag, default_of, env_name, settings
from forkserver.sources import toml_value

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "docs" / "options.md"
BEGIN, END = "<!-- options:begin -->", "<!-- options:end -->"


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def flags_of(f: Any, kind: Any) -> str:
    if f.name == "app":
        return "`APP` (positional)"
    flags = [*f.metadata["flags"], cli_flag(f.name)]
    if kind is bool:
        flags.append("--no-" + f.name.replace("_", "-"))
    return ", ".join(f"`{flag}`" for flag in flags)


def table() -> str:
    """Return the whole generated block, markers included."""
    kinds = typing.get_type_hints(Config)
    lines = [
        BEGIN,
        "Every setting works as a key in the TOML file (`-c FILE`, or `FORKSERVER_CONFIG`), as an",
        "environment variable and as a command-line flag; command line > environment > file > default.",
        "List settings take a TOML array, or commas in the environment; repeat the flag on the command line.",
        "This table is generated from `forkserver/config.py` by `python scripts/gen_options.py`.",
        "",
        "| Setting | CLI flag(s) | Environment variable | Default | Description |",
        "|---|---|---|---|---|",
    ]
    for f in settings():
        default = f.metadata["default_text"] or f"`{toml_value(default_of(f))}`"
        row = [f"`{f.name}`", flags_of(f, kinds[f.name]), f"`{env_name(f.name)}`", default, f.metadata["help"]]
        lines.append("| " + " | ".join(cell(text) for text in row) + " |")
    lines.append(END)
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    return rewrite_block(TARGET, BEGIN, END, table(), argv, "python scripts/gen_options.py")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
