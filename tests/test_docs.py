"""The repository explains itself: doc links resolve inside it, and nothing cites files it does not have."""

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_doc_links_resolve():
    broken = []
    for doc in DOCS:
        for target in LINK.findall(doc.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (doc.parent / target.split("#")[0]).resolve()
            if not path.exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_no_citations_of_files_outside_the_repository():
    pattern = re.compile(r"\b(SPEC|STYLE|PEERS) §|shared/reference")
    hits = [
        f"{p.relative_to(ROOT)}:{i}"
        for folder in ("lfm2vl", "tests", "docs", "benchmarks")
        for p in (ROOT / folder).rglob("*")
        if p.suffix in (".py", ".md") and p.name != "test_docs.py"
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ] + [f"README.md:{i}" for i, line in enumerate((ROOT / "README.md").read_text().splitlines(), 1)
         if pattern.search(line)]
    assert not hits, hits
