"""Run every Python code block in docs/*.md, in order, one namespace per page.

Fences must name their language, so that a block cannot skip the run by
accident:

- ```python blocks run;
- ```python-peer blocks need llmcompressor, which the suite does not
  install, so they are only compiled;
- ```json blocks must parse;
- ```text blocks (command synopses, output) are not code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```", re.DOTALL | re.MULTILINE)
LANGUAGES = ("python", "python-peer", "json", "text")
PAGES = sorted(DOCS.glob("*.md"))


def blocks(page: Path, language: str) -> list[str]:
    """Return the code of every block fenced as `language` on `page`, in order."""
    return [code for tag, code in FENCE.findall(page.read_text()) if tag.strip() == language]


def test_docs_have_code_blocks() -> None:
    assert any(blocks(page, "python") for page in PAGES), "no docs page with a python code block was found"


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_doc_fences_name_a_language(page: Path) -> None:
    tags = [tag.strip() for tag, _ in FENCE.findall(page.read_text())]

    unknown = [tag or "(none)" for tag in tags if tag not in LANGUAGES]

    assert not unknown, f"{page.name}: fences must be one of {', '.join(LANGUAGES)}, found {unknown}"


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_doc_code_blocks_run(page: Path) -> None:
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for number, block in enumerate(blocks(page, "python"), start=1):
        code = compile(block, f"{page.name} block {number}", "exec")
        exec(code, namespace)  # noqa: S102 - the docs are this repository's own


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_doc_peer_blocks_compile(page: Path) -> None:
    for number, block in enumerate(blocks(page, "python-peer"), start=1):
        compile(block, f"{page.name} python-peer block {number}", "exec")


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_doc_json_blocks_parse(page: Path) -> None:
    for number, block in enumerate(blocks(page, "json"), start=1):
        try:
            json.loads(block)
        except json.JSONDecodeError as error:
            pytest.fail(f"{page.name} json block {number}: {error}")
