"""Compression reports: accounts of adapters, checked against thresholds, rendered.

A :class:`Report` owns its rows and its checks, and so its exit code: 0 when
every check passed, 1 when one failed.  Rendering is pure (text, JSON,
Markdown in, strings out); the command line only prints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .accounting import AdapterAccount
from .choices import ReportFormat
from .results import Result
from .storage_forms import StorageForm

__all__ = ["ReportFormat", "Check", "Report", "build_report", "report_fields"]


def report_fields() -> tuple[str, ...]:
    """The per-adapter keys of the JSON report, in order (docs/report-schema.md is tested against it).

    ``<form>_vblora_params`` comes once per registered storage form.

    Example:
        >>> [f for f in report_fields() if f.endswith("_vblora_params")][:3]
        ['full_vblora_params', 'topk_vblora_params', 'packed_vblora_params']
    """
    forms = tuple(f"{form.value}_vblora_params" for form in StorageForm)
    head = (
        "path",
        "adapter_name",
        "form",
        "r",
        "num_vectors",
        "vector_length",
        "topk",
        "num_modules",
        "slots",
    )
    tail = ("lora_params", "form_bytes", "precision", "compression_vs_full", "compression_vs_lora")
    return head + ("file_bytes", "vblora_params", "other_params") + forms + tail


@dataclass(frozen=True)
class Check:
    """One threshold applied to one adapter."""

    adapter: str  # "<path> [<adapter_name>]"
    name: str  # "max_bytes" or "min_compression"
    limit: float
    value: float

    @property
    def passed(self) -> bool:
        return self.value <= self.limit if self.name == "max_bytes" else self.value >= self.limit


@dataclass
class Report(Result):
    """Accounts plus checks; ``exit_code`` is 1 when any check failed."""

    accounts: list[AdapterAccount]
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def rows(self) -> list[dict]:
        """One JSON-ready dictionary per adapter, keys as :func:`report_fields` plus the breakdown."""
        rows = []
        for acc in self.accounts:
            values = {f"{form}_vblora_params": count for form, count in acc.form_params.items()}
            row = {name: values[name] if name in values else getattr(acc, name) for name in report_fields()}
            row["form_bytes"] = dict(acc.form_bytes)
            row["form"] = acc.form.value
            row["compression_vs_full"] = round(acc.compression_vs_full, 4)
            row["compression_vs_lora"] = round(acc.compression_vs_lora, 4)
            row["by_module_type"] = [vars(t) for t in acc.by_module_type]
            rows.append(row)
        return rows

    def text(self) -> str:
        return _text(self)

    def json(self) -> str:
        return _json(self)

    def markdown(self) -> str:
        return _markdown(self)


def build_report(
    accounts: list[AdapterAccount],
    *,
    max_bytes: Optional[int] = None,
    min_compression: Optional[float] = None,
) -> Report:
    """A report of ``accounts`` with a check per adapter and threshold given.

    Args:
        accounts: From :func:`vblora_store.accounting.account`.
        max_bytes: Fail an adapter whose weights file is larger.
        min_compression: Fail an adapter whose ``compression_vs_lora`` is lower.

    Returns:
        The :class:`Report`.

    Example:
        >>> build_report([], max_bytes=10).exit_code
        0
    """
    checks = []
    for acc in accounts:
        label = _label(acc)
        if max_bytes is not None:
            checks.append(Check(label, "max_bytes", max_bytes, acc.file_bytes))
        if min_compression is not None:
            checks.append(Check(label, "min_compression", min_compression, round(acc.compression_vs_lora, 4)))
    return Report(accounts, checks)


def _label(acc: AdapterAccount) -> str:
    return f"{acc.path} [{acc.adapter_name}]"


def _json(report: Report) -> str:
    checks = [dict(vars(c), passed=c.passed) for c in report.checks]
    return json.dumps({"adapters": report.rows(), "checks": checks, "passed": report.passed}, indent=2)


def _text(report: Report) -> str:
    lines = []
    for acc in report.accounts:
        lines += [
            f"{_label(acc)}: {acc.form.value} form, r={acc.r}, N={acc.num_vectors}, "
            f"L={acc.vector_length}, k={acc.topk}, {acc.num_modules} modules",
            f"  weights file          {acc.file_bytes:>15,} bytes",
            f"  VB-LoRA params        {acc.vblora_params:>15,}  (float32-equivalent, as stored)",
            f"  other params          {acc.other_params:>15,}  (modules_to_save, biases)",
            f"  precision             {acc.precision:>15}",
            *[
                f"  {form.codec.report_label:<21} {acc.form_params[form]:>15,}  "
                f"({acc.form_bytes[form]:,} {form.codec.bytes_note_for(acc.rounded_from)})"
                for form in StorageForm
            ],
            f"  rank-{acc.r} LoRA stores   {acc.lora_params:>15,}",
            f"  compression           {acc.compression_vs_full:>14.1f}x vs full, "
            f"{acc.compression_vs_lora:.1f}x vs LoRA",
        ]
        for t in acc.by_module_type:
            lines.append(
                f"    {t.module_type:<20} {t.num_modules:>4} modules {t.lora_params:>13,} LoRA params"
            )
    lines += [_check_line(c) for c in report.checks]
    return "\n".join(lines)


def _check_line(check: Check) -> str:
    verdict = "ok  " if check.passed else "FAIL"
    relation = "<=" if check.name == "max_bytes" else ">="
    return f"{verdict} {check.adapter}: {check.name} {check.value:g} {relation} {check.limit:g}"


def _root(acc: AdapterAccount) -> str:
    """The folder ``acc`` was read from: its own, or its parent for an adapter in PEFT's sub-folder layout."""
    folder = Path(acc.path)
    return str(folder.parent if acc.adapter_name != "default" and folder.name == acc.adapter_name else folder)


def _markdown(report: Report) -> str:
    # The folder tells adapters apart once they come from several (each folder's root is "default");
    # a report of one folder (a model card's) names none, so no local path reaches a card.
    several = len({_root(acc) for acc in report.accounts}) > 1
    name = (
        (lambda acc: f"`{acc.path}` `{acc.adapter_name}`")
        if several
        else (lambda acc: f"`{acc.adapter_name}`")
    )
    forms = list(StorageForm)
    lines = [
        "| adapter | form | precision | weights file (bytes) | VB-LoRA params | other params | "
        + "".join(f"{form.codec.label} form | " for form in forms)
        + "rank-r LoRA | vs full | vs LoRA |",
        "|---|---|---|--:|--:|--:|" + "--:|" * len(forms) + "--:|--:|--:|",
    ]
    for acc in report.accounts:
        lines.append(
            f"| {name(acc)} | {acc.form.value} | {acc.precision} | {acc.file_bytes:,} "
            f"| {acc.vblora_params:,} | {acc.other_params:,} "
            + "".join(f"| {acc.form_params[form]:,} " for form in forms)
            + f"| {acc.lora_params:,} | {acc.compression_vs_full:.1f}x | {acc.compression_vs_lora:.1f}x |"
        )
    lines += ["", "Parameters are float32-equivalent savable counts, as PEFT computes them, per adapter."]
    for acc in report.accounts:
        lines += [
            "",
            f"**{name(acc)}** (r={acc.r}, N={acc.num_vectors}, L={acc.vector_length}, k={acc.topk}), "
            "by module type:",
            "",
            "| module type | modules | sub-vector slots | rank-r LoRA params |",
            "|---|--:|--:|--:|",
        ]
        lines += [
            f"| `{t.module_type}` | {t.num_modules} | {t.slots:,} | {t.lora_params:,} |"
            for t in acc.by_module_type
        ]
    if report.checks:
        lines += ["", "| check | adapter | value | limit | result |", "|---|---|--:|--:|---|"]
        lines += [
            f"| {c.name} | `{c.adapter}` | {c.value:g} | {c.limit:g} | {'pass' if c.passed else '**FAIL**'} |"
            for c in report.checks
        ]
    return "\n".join(lines)
