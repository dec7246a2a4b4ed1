"""Save an adapter for inference only (top-k form) and load it back.

The top-k form keeps, per sub-vector, the k bank indices and k-1 weights instead
of all N logits: a fraction of the size, and the same outputs.  It cannot be
trained further.

    python docs/examples/save_for_inference.py [--tiny]
"""

from pathlib import Path

import torch
from _common import load_base, parse_args

from vblora_store.config import VBLoRAConfig
from vblora_store.engine import VBLoRAModel

args = parse_args(__doc__)
base, encode, _ = load_base(args)
config = VBLoRAConfig(r=4, num_vectors=256, vector_length=32, target_modules=["q_proj", "v_proj"],
                      init_vector_bank_bound=0.5)  # a visible effect without training  # fmt: skip
model = VBLoRAModel(base, config).eval()
ids = encode("Top-k storage")
with torch.no_grad():
    before = model(input_ids=ids).logits

out = Path(args.out) / "inference-adapter"
model.save_pretrained(out, save_only_topk_weights=True)
print(f"saved {(out / 'adapter_model.safetensors').stat().st_size:,d} bytes to {out}")

base = model.unload()  # the plain base model again
loaded = VBLoRAModel.from_pretrained(base, out)  # frozen, in eval mode
with torch.no_grad():
    after = loaded(input_ids=ids).logits
print("same outputs:", torch.allclose(before, after, atol=1e-5))
assert torch.allclose(before, after, atol=1e-5)
