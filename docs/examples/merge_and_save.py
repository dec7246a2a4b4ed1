"""Merge the adapter into the weights and save a plain transformers model.

python docs/examples/merge_and_save.py [--tiny]
"""

import torch
from _common import load_base, parse_args
from transformers import AutoModelForCausalLM

from vblora_store.config import VBLoRAConfig
from vblora_store.engine import VBLoRAModel

args = parse_args(__doc__)
base, encode, _ = load_base(args)
config = VBLoRAConfig(r=4, num_vectors=256, vector_length=32, target_modules=["q_proj", "v_proj"],
                      init_vector_bank_bound=0.5)  # fmt: skip
model = VBLoRAModel(base, config).eval()
ids = encode("Merged weights")
with torch.no_grad():
    adapted = model(input_ids=ids).logits

merged = model.merge_and_unload()  # the original model object, no wrapper left, ΔW = B @ A added
merged.save_pretrained(f"{args.out}/merged")
reloaded = AutoModelForCausalLM.from_pretrained(f"{args.out}/merged").eval()
with torch.no_grad():
    same = torch.allclose(reloaded(input_ids=ids).logits, adapted, atol=1e-4)
print(f"saved {type(merged).__name__} to {args.out}/merged; same outputs: {same}")
assert same
