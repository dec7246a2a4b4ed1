"""One output and exit protocol: every result a command prints knows whether it passed and how to render.

A result (:class:`Result`) has ``passed``, ``exit_code`` and ``render(fmt)``
for each :class:`OutputFormat`; the command line prints ``render`` and exits
with ``exit_code``, the same way for every command:

    0  done (every check passed)
    1  a check failed (``report`` thresholds, ``verify --tol``)
    2  bad input (a batch conversion in which an adapter failed)

Rendering is pure: results in, strings out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .choices import ReportFormat as OutputFormat

__all__ = ["OutputFormat", "EXIT_OK", "EXIT_CHECK_FAILED", "EXIT_BAD_INPUT", "Result", "Summary"]

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class Result:
    """What a command prints: pass or fail, an exit code, three renderings."""

    @property
    def passed(self) -> bool:
        return True

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.passed else EXIT_CHECK_FAILED

    def render(self, fmt: OutputFormat) -> str:
        """The result as text, JSON or Markdown."""
        fmt = OutputFormat(fmt)
        return {
            OutputFormat.TEXT: self.text,
            OutputFormat.JSON: self.json,
            OutputFormat.MARKDOWN: self.markdown,
        }[fmt]()

    def text(self) -> str:
        raise NotImplementedError

    def json(self) -> str:
        raise NotImplementedError

    def markdown(self) -> str:
        raise NotImplementedError


@dataclass
class Summary(Result):
    """What a command that writes did (``export-lora``, ``merge``, ``push``): a line of prose and its facts.

    Example:
        >>> print(Summary("wrote out", {"modules": 14}).render("markdown"))
        wrote out
        <BLANKLINE>
        - modules: 14
    """

    line: str
    facts: dict[str, Any] = field(default_factory=dict)

    def text(self) -> str:
        return self.line

    def json(self) -> str:
        return json.dumps({**self.facts, "summary": self.line}, indent=2, default=str)

    def markdown(self) -> str:
        return "\n".join([self.line, "", *[f"- {key}: {value}" for key, value in self.facts.items()]])
