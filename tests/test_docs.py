"""Run every Python code block in docs/*.md, in order, one namespace per page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
PAGES = sorted(path for path in DOCS.glob("*.md") if BLOCK.search(path.read_text()))


def test_docs_have_code_blocks() -> None:
    assert PAGES, "no docs page with a python code block was found"


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_doc_code_blocks_run(page: Path) -> None:
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for number, block in enumerate(BLOCK.findall(page.read_text()), start=1):
        code = compile(block, f"{page.name} block {number}", "exec")
        exec(code, namespace)  # noqa: S102 - the docs are this repository's own
