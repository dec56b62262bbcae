"""Every file the docs cite exists: the evidence behind a number is committed, not lost.

Checked in README.md and docs/**/*.md: relative Markdown links (`[text](path)`, resolved from the
document's folder) and repository paths in backticks (`docs/...`, `scripts/...`, `fnlm/...`,
`tests/...`, resolved from the repository root). Globs and placeholders (`*`, `<name>`, `{}`,
`...`) are skipped: they name a pattern, not a file.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
LINK = re.compile(r"\]\(([^)\s]+)\)")
CODE = re.compile(r"`([^`\n]+)`")
REPO_PATH = re.compile(r"(?<![\w/.-])((?:docs|scripts|fnlm|tests)/[\w./<>{}*?=-]*)")
PLACEHOLDER = re.compile(r"[*?<>{}]|\.\.\.")


def cited_paths(markdown: str, folder: Path) -> list[tuple[str, Path]]:
    """(as written, resolved path) for every local link and backticked repository path."""
    cited = []
    for target in LINK.findall(markdown):
        target = target.split("#", 1)[0]
        if target and not re.match(r"[a-z]+:", target):  # skip http:, mailto: and bare anchors
            cited.append((target, folder / target))
    for code in CODE.findall(markdown):
        for path in REPO_PATH.findall(code):
            if not PLACEHOLDER.search(path):
                cited.append((path.rstrip("."), ROOT / path.rstrip(".")))
    return cited


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_path_the_docs_cite_exists(doc):
    missing = sorted({written for written, path in cited_paths(doc.read_text(encoding="utf-8"), doc.parent)
                      if not path.exists()})
    assert not missing, f"{doc.relative_to(ROOT)} cites files that do not exist: {missing}"


def test_the_checker_sees_links_and_backticked_paths(tmp_path):
    markdown = ("[log](runs/a/log.jsonl) [web](https://example.com) [top](#setup) `docs/x.json` "
                "`scripts/run.py --out y` `docs/results/<name>.json` `fnlm/*.py` `docs/...`")
    cited = [written for written, _ in cited_paths(markdown, tmp_path)]
    assert cited == ["runs/a/log.jsonl", "docs/x.json", "scripts/run.py"]
