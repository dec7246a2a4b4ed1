"""Docs that cannot drift: the tables that describe code are held to the code."""

from __future__ import annotations

import json
import re

from conftest import ROOT, SINGLE_FIXTURE, run_cli

from vblora_store.report import report_fields
from vblora_store.storage_forms import StorageForm, markdown_table


def _first_column(doc: str, heading: str) -> list[str]:
    section = doc.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [name for row in rows for name in re.findall(r"`([a-z_]+)`", row.split("|")[1])]


def test_report_schema_lists_every_field_the_report_emits():
    doc = (ROOT / "docs" / "report-schema.md").read_text()
    documented = _first_column(doc, "## Per adapter")
    assert set(documented) == set(report_fields()) | {"by_module_type"}
    emitted = json.loads(run_cli("report", SINGLE_FIXTURE, "--format", "json").stdout)["adapters"][0]
    assert set(emitted) == set(documented)  # what the command prints, not only what the code lists
    form_row = next(line for line in doc.splitlines() if line.startswith("| `form` |"))
    assert all(f'"{form}"' in form_row for form in StorageForm)


def test_format_md_holds_the_forms_table_of_the_registry():
    assert markdown_table() in (ROOT / "docs" / "format.md").read_text()


def test_readme_names_every_storage_form():
    readme = (ROOT / "README.md").read_text()
    for form in StorageForm:
        assert f"`{form}`" in readme, form


def _anchors(doc: str) -> set[str]:
    """GitHub's anchors of a Markdown page's headings (lower case, punctuation dropped, spaces to '-')."""
    found, seen, fenced = set(), {}, False
    for line in doc.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        heading = None if fenced else re.match(r"#{1,6}\s+(.*)", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return found


def _pages():
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for page in _pages():
        text = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path) if path else page
            if not linked.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked.read_text()):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


def test_every_script_the_docs_name_exists():
    named = {
        (page.name, path)
        for page in _pages()
        for path in re.findall(r"\b((?:benchmarks|docs/examples|fixtures|tests)/[\w./-]+\.py)\b", page.read_text())
    }
    missing = sorted(f"{page}: {path}" for page, path in named if not (ROOT / path).exists())
    assert not missing, missing
