"""Docs that cannot drift: the tables that describe code are held to the code."""

from __future__ import annotations

import re

from conftest import ROOT

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
    form_row = next(line for line in doc.splitlines() if line.startswith("| `form` |"))
    assert all(f'"{form}"' in form_row for form in StorageForm)


def test_format_md_holds_the_forms_table_of_the_registry():
    assert markdown_table() in (ROOT / "docs" / "format.md").read_text()


def test_readme_names_every_storage_form():
    readme = (ROOT / "README.md").read_text()
    for form in StorageForm:
        assert f"`{form}`" in readme, form
