"""Hold two adapters on one model and switch between them.

python docs/examples/two_adapters.py [--tiny]
"""

import torch
from _common import load_base, parse_args

from vblora_store.config import VBLoRAConfig
from vblora_store.engine import VBLoRAModel

args = parse_args(__doc__)
base, encode, _ = load_base(args)
common = dict(r=4, num_vectors=256, vector_length=32, init_vector_bank_bound=0.5)

model = VBLoRAModel(base, VBLoRAConfig(**common, target_modules=["q_proj", "v_proj"]), adapter_name="chat")
model.add_adapter(
    "code", VBLoRAConfig(**common, target_modules=["o_proj", "down_proj"])
)  # each has its own bank
model.eval()

ids = encode("def hello():")
with torch.no_grad():
    for name in ("chat", "code"):
        model.set_adapter(name)
        print(name, "->", model(input_ids=ids).logits[0, -1, :4].tolist())
    with model.disable_adapter():
        print("base ->", model(input_ids=ids).logits[0, -1, :4].tolist())

model.save_pretrained(f"{args.out}/adapters")  # "chat" and "code" in sub-folders, PEFT's layout
model.delete_adapter("code")
print("left:", list(model.peft_config), "active:", model.active_adapter)
