"""Comparing two adapters by what they do: ΔW = B·A of every module, no base model.

A full adapter's factors are built as PEFT's forward builds them (top-k of the
logits, softmax); a top-k or packed adapter's from its indices and weights,
the last weight recovered as ``1 - sum``.  Errors are measured in float64 so
the comparison adds no rounding of its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from .errors import InvalidAdapterError
from .format import StoredAdapter, read_adapters
from .results import Result
from .factors import module_factors
from .topk import relative_error

__all__ = [
    "ModuleError",
    "Verification",
    "VerificationReport",
    "verify_adapters",
    "verify_folders",
]


@dataclass(frozen=True)
class ModuleError:
    """How far one module's ΔW of adapter B is from adapter A's."""

    module: str
    max_abs_error: float
    rel_error: float  # ||ΔW_B - ΔW_A||_F / ||ΔW_A||_F


@dataclass
class Verification:
    """Per-module errors of one adapter pair, and the overall maxima."""

    adapter_name: str
    modules: list[ModuleError] = field(default_factory=list)

    @property
    def max_abs_error(self) -> float:
        return max((m.max_abs_error for m in self.modules), default=0.0)

    @property
    def max_rel_error(self) -> float:
        return max((m.rel_error for m in self.modules), default=0.0)


def verify_adapters(reference: StoredAdapter, candidate: StoredAdapter) -> Verification:
    """Compare ``candidate``'s ΔW with ``reference``'s, module by module.

    Args:
        reference: Adapter A, the reference (relative errors divide by its norm).
        candidate: Adapter B.

    Returns:
        The :class:`Verification`.

    Raises:
        InvalidAdapterError: the two adapt different modules or shapes.

    Example:
        >>> from vblora_store import convert, read_adapter
        >>> _ = convert("fixtures/tiny-llama-vblora", tmp / "packed", to="packed")
        >>> v = verify_adapters(read_adapter("fixtures/tiny-llama-vblora"), read_adapter(tmp / "packed"))
        >>> v.max_rel_error < 1e-6
        True
    """
    if reference.modules != candidate.modules:
        only_ref = sorted(set(reference.modules) - set(candidate.modules))[:3]
        only_cand = sorted(set(candidate.modules) - set(reference.modules))[:3]
        detail = f"only in the first: {only_ref}, only in the second: {only_cand}"
        if not only_ref and not only_cand:
            detail = "the same modules have different in/out features"
        raise InvalidAdapterError(
            f"{candidate.weights_path}: does not adapt the same modules as {reference.weights_path} ({detail}); "
            "compare two forms of one adapter."
        )
    result = Verification(reference.name)
    order = list(reference.modules)
    for (module, a_ref, b_ref), (_, a_cand, b_cand) in zip(
        module_factors(reference, order), module_factors(candidate, order)
    ):
        largest, norm = _difference(a_ref, b_ref, a_cand, b_cand)
        rel = relative_error(a_ref, b_ref, a_cand, b_cand, diff_norm=norm)
        result.modules.append(ModuleError(module, largest, rel))
    return result


#: Values of ΔW built at once: rows of the difference in blocks of about 32 MB of float64.
_BLOCK_VALUES = 1 << 22


def _difference(a_ref, b_ref, a, b) -> tuple[float, float]:
    """The largest absolute value and the Frobenius norm of ``B·A - B_ref·A_ref``, a block of rows at a time.

    Each block is two products, so that equal factors give exactly zero (one rank-2r product sums in
    another order and leaves ~1e-17): ``(rows, r) @ (r, in) -> (rows, in)``.  fan_in_fan_out only
    transposes both, which changes neither error, so it is left out.  Memory: one block, never
    ``(out, in)``.
    """
    rows = max(1, _BLOCK_VALUES // max(1, a.shape[1]))
    largest, squares = 0.0, 0.0
    for start in range(0, b.shape[0], rows):
        block = b[start : start + rows] @ a
        block -= b_ref[start : start + rows] @ a_ref
        if block.numel():
            low, high = torch.aminmax(block)
            largest = max(largest, abs(float(low)), abs(float(high)))
            squares += float(torch.linalg.vector_norm(block)) ** 2
    return largest, squares**0.5


@dataclass
class VerificationReport(Result):
    """The verifications of every adapter pair of two folders against a tolerance; fails above it."""

    verifications: list[Verification]
    tol: float

    @property
    def max_abs_error(self) -> float:
        return max((v.max_abs_error for v in self.verifications), default=0.0)

    @property
    def max_rel_error(self) -> float:
        return max((v.max_rel_error for v in self.verifications), default=0.0)

    @property
    def passed(self) -> bool:
        return self.max_rel_error <= self.tol

    def json(self) -> str:
        modules = [dict(vars(m), adapter_name=v.adapter_name) for v in self.verifications for m in v.modules]
        payload = {
            "modules": modules,
            "max_abs_error": self.max_abs_error,
            "max_rel_error": self.max_rel_error,
        }
        return json.dumps({**payload, "tol": self.tol, "passed": self.passed}, indent=2)

    def text(self) -> str:
        lines = []
        for v in self.verifications:
            width = max((len(m.module) for m in v.modules), default=0)
            lines.append(f"[{v.adapter_name}] {len(v.modules)} modules")
            lines += [
                f"  {m.module:<{width}}  max abs {m.max_abs_error:.3e}  rel {m.rel_error:.3e}"
                for m in v.modules
            ]
        lines.append(self._verdict())
        return "\n".join(lines)

    def markdown(self) -> str:
        lines = ["| adapter | module | max abs error | relative error |", "|---|---|--:|--:|"]
        lines += [
            f"| `{v.adapter_name}` | `{m.module}` | {m.max_abs_error:.3e} | {m.rel_error:.3e} |"
            for v in self.verifications
            for m in v.modules
        ]
        return "\n".join(lines + ["", f"**{self._verdict()}**"])

    def _verdict(self) -> str:
        verdict = "ok" if self.passed else "FAIL"
        return (
            f"{verdict}: max abs error {self.max_abs_error:.3e}, max relative error {self.max_rel_error:.3e} "
            f"(tol {self.tol:g})"
        )


def verify_folders(
    a: Union[str, Path],
    b: Union[str, Path],
    *,
    tol: float = 1e-6,
    revision: Optional[str] = None,
    subfolder: Optional[str] = None,
) -> VerificationReport:
    """Compare every adapter of folder (or repo id) ``b`` with the adapter of the same name in ``a``.

    Args:
        a: The reference folder (or Hub repo id).
        b: The candidate.
        tol: Largest relative error that passes.
        revision, subfolder: Of repo ids.

    Returns:
        The :class:`VerificationReport` (``exit_code`` 1 above ``tol``).

    Raises:
        InvalidAdapterError: the two hold different adapters or modules.

    Example:
        >>> verify_folders("fixtures/tiny-llama-vblora", "fixtures/tiny-llama-vblora").exit_code
        0
    """
    first = {x.name: x for x in read_adapters(a, revision=revision, subfolder=subfolder)}
    second = {x.name: x for x in read_adapters(b, revision=revision, subfolder=subfolder)}
    if set(first) != set(second):
        raise InvalidAdapterError(
            f"{b}: holds adapters {sorted(second)} but {a} holds {sorted(first)}; compare two forms of one folder."
        )
    return VerificationReport([verify_adapters(first[name], second[name]) for name in first], tol)
