"""Load adapters without allocating a random adapter first.

``from_pretrained`` builds the adapter straight from the file's tensors, so it
never holds a throw-away random copy; ``low_cpu_mem_usage=True`` is accepted for
PEFT compatibility.  To build the structure first and fill it later, create the
adapter on the ``meta`` device and ``load_adapter`` into the same name.

    python docs/examples/low_cpu_memory.py [--tiny]
"""

import torch
from _common import load_base, parse_args

from vblora_store.config import VBLoRAConfig
from vblora_store.engine import VBLoRAModel

args = parse_args(__doc__)
base, encode, _ = load_base(args)
config = VBLoRAConfig(r=4, num_vectors=256, vector_length=32, target_modules=["q_proj", "v_proj"])

trained = VBLoRAModel(base, config)
trained.save_pretrained(f"{args.out}/adapter")
base = trained.unload()

skeleton = VBLoRAModel(base, config, low_cpu_mem_usage=True)  # adapter tensors on "meta": no memory
print("bank before loading:", skeleton.vblora_vector_bank["default"].device)
skeleton.load_adapter(f"{args.out}/adapter", "default")  # replaces the placeholder
print("bank after loading: ", skeleton.vblora_vector_bank["default"].device)

base = skeleton.unload()
model = VBLoRAModel.from_pretrained(base, f"{args.out}/adapter", low_cpu_mem_usage=True)
with torch.no_grad():
    print("logits:", tuple(model(input_ids=encode("low memory")).logits.shape))
