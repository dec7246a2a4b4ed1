"""The model card pushed with adapters: PEFT's front matter, what the adapters are, how to load them.

Each storage form's note comes from its codec (``card_note``); the
compression report is the Markdown report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from ..accounting import account
from ..format.stored import StoredAdapter
from ..report import ReportFormat, build_report
from ..storage_forms import StorageForm
from ..sources import is_repo_id

__all__ = ["model_card"]

_AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}


def model_card(adapters: Sequence[StoredAdapter], *, repo_id: str, tags: Sequence[str] = ()) -> str:
    """The ``README.md`` pushed with ``adapters``: YAML front matter, then Markdown.

    The front matter has ``library_name: peft``, tags (``vblora``, ``peft``,
    ``vblora-store``, ``inference-only`` for every form without logits, then
    ``tags``) and ``base_model`` when the configs name a Hub repo (never a
    local path).  The body says what the
    adapter is, gives its compression report, and how to load it.

    Args:
        adapters: The adapters of one folder, as :func:`read_adapters` returns them.
        repo_id: The repo they are pushed to (used in the loading examples).
        tags: More tags, after the card's own (each once).

    Returns:
        The card's text.

    Example:
        >>> from vblora_store import read_adapters
        >>> card = model_card(read_adapters("fixtures/tiny-llama-vblora"), repo_id="acme/tiny")
        >>> card.splitlines()[1], "## Compression report" in card
        ('library_name: peft', True)
    """
    from huggingface_hub import ModelCardData

    forms = sorted({a.form for a in adapters}, key=list(StorageForm).index)
    inference_only = any(not form.has_logits for form in forms)
    bases = sorted({a.config.base_model_name_or_path for a in adapters} - {None})
    bases = [base for base in bases if _is_hub_model(base)]
    own = ["vblora", "peft", "vblora-store"] + (["inference-only"] if inference_only else [])
    metadata = ModelCardData(
        library_name="peft",
        base_model=(bases[0] if len(bases) == 1 else bases) or None,
        tags=list(dict.fromkeys([*own, *tags])),
    )
    name = repo_id.split("/")[-1]
    where = ", ".join(f"`{a.name}` ({_location(a)})" for a in adapters)
    for_base = ", ".join(f"`{b}`" for b in bases) or "a base model not recorded in its config"
    report = build_report([account(a) for a in adapters]).render(ReportFormat.MARKDOWN)
    lines = [
        "---",
        metadata.to_yaml(),
        "---",
        "",
        f"# {name}",
        "",
        f"[VB-LoRA](https://arxiv.org/abs/2405.15179) adapter{'s' * (len(adapters) > 1)} for {for_base}, "
        f"saved in PEFT's layout and published with vblora_store. Adapters: {where}.",
        "",
        "## Storage form",
        "",
        *[form.codec.card_note.format(repo_id=repo_id, name=name) for form in forms],
        "",
        "## Compression report",
        "",
        report,
        "",
        "## Load it with PEFT",
        "",
        *_peft_usage(adapters, repo_id=repo_id, name=name, base=bases[0] if bases else None),
        "",
        "## Load it with vblora_store",
        "",
        *_vblora_store_usage(adapters, repo_id=repo_id),
        "",
    ]
    return "\n".join(lines)


# -- the snippets ------------------------------------------------------------------------


def _peft_usage(
    adapters: Sequence[StoredAdapter], *, repo_id: str, name: str, base: Optional[str]
) -> list[str]:
    """The "load it with PEFT" snippet: a top-k copy first if packed; sub-folders as extra adapters."""
    packed = any(not a.form.peft_reads for a in adapters)
    source = f"{name}-topk" if packed else repo_id
    auto = _AUTO_CLASSES.get(str(adapters[0].config.task_type), "AutoModel")
    lines = []
    if packed:
        lines += ["```bash", f"vblora-store convert {repo_id} {source} --to topk", "```", ""]
    lines += [
        "```python",
        f"from transformers import {auto}",
        "from peft import PeftModel",
        "",
        f'base = {auto}.from_pretrained("{base or "..."}")' + ("" if base else "  # its base model"),
        f'model = PeftModel.from_pretrained(base, "{source}")',
    ]
    for adapter in adapters:
        if _subfolder_of(adapter) is None:
            continue
        where = f'"{source}/{adapter.name}"' if packed else f'"{source}", subfolder="{adapter.name}"'
        lines.append(f'model.load_adapter({where}, adapter_name="{adapter.name}")')
    return lines + ["```"]


def _vblora_store_usage(adapters: Sequence[StoredAdapter], *, repo_id: str) -> list[str]:
    """The "load it with vblora_store" snippet: the command line, then the engine."""
    lines = [
        "```bash",
        f"vblora-store inspect {repo_id}",
        f"vblora-store report {repo_id} --format markdown",
        "```",
        "",
        "```python",
        "from vblora_store.engine import VBLoRAModel",
        "",
        f'model = VBLoRAModel.from_pretrained(base, "{repo_id}")  # base: loaded as above',
    ]
    for adapter in adapters:
        if _subfolder_of(adapter) is not None:
            lines.append(f'model.load_adapter("{repo_id}", "{adapter.name}", subfolder="{adapter.name}")')
    return lines + ["```"]


def _subfolder_of(adapter: StoredAdapter) -> Optional[str]:
    """The sub-folder PEFT's layout puts ``adapter`` in (``None`` for ``default``, at the root)."""
    return None if adapter.name == "default" else adapter.name


def _location(adapter: StoredAdapter) -> str:
    """Where ``adapter`` sits in the repo, for the card."""
    return f"`{_subfolder_of(adapter)}/`" if _subfolder_of(adapter) else "repo root"


def _is_hub_model(value: Optional[str]) -> bool:
    """True if a config's ``base_model_name_or_path`` names a Hub repo, not a local folder."""
    return bool(value) and is_repo_id(value) and not Path(value).exists()
