"""Full logits, top-k and packed storage: file size, parameter count, outputs.

python docs/examples/compare_storage_modes.py [--tiny]
"""

from pathlib import Path

import torch
from _common import load_base, parse_args

from vblora_store.config import VBLoRAConfig
from vblora_store.engine import VBLoRAModel
from vblora_store.format import convert

args = parse_args(__doc__)
base, encode, _ = load_base(args)
config = VBLoRAConfig(r=4, num_vectors=256, vector_length=32, target_modules="all-linear",
                      init_vector_bank_bound=0.5)  # fmt: skip
model = VBLoRAModel(base, config)
out = Path(args.out)
model.save_pretrained(out / "full")  # all logits: training can resume
model.save_pretrained(out / "topk", save_only_topk_weights=True)  # top-k: inference only
convert(out / "topk", out / "packed", to="packed")  # bit-packed indices, lossless: smaller still
base = model.unload()

ids = encode("Which form?")
results = {}
for form in ("full", "topk", "packed"):
    loaded = VBLoRAModel.from_pretrained(base, out / form)
    with torch.no_grad():
        results[form] = loaded(input_ids=ids).logits
    size = (out / form / "adapter_model.safetensors").stat().st_size
    print(f"{form:>6}: {size:>10,d} bytes, savable params {loaded.get_nb_savable_parameters()[0]:,d}")
    base = loaded.unload()
print(
    "same outputs:", all(torch.allclose(results["full"], results[f], atol=1e-5) for f in ("topk", "packed"))
)
