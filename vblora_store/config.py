"""``VBLoRAConfig``: the adapter's hyper-parameters, as PEFT writes them.

The fields, their defaults and their meaning are PEFT's, so an
``adapter_config.json`` written by PEFT reads here and one written here reads in
PEFT.  Keys this class does not know (written by a newer PEFT, say) are kept in
``extra`` and written back untouched.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any, Optional, Union

from .errors import AdapterNotFoundError, InvalidConfigError, MissingConfigKeyError, read_error

__all__ = ["VBLoRAConfig", "PeftType", "CONFIG_NAME", "PEFT_TYPE", "TASK_TYPES"]

CONFIG_NAME = "adapter_config.json"
PEFT_TYPE = "VBLORA"
#: PEFT's ``TaskType`` values, the only ``task_type`` PEFT's configs accept (besides ``None``).
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
_BIAS_MODES = ("none", "all", "vblora_only")


class PeftType(str, Enum):
    """PEFT's ``PeftType``, its VB-LoRA member: a ``str`` equal to ``"VBLORA"``, so it equals PEFT's.

    Example:
        >>> PeftType.VBLORA.value, PeftType.VBLORA == "VBLORA", json.dumps(PeftType.VBLORA)
        ('VBLORA', True, '"VBLORA"')
    """

    VBLORA = PEFT_TYPE


@dataclass
class VBLoRAConfig:
    """Configuration of a VB-LoRA adapter (PEFT's ``VBLoRAConfig``).

    Args:
        r: Rank of the update ``ΔW = B @ A``.
        num_vectors: Number of vectors ``N`` in the shared vector bank.
        vector_length: Length ``L`` of each bank vector; every adapted layer's
            in and out features must be multiples of it.
        topk: How many bank vectors are mixed into each sub-vector.
        target_modules: Module names (exact or ``.``-suffix match), a regex
            matched against the full name, or ``"all-linear"``.
        exclude_modules: Names or a regex of modules never to adapt.
        save_only_topk_weights: Save top-k indices and weights instead of all
            logits: tiny, inference only.
        vblora_dropout: Dropout on the adapter's input.
        fan_in_fan_out: The base layer stores its weight as (in, out), like
            transformers' ``Conv1D``.
        bias: ``"none"``, ``"all"`` or ``"vblora_only"``: which biases train.
        modules_to_save: Modules trained in full and saved with the adapter.
        init_vector_bank_bound: The bank starts uniform in ``[-bound, bound]``.
        init_logits_std: The logits start normal with this standard deviation.
        layers_to_transform: Layer indices to adapt (with ``layers_pattern``).
        layers_pattern: Name of the ``ModuleList`` that holds the layers.
        task_type, base_model_name_or_path, revision, inference_mode,
            peft_version, auto_mapping: PEFT's common fields.
        extra: Keys of ``adapter_config.json`` this class does not know.

    Example:
        >>> cfg = VBLoRAConfig(r=4, num_vectors=256, vector_length=64,
        ...                    target_modules=["q_proj", "v_proj"])
        >>> cfg.to_dict()["peft_type"]
        'VBLORA'
    """

    r: int = 4
    num_vectors: int = 256
    vector_length: int = 256
    topk: int = 2
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    save_only_topk_weights: bool = False
    vblora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: Optional[list[str]] = None
    init_vector_bank_bound: float = 0.02
    init_logits_std: float = 0.1
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    peft_version: Optional[str] = None
    auto_mapping: Optional[dict] = None
    peft_type: PeftType = PeftType.VBLORA
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.peft_type, str) and self.peft_type.upper() == PEFT_TYPE:
            self.peft_type = PeftType.VBLORA  # PEFT's spelling (``.value``), also from "VBLORA" or PEFT's enum
        if isinstance(self.task_type, Enum):  # PEFT's TaskType: its value, equal to it
            self.task_type = self.task_type.value
        self.validate()

    def validate(self, source: str = "VBLoRAConfig") -> None:
        """Raise :class:`InvalidConfigError` naming ``source`` if a field is unusable."""
        if self.peft_type != PeftType.VBLORA:
            raise InvalidConfigError(
                f"{source}: peft_type is {self.peft_type!r}, not 'VBLORA'; "
                "vblora_store reads VB-LoRA adapters only; point it at a folder saved from a PEFT "
                "VBLoRAConfig."
            )
        for name in ("r", "num_vectors", "vector_length", "topk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidConfigError(f"{source}: {name} must be a positive integer, got {value!r}.")
        if self.topk > self.num_vectors:
            raise InvalidConfigError(
                f"{source}: topk ({self.topk}) exceeds num_vectors ({self.num_vectors}); lower topk."
            )
        if self.bias not in _BIAS_MODES:
            raise InvalidConfigError(
                f"{source}: bias must be one of {', '.join(_BIAS_MODES)}, got {self.bias!r}."
            )
        if not (isinstance(self.vblora_dropout, (int, float)) and 0.0 <= self.vblora_dropout < 1.0):
            raise InvalidConfigError(
                f"{source}: vblora_dropout must be in [0, 1), got {self.vblora_dropout!r}."
            )
        for name in ("init_vector_bank_bound", "init_logits_std"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidConfigError(f"{source}: {name} must be a finite number, got {value!r}.")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise InvalidConfigError(
                f"{source}: Invalid task type: '{self.task_type}'. Must be one of the following task types: "
                f"{', '.join(TASK_TYPES)}. (Or None.)"
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise InvalidConfigError(
                f"{source}: layers_pattern is set but layers_to_transform is not; set both or neither."
            )

    # -- dictionaries and files ------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> "VBLoRAConfig":
        """Build a config from a PEFT config dictionary; unknown keys go to ``extra``.

        Args:
            data: The parsed ``adapter_config.json``.
            source: Named in error messages (usually the file's path).

        Returns:
            The validated config.

        Example:
            >>> VBLoRAConfig.from_dict({"peft_type": "VBLORA", "r": 2}).r
            2
        """
        if not isinstance(data, dict):
            raise InvalidConfigError(f"{source}: expected a JSON object, got {type(data).__name__}.")
        if "peft_type" not in data:
            raise MissingConfigKeyError(
                f"{source}: The VBLoRAConfig config that is trying to be loaded is missing required keys: "
                "{'peft_type'}. Is this a PEFT adapter_config.json?"
            )
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        if extra:  # PEFT's warning; we also keep them and write them back on save
            warnings.warn(f"Unexpected keyword arguments {list(extra)} for class {cls.__name__}, these are ignored. "
                          f"({source}: they are kept in `extra` and written back on save.)")  # fmt: skip
        try:
            return cls(**kwargs, extra=extra)
        except InvalidConfigError as e:
            message = str(e).replace("VBLoRAConfig:", f"{source}:", 1)
            raise InvalidConfigError(message) from e

    def to_dict(self) -> dict[str, Any]:
        """The config as PEFT writes it: every field, unknown keys kept, sets as sorted lists."""
        out: dict[str, Any] = dict(self.extra)
        for f in fields(self):
            if f.name != "extra":
                value = getattr(self, f.name)
                out[f.name] = value.value if isinstance(value, Enum) else value  # "VBLORA", as PEFT writes
        return out

    @classmethod
    def from_pretrained(cls, path: Union[str, Path]) -> "VBLoRAConfig":
        """Read ``adapter_config.json`` from a folder (or the file itself).

        Example:
            >>> cfg = VBLoRAConfig.from_pretrained("fixtures/tiny-llama-vblora")
            >>> cfg.r, cfg.num_vectors, cfg.vector_length
            (4, 64, 16)
        """
        path = Path(path)
        file = path / CONFIG_NAME if path.is_dir() else path
        if not file.is_file():
            raise AdapterNotFoundError(f"{file}: no {CONFIG_NAME} here; point at a PEFT adapter folder.")
        return cls.from_dict(cls.from_json_file(file), source=str(file))

    @classmethod
    def from_json_file(cls, path_json_file: Union[str, Path]) -> dict[str, Any]:
        """The parsed JSON of a config file, as PEFT's: a dictionary, ``runtime_config`` left out.

        Example:
            >>> VBLoRAConfig.from_json_file("fixtures/tiny-llama-vblora/adapter_config.json")["peft_type"]
            'VBLORA'
        """
        file = Path(path_json_file)
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise InvalidConfigError(
                f"{file}: not valid JSON ({e}); restore the file from its source."
            ) from e
        except OSError as e:  # permissions, an I/O error: the file may be sound
            raise read_error(file, e) from e
        if isinstance(data, dict):
            data.pop("runtime_config", None)  # PEFT's run-time settings, never read from a file
        return data

    def to_json_string(self) -> str:
        """The exact text PEFT writes: two-space indent, sorted keys."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save_pretrained(self, path: Union[str, Path]) -> None:
        """Write ``adapter_config.json`` into the folder ``path`` (created if missing)."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_text(self.to_json_string(), encoding="utf-8")
