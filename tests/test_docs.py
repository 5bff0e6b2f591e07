"""Links into the project's documents (`docs/<doc>.md#<section>`, `README.md#<section>`) name sections that exist."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

LINK = re.compile(r"((?:docs/)?[A-Za-z_-]+\.md)#([\w-]+)")


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", doc.read_text(encoding="utf-8"), re.M)}


def test_links_to_sections_name_existing_headings():
    tracked = subprocess.run(["git", "ls-files", "*.py", "*.md"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    known = {doc: anchors(doc) for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
    broken = []
    for name in tracked.stdout.split():
        source = ROOT / name
        for match in LINK.finditer(source.read_text(encoding="utf-8", errors="ignore")):
            target, anchor = match.groups()
            doc = next((p for p in (source.parent / target, ROOT / target, ROOT / "docs" / target) if p in known),
                       None)
            if doc is not None and anchor not in known[doc]:
                broken.append(f"{name}: {target}#{anchor}")
    assert not broken, broken
