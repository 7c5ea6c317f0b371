"""The documents stay what their readers need: a short README, every module named, no history."""

from __future__ import annotations

import re

from conftest import ROOT


def test_contributing_lists_every_module_of_the_service() -> None:
    listed = (ROOT / "CONTRIBUTING.md").read_text()
    modules = sorted(p.name for p in (ROOT / "service").glob("*.py") if p.name != "__init__.py")
    assert [m for m in modules if f"| `{m}` |" not in listed] == [], "add a line to the layout"


def test_the_readme_is_a_ten_minute_read_and_links_every_doc() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in readme, f"the README's Documentation list lacks {page.name}"


def test_no_document_or_module_speaks_of_the_projects_history() -> None:
    places = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *(ROOT / "docs").glob("*.md")]
    places += [*(ROOT / "service").glob("*.py"), *(ROOT / "bench").glob("*.py")]
    found = [p.name for p in places if re.search(r"issue [0-9]", p.read_text(), re.IGNORECASE)]
    assert found == []
