"""Many adapters in one batch: ``adapter_names=[...]``, the factor cache, compiled calls, the kernels.

Each row of a mixed batch must equal that row run alone with its adapter, and
PEFT's own model of that adapter is the reference.  ``VBLORA_TEST_DEVICE=cuda``
runs the same tests on a GPU (the CUDA paths); CI runs them on the CPU.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
import warnings

import peft
import pytest
import torch
from conftest_engine import BASE_KWARGS, inputs, peft_load, tiny_gpt2, tiny_llama

from vblora_store import convert
from vblora_store.engine import VBLoRAModel
from vblora_store.errors import AdapterNamesError, InvalidArgumentError

DEVICE = os.environ.get("VBLORA_TEST_DEVICE", "cpu")
ATOL = 1e-5


def peft_save(tmp_path, base, name: str, *, topk_form: bool, seed: int, **config):
    """A fresh PEFT VB-LoRA adapter of ``base`` saved in ``tmp_path/name``; (folder, PEFT model)."""
    config = {**BASE_KWARGS, **config, "save_only_topk_weights": topk_form}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        model = peft.get_peft_model(copy.deepcopy(base), peft.VBLoRAConfig(**config))
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


def run(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids.to(DEVICE), **kwargs).logits


@pytest.fixture(scope="module")
def llama_adapters(tmp_path_factory):
    """Three adapters of one tiny Llama in three forms, of different r, N, L, k and targets."""
    tmp = tmp_path_factory.mktemp("mixed")
    base = tiny_llama()
    folders = {
        "a": peft_save(tmp, base, "a", topk_form=True, seed=1, target_modules=["q_proj", "v_proj"]),
        "b": peft_save(
            tmp,
            base,
            "b",
            topk_form=False,
            seed=2,
            r=4,
            num_vectors=20,
            vector_length=32,
            topk=3,
            target_modules="all-linear",
        ),
        "c_topk": peft_save(
            tmp, base, "c_topk", topk_form=True, seed=3, r=3, target_modules=["o_proj", "down_proj"]
        ),
    }
    folders["c"] = tmp / "c_packed"
    convert(folders["c_topk"], folders["c"], to="packed")
    return base, folders


def engine_of(base, folders, names=("a", "b", "c"), **kwargs) -> VBLoRAModel:
    model = VBLoRAModel.from_pretrained(
        copy.deepcopy(base), folders[names[0]], adapter_name=names[0], **kwargs
    )
    for name in names[1:]:
        model.load_adapter(folders[name], name)
    return model.to(DEVICE).eval()


def test_each_row_equals_peft_running_it_alone(llama_adapters):
    base, folders = llama_adapters
    model = engine_of(base, folders)
    names = ["a", "b", "__base__", "c", "a", "b"]
    ids = inputs(batch=len(names), length=7)
    mixed = run(model, ids, adapter_names=names)
    for row, name in enumerate(names):
        if name == "__base__":
            reference = run(copy.deepcopy(base).to(DEVICE), ids[row : row + 1])
        else:  # PEFT's own model of that adapter (it cannot read the packed form: its top-k source)
            source = folders["c_topk" if name == "c" else name]
            reference = run(peft_load(base, source).to(DEVICE).eval(), ids[row : row + 1])
        assert torch.allclose(mixed[row : row + 1], reference, atol=ATOL), name
    assert model.active_adapter == "a"  # unchanged by the mixed call
    assert torch.allclose(run(model, ids[:1]), mixed[:1], atol=ATOL)


def test_conv1d_rows_equal_their_adapter_alone(tmp_path):
    base = tiny_gpt2()
    kwargs = dict(fan_in_fan_out=True)
    one = peft_save(
        tmp_path, base, "one", topk_form=True, seed=4, target_modules=["c_attn", "c_proj"], **kwargs
    )
    two = peft_save(tmp_path, base, "two", topk_form=False, seed=5, r=3, target_modules=["c_fc"], **kwargs)
    model = VBLoRAModel.from_pretrained(copy.deepcopy(base), one, adapter_name="one")
    model.load_adapter(two, "two")
    model.to(DEVICE).eval()
    names = ["two", "one", "__base__", "one"]
    ids = inputs(batch=4, length=5)
    mixed = run(model, ids, adapter_names=names)
    for row, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                alone = run(model, ids[row : row + 1])
        else:
            model.set_adapter(name)
            alone = run(model, ids[row : row + 1])
        assert torch.allclose(mixed[row : row + 1], alone, atol=ATOL), name


def test_unknown_keywords_reach_the_wrapped_model(llama_adapters):
    base, folders = llama_adapters
    model = engine_of(base, folders, names=("a", "b"))
    ids = inputs(batch=2, length=6)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding on the second row
    with torch.no_grad():
        out = model(
            input_ids=ids.to(DEVICE),
            attention_mask=mask.to(DEVICE),
            adapter_names=["b", "a"],
            output_hidden_states=True,
        )
    assert out.hidden_states is not None and len(out.hidden_states) == 3
    reference = peft_load(base, folders["a"]).to(DEVICE).eval()
    with torch.no_grad():
        alone = reference(input_ids=ids[1:].to(DEVICE), attention_mask=mask[1:].to(DEVICE)).logits
    assert torch.allclose(out.logits[1:, 2:], alone[:, 2:], atol=ATOL)


def test_mixed_calls_are_refused_when_they_cannot_be_served(llama_adapters):
    base, folders = llama_adapters
    model = engine_of(base, folders, names=("a", "b"))
    ids = inputs(batch=2, length=4)
    with pytest.raises(ValueError, match=r"does not hold: 'nope'.*Load them first"):
        run(model, ids, adapter_names=["a", "nope"])
    with pytest.raises(ValueError, match="3 names but the batch has 2 rows"):
        run(model, ids, adapter_names=["a", "b", "a"])
    with pytest.raises(AdapterNamesError, match="one adapter name per row"):
        run(model, ids, adapter_names="a")
    model.merge_adapter()
    with pytest.raises(ValueError, match=r"merged.*unmerge_adapter\(\)"):
        run(model, ids, adapter_names=["a", "b"])
    model.unmerge_adapter()
    expected = run(model, ids, adapter_names=["a", "b"])
    model.train()
    with pytest.raises(ValueError, match=r"training mode with gradients on.*model\.eval\(\)"):
        model(input_ids=ids.to(DEVICE), adapter_names=["a", "b"])
    assert torch.allclose(run(model, ids, adapter_names=["a", "b"]), expected, atol=ATOL)  # no_grad: allowed
    model.eval()
    assert model.active_adapter == "a" and model._route.rows is None  # a refused call leaves no route behind


def test_generate_gives_each_prompt_its_adapter(llama_adapters):
    base, folders = llama_adapters
    model = engine_of(base, folders)
    ids = inputs(batch=3, length=4).to(DEVICE)
    names = ["b", "__base__", "c"]
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    for extra in ({}, {"num_beams": 2, "num_return_sequences": 2}):
        mixed = model.generate(ids, adapter_names=names, **kwargs, **extra)
        per_prompt = mixed.shape[0] // 3
        for row, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model.generate(ids[row : row + 1], **kwargs, **extra)
            else:
                model.set_adapter(name)
                alone = model.generate(ids[row : row + 1], **kwargs, **extra)
            assert torch.equal(mixed[row * per_prompt : (row + 1) * per_prompt], alone), (name, extra)
        model.set_adapter("a")


def test_modules_to_save_rows_use_their_own_copy(tmp_path):
    base = tiny_llama(classifier=True)
    folders = {}
    for seed, name in ((6, "x"), (7, "y")):
        config = {**BASE_KWARGS, "target_modules": ["q_proj"], "task_type": "SEQ_CLS"}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(seed)
            theirs = peft.get_peft_model(copy.deepcopy(base), peft.VBLoRAConfig(**config))
        with torch.no_grad():  # a head of its own, as training would leave it
            theirs.base_model.model.score.modules_to_save["default"].weight.normal_()
        theirs.save_pretrained(tmp_path / name)
        folders[name] = tmp_path / name
    model = VBLoRAModel.from_pretrained(copy.deepcopy(base), folders["x"], adapter_name="x")
    model.load_adapter(folders["y"], "y")
    model.to(DEVICE).eval()
    names = ["y", "x", "__base__", "y"]
    ids = inputs(batch=4, length=5)
    mixed = run(model, ids, adapter_names=names)
    for row, name in enumerate(names):
        if name == "__base__":
            reference = run(copy.deepcopy(base).to(DEVICE), ids[row : row + 1])
        else:
            reference = run(peft_load(base, folders[name]).to(DEVICE).eval(), ids[row : row + 1])
        assert torch.allclose(mixed[row : row + 1], reference, atol=ATOL), name


def test_factor_cache_bound_evicts_the_least_recently_used(llama_adapters):
    base, folders = llama_adapters
    model = engine_of(base, folders, max_cached_factors=2)
    alone = {}
    ids = inputs(batch=1, length=5)
    for name in ("a", "b", "c"):
        model.set_adapter(name)
        alone[name] = run(model, ids)
    assert model.factor_cache.resident == ["b", "c"] and model.factor_cache.stats.evictions == 1
    assert model.factor_cache.num_slots == 3  # two adapters' slots and the zero slot, never more
    both = run(model, ids.repeat(2, 1), adapter_names=["a", "c"])  # "a" comes back, "b" goes
    assert model.factor_cache.resident == ["a", "c"]  # used in the batch's order
    assert torch.allclose(both[0], alone["a"][0], atol=ATOL) and torch.allclose(
        both[1], alone["c"][0], atol=ATOL
    )
    with pytest.raises(ValueError, match="3 adapters at once but max_cached_factors is 2"):
        run(model, ids.repeat(3, 1), adapter_names=["a", "b", "c"])
    model.max_cached_factors = 1
    assert model.factor_cache.resident == ["c"]
    stacks = [layer.factor_slots for layer in model.factor_cache.layers]
    assert {s.a.shape[0] for s in stacks} == {
        2
    } and model.factor_cache.num_slots == 2  # shrunk: "c" and zeros
    model.set_adapter("c")
    assert torch.allclose(run(model, ids), alone["c"], atol=ATOL)  # "c" moved to slot 1, still built
    assert model.factor_cache.stats.evictions == 3  # "b" in the batch of three, then "a": no rebuild of "c"
    model.max_cached_factors = None
    three = run(model, ids.repeat(3, 1), adapter_names=["a", "b", "c"])
    for row, name in enumerate("abc"):
        assert torch.allclose(three[row], alone[name][0], atol=ATOL)
    for value in (0, True, "3", 2.0):
        with pytest.raises(InvalidArgumentError, match="positive integer"):
            model.max_cached_factors = value


def test_editing_an_adapter_in_place_rebuilds_its_factors(llama_adapters):
    base, folders = llama_adapters
    model = engine_of(base, folders, names=("a", "b"))
    ids = inputs(batch=2, length=5)
    before = run(model, ids, adapter_names=["a", "b"])
    with torch.no_grad():
        model.vblora_vector_bank["a"].mul_(3)
    after = run(model, ids, adapter_names=["a", "b"])
    assert not torch.allclose(before[0], after[0], atol=1e-3)
    assert torch.equal(before[1], after[1])
    assert torch.allclose(after[:1], run(model, ids[:1]), atol=ATOL)


def test_loading_and_deleting_touch_no_other_adapter(llama_adapters):
    base, folders = llama_adapters
    model = engine_of(base, folders, names=("a", "b"))
    ids = inputs(batch=1, length=5)
    first = run(model, ids, adapter_names=["a"])
    held = [model.vblora_vector_bank["a"], *model.vblora_topk["a"].buffers()]
    pointers, values = [t.data_ptr() for t in held], [t.clone() for t in held]
    slot = model.factor_cache.slot_of("a")
    model.load_adapter(folders["c"], "c")
    run(model, ids, adapter_names=["c"])
    model.delete_adapter("b")
    held = [model.vblora_vector_bank["a"], *model.vblora_topk["a"].buffers()]
    assert [t.data_ptr() for t in held] == pointers
    assert all(torch.equal(t, v) for t, v in zip(held, values))
    assert model.factor_cache.slot_of("a") == slot
    assert torch.equal(run(model, ids, adapter_names=["a"]), first)
    with pytest.raises(ValueError, match="does not hold: 'b'"):
        run(model, ids, adapter_names=["b"])


def test_resident_adapters_hold_their_top_k_tensors_only(llama_adapters):
    """A loaded top-k adapter is its bank plus two flat tensors: no logits, no factors until it runs."""
    from safetensors import safe_open

    base, folders = llama_adapters
    model = engine_of(base, folders, names=("a",))
    with safe_open(str(folders["a"] / "adapter_model.safetensors"), "pt") as f:
        stored = sum(f.get_tensor(k).nbytes for k in f.keys())
    resident = model.vblora_vector_bank["a"].nbytes + sum(t.nbytes for t in model.vblora_topk["a"].buffers())
    assert resident == stored
    assert len(list(model.vblora_topk["a"].buffers())) == 2
    assert all(layer.factor_slots.a.shape[0] <= 1 for layer in model.factor_cache.layers)
    run(model, inputs(batch=1, length=3))
    assert all(layer.factor_slots.a.shape[0] >= 2 for layer in model.factor_cache.layers)


def test_compiled_calls_have_no_graph_break_in_the_adapter_layers(llama_adapters):
    """One graph for the whole wrapped model; another mix of adapters recompiles nothing."""
    import torch._dynamo as dynamo

    base, folders = llama_adapters
    model = engine_of(base, folders)
    ids = inputs(batch=4, length=3).to(DEVICE)
    dynamo.reset()
    with torch.no_grad():
        explained = dynamo.explain(model)(input_ids=ids, adapter_names=["a", "b", "c", "__base__"])
    assert explained.graph_count == 1
    engine_files = ("layer.py", "batched.py", "routing.py", "cache.py", "trainable.py")
    for reason in explained.break_reasons:
        frames = [frame.filename for frame in reason.user_stack]
        assert not any(f.endswith(engine_files) for f in frames), reason.reason
    dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    names = [["a", "b", "c", "__base__"], ["c", "c", "a", "b"]]
    with torch.no_grad():
        compiled(input_ids=ids, adapter_names=names[0])
        compiled(input_ids=ids)
        with dynamo.config.patch(error_on_recompile=True):
            again = compiled(input_ids=ids, adapter_names=names[1]).logits
            model.set_adapter("b")
            single = compiled(input_ids=ids).logits
        assert torch.allclose(again, model(input_ids=ids, adapter_names=names[1]).logits, atol=ATOL)
        assert torch.allclose(single, model(input_ids=ids).logits, atol=ATOL)
    dynamo.reset()


_KERNEL_CHECK = textwrap.dedent("""
    import itertools, torch
    import triton.runtime.interpreter as interpreter
    # Triton 3.6's interpreter calls int() on a 1-element array, which NumPy >= 2.3 refuses.
    _patch = interpreter._patch_lang_tensor
    def _patched(tensor, scope):
        _patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
    interpreter._patch_lang_tensor = _patched
    from vblora_store.engine import triton_kernels as tk
    from vblora_store.engine.batched import add_lora_reference
    g = torch.Generator().manual_seed(0)
    configs = [tk.DEFAULT_CONFIG, tk.KernelConfig("fused", 64, 32, 7, 4), tk.KernelConfig("split", 16, 32, 50, 4)]
    worst = 0.0
    for config, (rows, tokens, n_in, n_out, rank, slots) in itertools.product(
        configs, [(5, 1, 40, 70, 3, 4), (3, 2, 48, 33, 4, 3), (1, 1, 16, 16, 1, 2), (4, 4, 8, 1100, 2, 5)]
    ):
        a = torch.randn(slots, rank, n_in, generator=g)
        bt = torch.randn(slots, rank, n_out, generator=g)
        ranks = torch.randint(1, rank + 1, (slots,), generator=g, dtype=torch.int32)
        ranks[0] = 0
        for s in range(slots):
            a[s, ranks[s]:], bt[s, ranks[s]:] = 0, 0
        row_slots = torch.randint(0, slots, (rows,), generator=g)
        row_slots[0] = 0
        x = torch.randn(rows, tokens, n_in, generator=g)
        result = torch.randn(rows, tokens, n_out, generator=g)
        got = tk.add_lora_kernel(x, result, a, bt, ranks, row_slots, config)
        ref = add_lora_reference(x.double(), result.double(), a.double(), bt.double(), row_slots)
        assert torch.equal(got[0], result[0]), "a row without adapter must be the base output exactly"
        worst = max(worst, float(((got.double() - ref).abs() / (1 + ref.abs())).max()))
    print(worst)
""")


def test_triton_kernels_match_the_reference():
    """Both decode kernels, in Triton's CPU interpreter, on odd sizes, empty slots, several tokens a row."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _KERNEL_CHECK], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.strip().splitlines()[-1]) < 1e-5


def test_dropout_applies_per_row_in_training_mode_without_gradients(tmp_path):
    base = tiny_llama()
    drop = peft_save(
        tmp_path, base, "drop", topk_form=False, seed=8, target_modules=["q_proj"], vblora_dropout=0.9
    )
    keep = peft_save(tmp_path, base, "keep", topk_form=False, seed=9, target_modules=["q_proj"])
    model = VBLoRAModel.from_pretrained(copy.deepcopy(base), keep, adapter_name="keep")
    model.load_adapter(drop, "drop")
    model.to(DEVICE).eval()
    ids = inputs(batch=2, length=6)
    expected = run(model, ids, adapter_names=["keep", "drop"])
    model.train()
    torch.manual_seed(0)
    noisy = run(model, ids, adapter_names=["keep", "drop"])
    assert torch.allclose(noisy[0], expected[0], atol=ATOL)  # p = 0: unchanged
    assert not torch.allclose(noisy[1], expected[1], atol=1e-3)  # p = 0.9: dropped


def test_a_model_cast_under_inference_mode_still_builds_factors(llama_adapters):
    """Casting under ``torch.inference_mode()`` makes inference tensors of the stacks: they must stay writable."""
    base, folders = llama_adapters
    model = engine_of(base, folders, names=("a", "b"))
    ids = inputs(batch=2, length=4)
    with torch.inference_mode():
        before = model(input_ids=ids.to(DEVICE), adapter_names=["a", "b"]).logits
        model.double()
        after = model(input_ids=ids.flip(0).to(DEVICE), adapter_names=["b", "a"]).logits
    assert after.dtype == torch.float64
    assert torch.allclose(after.flip(0).float(), before, atol=1e-5)
