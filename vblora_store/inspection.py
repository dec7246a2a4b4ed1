"""What ``vblora-store inspect`` shows: an adapter's form, config, modules and tensors."""

from __future__ import annotations

import json
from dataclasses import dataclass

from .dtypes import name_of
from .format.stored import StoredAdapter
from .results import Result

__all__ = ["CONFIG_ESSENTIALS", "describe", "Inspection"]

CONFIG_ESSENTIALS = (
    "r",
    "num_vectors",
    "vector_length",
    "topk",
    "save_only_topk_weights",
    "target_modules",
    "modules_to_save",
    "fan_in_fan_out",
    "bias",
    "task_type",
    "base_model_name_or_path",
)


def describe(adapter: StoredAdapter) -> dict:
    """A JSON-ready description of one stored adapter: the tensors as the file stores them.

    Example:
        >>> from vblora_store import read_adapters
        >>> describe(read_adapters("fixtures/tiny-llama-vblora")[0])["form"]
        'full'
    """
    return {
        "path": str(adapter.folder),
        "adapter_name": adapter.name,
        "form": adapter.form.value,
        "weights_file": adapter.weights_path.name,
        "file_bytes": adapter.file_bytes,
        "config": {key: getattr(adapter.config, key) for key in CONFIG_ESSENTIALS},
        "modules": [vars(m) for m in adapter.modules.values()],
        "tensors": [
            {
                "key": key,
                "dtype": name_of(spec.dtype),
                "shape": list(spec.shape),
                "bytes": spec.nbytes,
            }
            for key, spec in adapter.stored_specs.items()
        ],
        "packing": adapter.packing.info() if adapter.packing is not None else {},
    }


@dataclass
class Inspection(Result):
    """What ``inspect`` shows of some adapters (it always passes).

    Example:
        >>> from vblora_store.format import read_adapters
        >>> Inspection.of(read_adapters("fixtures/tiny-llama-vblora")).render("markdown").splitlines()[0]
        '| adapter | form | weights file | bytes | modules | tensors |'
    """

    descriptions: list[dict]

    @classmethod
    def of(cls, adapters: list[StoredAdapter]) -> "Inspection":
        return cls([describe(a) for a in adapters])

    def json(self) -> str:
        """``{"adapters": [...]}`` with two-space indent."""
        return json.dumps({"adapters": self.descriptions}, indent=2)

    def markdown(self) -> str:
        lines = ["| adapter | form | weights file | bytes | modules | tensors |", "|---|---|---|--:|--:|--:|"]
        lines += [
            f"| `{d['path']}` `{d['adapter_name']}` | {d['form']} | {d['weights_file']} | {d['file_bytes']:,} "
            f"| {len(d['modules'])} | {len(d['tensors'])} |"
            for d in self.descriptions
        ]
        return "\n".join(lines)

    def text(self) -> str:
        """Aligned text: a header line, the config, one line per module and per tensor."""
        return _text(self.descriptions)


def _text(descriptions: list[dict]) -> str:
    lines = []
    for d in descriptions:
        cfg = d["config"]
        lines += [
            f"{d['path']} [{d['adapter_name']}]: {d['form']} form, {d['weights_file']} {d['file_bytes']:,} bytes",
            "  config: " + ", ".join(f"{k}={cfg[k]}" for k in CONFIG_ESSENTIALS if cfg[k] is not None),
            f"  modules ({len(d['modules'])}):",
        ]
        width = max((len(m["name"]) for m in d["modules"]), default=0)
        lines += [
            f"    {m['name']:<{width}}  in={m['in_features']:<6} out={m['out_features']}"
            for m in d["modules"]
        ]
        lines.append(f"  tensors ({len(d['tensors'])}, {sum(t['bytes'] for t in d['tensors']):,} bytes):")
        width = max((len(t["key"]) for t in d["tensors"]), default=0)
        lines += [
            f"    {t['key']:<{width}}  {t['dtype']:<8} {str(t['shape']):<16} {t['bytes']:>12,}"
            for t in d["tensors"]
        ]
    return "\n".join(lines)
