"""Bank-vector usage counts and the report's --plot."""

import torch
from safetensors import safe_open

from conftest import run_cli
from vblora_store.accounting import account
from vblora_store.format import convert, read_adapters
from vblora_store.usage import bank_usage


def test_usage_counts_every_selected_index_of_peft_topk(peft_saves):
    """Counts equal a bincount of every index PEFT stored; they add up to slots · k."""
    adapter = read_adapters(peft_saves.topk)[0]
    expected = torch.zeros(adapter.config.num_vectors, dtype=torch.int64)
    with safe_open(str(peft_saves.topk / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():
            if key.endswith("_topk_indices"):
                expected += torch.bincount(f.get_tensor(key).long().flatten(), minlength=len(expected))
    usage = bank_usage(adapter)
    assert torch.equal(usage.counts, expected)
    assert int(usage.counts.sum()) == account(adapter).slots * adapter.config.topk
    assert usage.unused == [i for i, c in enumerate(expected.tolist()) if c == 0]


def test_usage_is_the_same_in_every_form(peft_saves, tmp_path):
    """Full (top-k taken from the logits), top-k and packed adapters give the same counts."""
    convert(peft_saves.full, tmp_path / "packed", to="packed")
    counts = [
        bank_usage(read_adapters(p)[0]).counts
        for p in (peft_saves.full, peft_saves.topk, tmp_path / "packed")
    ]
    assert torch.equal(counts[0], counts[1]) and torch.equal(counts[1], counts[2])


def test_report_plot_writes_a_png_and_names_unused_vectors(single_copy, tmp_path):
    """--plot writes a PNG and says on stderr how many vectors no slot uses."""
    result = run_cli("report", single_copy, "--plot", tmp_path / "usage.png")
    assert result.exit_code == 0
    assert (tmp_path / "usage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    unused = len(bank_usage(read_adapters(single_copy)[0]).unused)
    assert f"{unused} of 64 bank vectors unused" in result.stderr
