"""The documentation: every link stays inside the repository and leads to a file that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import REPO

DOCUMENTS = [REPO / "README.md", REPO / "raw_data" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_links_point_to_files_of_the_repository(document: Path) -> None:
    links = LINK.findall(document.read_text(encoding="utf-8"))
    for link in links:
        assert "://" not in link and not link.startswith(("/", "mailto:")), (
            f"{document.name}: {link} leaves the repository"
        )
        target = (document.parent / link.split("#")[0]).resolve()
        assert target.is_relative_to(REPO), f"{document.name}: {link} leads outside the repository"
        assert target.exists(), f"{document.name}: {link} does not exist"


def test_the_readme_names_the_commands_it_promises() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    tests = ".venv/bin/python -m pytest -n 2"
    assert ".venv/bin/snakemake --profile profiles/demo" in text and tests in text
    assert f"\n{tests}\n" in (REPO / ".ci" / "run").read_text(encoding="utf-8")  # CI runs the README's command
    assert "../shared" not in text


def test_the_reliability_page_lists_every_injected_fault() -> None:
    from test_faults import FAULTS

    page = (REPO / "docs" / "reliability.md").read_text(encoding="utf-8")
    missing = [fault.id for fault in FAULTS if f"`{fault.id}`" not in page]
    assert not missing, f"docs/reliability.md does not list {missing}"
