"""The storage forms: one registry, read by everything that lists, counts or describes forms.

A form is a name (``"full"``, ``"topk"``, ``"packed"``, ...) with a codec that
knows how to detect, decode, encode, count and describe it
(:mod:`vblora_store.format.codecs`).  The accounting, the report, the model
card, the command line's ``--to`` choices and the docs' tables all loop over
this registry, so adding a form is one codec module plus one
:func:`register_form` call.  This module imports nothing heavy: the command
line lists the forms before it loads torch; a codec module is imported on
first use of its form's :attr:`StorageForm.codec`.
"""

from __future__ import annotations

import importlib
from typing import Any, Iterator

__all__ = ["StorageForm", "register_form", "unregister_form", "markdown_table"]


class _Registry(type):
    """``StorageForm("topk")`` looks a form up; ``list(StorageForm)`` gives every form, in registration order."""

    def __call__(cls, value: Any) -> "StorageForm":
        if isinstance(value, cls):
            return value
        try:
            return cls._forms[value]
        except (KeyError, TypeError):
            names = ", ".join(repr(name) for name in cls._forms)
            raise ValueError(f"{value!r} is not a storage form; the forms are {names}") from None

    def __iter__(cls) -> Iterator["StorageForm"]:
        return iter(list(cls._forms.values()))

    def __len__(cls) -> int:
        return len(cls._forms)

    def __contains__(cls, value: Any) -> bool:
        return value in cls._forms


class StorageForm(str, metaclass=_Registry):
    """How an adapter is stored; a ``str`` equal to the form's name, one object per form.

    Members (every form registered; the built-in ones):
        FULL: every logit, ``(..., N)`` per module side; training can resume.
        TOPK: PEFT's ``save_only_topk_weights`` form: the top-k indices
            ``(..., k)`` and the softmax of the top-k logits without its last
            entry ``(..., k - 1)``; inference and merging only.
        PACKED: vblora_store's form of the same top-k data: indices bit-packed,
            one tensor per kind, optional lower precision (docs/format.md).
        COMPRESSED: the packed form with its bank and weights split into byte
            planes and zstd-compressed; the same data, bit for bit.

    Example:
        >>> StorageForm("packed") is StorageForm.PACKED, StorageForm.TOPK.has_logits
        (True, False)
        >>> [form.value for form in StorageForm][:3]
        ['full', 'topk', 'packed']
    """

    _forms: dict[str, "StorageForm"] = {}
    FULL: "StorageForm"
    TOPK: "StorageForm"
    PACKED: "StorageForm"
    COMPRESSED: "StorageForm"

    @property
    def value(self) -> str:
        """The form's name (``Enum``'s spelling)."""
        return str(self)

    @property
    def name(self) -> str:
        """The form's name in capitals (``Enum``'s spelling): ``"TOPK"``."""
        return str(self).upper()

    @property
    def has_logits(self) -> bool:
        """Whether every logit is stored (training can resume)."""
        return self._has_logits

    @property
    def peft_reads(self) -> bool:
        """Whether PEFT reads this form directly."""
        return self._peft_reads

    @property
    def summary(self) -> str:
        """One line: what the form stores."""
        return self._summary

    @property
    def codec(self) -> Any:
        """The form's codec (:class:`vblora_store.format.codecs.base.Codec`), imported on first use."""
        if self._codec is None:
            module, _, attribute = self._codec_path.partition(":")
            self._codec = getattr(importlib.import_module(module), attribute)
        return self._codec

    def __repr__(self) -> str:
        return f"StorageForm.{self.name}"

    def __reduce__(self):
        return (StorageForm, (str(self),))  # the registered object again, also in another process

    __hash__ = str.__hash__
    __eq__ = str.__eq__


def register_form(name: str, *, codec: str, summary: str, has_logits: bool = False, peft_reads: bool = False):
    """Add a storage form to the registry and return it.

    Args:
        name: The form's name, as ``--to`` takes it.
        codec: ``"module:attribute"`` of its codec object, imported on first use.
        summary: One line saying what it stores (help texts, docs).
        has_logits: It stores every logit (training can resume).
        peft_reads: PEFT reads it directly.

    Returns:
        The new :class:`StorageForm`.

    Raises:
        ValueError: the name is taken.

    Example:
        >>> toy = register_form("toy-doc", codec="vblora_store.format.codecs.topk:CODEC", summary="a test")
        >>> "toy-doc" in StorageForm, StorageForm("toy-doc") is toy
        (True, True)
        >>> unregister_form("toy-doc")
    """
    if name in StorageForm._forms:
        raise ValueError(f"a storage form named {name!r} is registered already")
    form = str.__new__(StorageForm, name)
    form._codec_path, form._codec = codec, None
    form._summary, form._has_logits, form._peft_reads = summary, has_logits, peft_reads
    StorageForm._forms[name] = form
    return form


def markdown_table() -> str:
    """The storage forms as a Markdown table (docs/format.md holds this table; a test compares them).

    Example:
        >>> print(markdown_table().splitlines()[2])
        | `full` | every logit, as PEFT saves by default; training can resume | yes | yes |
    """
    lines = ["| form | stores | training can resume | PEFT reads it |", "|---|---|---|---|"]
    lines += [
        f"| `{form}` | {form.summary} | {'yes' if form.has_logits else 'no'} | {'yes' if form.peft_reads else 'no'} |"
        for form in StorageForm
    ]
    return "\n".join(lines)


def unregister_form(name: str) -> None:
    """Remove a form added by :func:`register_form` (the built-in ones stay)."""
    if name in _BUILT_IN:
        raise ValueError(f"{name!r} is built in and stays registered")
    StorageForm._forms.pop(name, None)


StorageForm.FULL = register_form(
    "full",
    codec="vblora_store.format.codecs.full:CODEC",
    summary="every logit, as PEFT saves by default; training can resume",
    has_logits=True,
    peft_reads=True,
)
StorageForm.TOPK = register_form(
    "topk",
    codec="vblora_store.format.codecs.topk:CODEC",
    summary="PEFT's save_only_topk_weights form: top-k indices and weights; inference only",
    peft_reads=True,
)
StorageForm.PACKED = register_form(
    "packed",
    codec="vblora_store.format.codecs.packed:CODEC",
    summary="the top-k data with bit-packed indices, one tensor per kind, optional lower precision",
)
StorageForm.COMPRESSED = register_form(
    "compressed",
    codec="vblora_store.format.codecs.compressed:CODEC",
    summary="the packed form with the bank and weights split into byte planes and zstd-compressed",
)
_BUILT_IN = frozenset(StorageForm._forms)  # registered above; unregister_form keeps them
