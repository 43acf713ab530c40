"""Every document the code refers to is in the repository, and so is every section it cites."""

from __future__ import annotations

import re

from tests.helpers import ROOT

CODE = [p for d in ("api", "core", "pipeline", "analyze", "queries", "share", "executors", "cli", "bench", "tests")
        for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".sql") and p.name != "test_docs.py"]
CODE += [ROOT / "README.md", ROOT / "BENCHMARKS.md", *(ROOT / "docs").glob("*.md")]


def _text() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text() for p in CODE}


def test_cited_documents_and_sections_exist():
    pitfalls = (ROOT / "docs" / "pitfalls.md").read_text()
    notes = (ROOT / "docs" / "paper-notes.md").read_text()
    sections = set(re.findall(r"^#+ (\d+(?:\.\d+)?)\.? ", notes, flags=re.MULTILINE))
    defined = set(re.findall(r"^\*\*P(\d+)\.", pitfalls, flags=re.MULTILINE))
    for name, text in _text().items():
        for doc in re.findall(r"\bdocs/([\w-]+\.md)", text):
            assert (ROOT / "docs" / doc).is_file(), (name, doc)
        for n in re.findall(r"docs/pitfalls\.md,? P(\d+)", text):
            assert n in defined, (name, f"P{n}")
        for sec in re.findall(r"docs/paper-notes\.md §(\d+(?:\.\d+)?)", text):
            assert sec in sections, (name, sec)
        # documents of the workplace that a reader of the repository does not have
        assert not re.search(r"(?<![\w/])(paper|conventions|new-ground)\.md|shared/reference", text), name
