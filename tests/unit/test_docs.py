"""The documentation's promises that a clone of the repository can check.

Every relative link in README.md and docs/*.md must lead to a file or
directory of the repository, and a ``#fragment`` into a Markdown file must name
one of its headings, as GitHub derives their anchors.  README.md's test
command must be the one CI runs.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
INLINE_LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose(text: str) -> str:
    """The text without code blocks and code spans, where brackets are not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def link_targets(text: str) -> list[str]:
    """Every link target written in Markdown text, inline or by reference definition."""
    body = prose(text)
    return INLINE_LINK.findall(body) + REFERENCE_DEFINITION.findall(body)


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of every heading in a Markdown file; repeats get -1, -2 as on GitHub."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for heading in HEADING.findall(FENCE.sub("", path.read_text())):
        anchor = github_anchor(heading)
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        found.add(anchor if count == 0 else f"{anchor}-{count}")
    return found


def broken_links(document: Path, root: Path) -> list[str]:
    """Each relative link of ``document`` that leads nowhere in ``root``, with the reason."""
    problems = []
    for target in link_targets(document.read_text()):
        if not target or SCHEME.match(target) or target.startswith("//"):
            continue  # a web address, checked by nobody here
        path_part, _, fragment = target.partition("#")
        destination = (document.parent / path_part).resolve() if path_part else document.resolve()
        if not destination.is_relative_to(root.resolve()):
            problems.append(f"{target}: outside the repository")
        elif not destination.exists():
            problems.append(f"{target}: no such file")
        elif fragment and destination.suffix == ".md" and fragment not in anchors(destination):
            problems.append(f"{target}: no heading with anchor #{fragment} in {destination.name}")
    return problems


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_resolves(document):
    if document.name == "README.md":
        assert len(link_targets(document.read_text())) > 10, "the link pattern missed README.md's links"
    assert broken_links(document, ROOT) == []


def test_the_checker_finds_each_kind_of_broken_link(tmp_path):
    """The check above is only worth something if a broken link makes it fail."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.md").write_text("# Guide\n\n## Behind a proxy (nginx)\n\n## Signals\n## Signals\n")
    (tmp_path / "README.md").write_text(
        "[ok](docs/guide.md) [ok](docs/guide.md#behind-a-proxy-nginx) [ok](docs/guide.md#signals-1)\n"
        "[ok](#top) [ok](https://example.com/x.md) [ok](docs)\n"
        "# Top\n"
        "[missing](docs/nothing.md) [bad anchor](docs/guide.md#signal) [escapes](../elsewhere/DESIGN.md)\n"
        "`[in code](docs/absent.md)`\n\n```\n[in a block](docs/absent.md)\n```\n\n"
        "[by reference][ref]\n\n[ref]: docs/gone.md\n"
    )
    assert broken_links(tmp_path / "README.md", tmp_path) == [
        "docs/nothing.md: no such file",
        "docs/guide.md#signal: no heading with anchor #signal in guide.md",
        "../elsewhere/DESIGN.md: outside the repository",
        "docs/gone.md: no such file",
    ]


def test_github_anchors():
    assert github_anchor("What forkserver does not do") == "what-forkserver-does-not-do"
    assert github_anchor("5. Log rotation") == "5-log-rotation"
    assert github_anchor("The `/stats` document (schema 1)") == "the-stats-document-schema-1"
    assert github_anchor("How does it compare? `scripts/bench.py`") == "how-does-it-compare-scriptsbenchpy"


def test_readme_test_command_is_the_one_ci_runs():
    readme = (ROOT / "README.md").read_text()
    command = "python3 -m pip install -e '.[test]' && python3 -m pytest -q"
    assert f"```\n{command}\n```" in readme, "README.md no longer shows the test command"
    ci_commands = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                   if line.strip() and not line.lstrip().startswith("#")]
    assert ci_commands[-1] == command, ".ci/run must end by running exactly README.md's test command"
