"""Serve several adapters from one model: one mixed batch, each row with its own adapter.

python docs/examples/many_adapters.py [--tiny]
"""

import torch
from _common import load_base, parse_args

from vblora_store.config import VBLoRAConfig
from vblora_store.engine import VBLoRAModel

args = parse_args(__doc__)
base, encode, _ = load_base(args)
names = ["support", "legal", "code", "poetry"]

# Four adapters, saved in top-k form (what you would ship): each a bank plus top-k indices and weights.
for seed, name in enumerate(names):
    torch.manual_seed(seed)
    config = VBLoRAConfig(
        r=4,
        num_vectors=64,
        vector_length=32,
        init_vector_bank_bound=0.5,
        target_modules=["q_proj", "v_proj", "down_proj"],
        save_only_topk_weights=True,
    )
    trained = VBLoRAModel(base, config)  # stands for a training run
    trained.save_pretrained(f"{args.out}/{name}")
    base = trained.unload()  # the plain base model again

# One model holds them all; at most three have their dense factors built at once.
model = VBLoRAModel.from_pretrained(
    base, f"{args.out}/{names[0]}", adapter_name=names[0], max_cached_factors=3
)
for name in names[1:]:
    model.load_adapter(f"{args.out}/{name}", name)

prompt = encode("Hello there")
rows = ["support", "code", "__base__", "poetry"]  # one adapter per row; "__base__": no adapter
batch = prompt.repeat(len(rows), 1)
with torch.no_grad():
    mixed = model(input_ids=batch, adapter_names=rows).logits
    same = []
    for row, name in enumerate(rows):  # the same rows, one at a time
        if name == "__base__":
            with model.disable_adapter():
                alone = model(input_ids=batch[row : row + 1]).logits
        else:
            model.set_adapter(name)
            alone = model(input_ids=batch[row : row + 1]).logits
        same.append(torch.allclose(mixed[row], alone[0], atol=1e-5))
    out = model.generate(batch, adapter_names=rows, max_new_tokens=5, do_sample=False)

print("rows match single-adapter runs:", all(same))
print("generated:", tuple(out.shape), "factors built for:", model.factor_cache.resident)
