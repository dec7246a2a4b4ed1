"""Generate text through an adapter loaded from its top-k file.

The factors A and B are built once, on the first token, and cached: each
further token costs a rank-r LoRA, with no top-k or softmax.

    python docs/examples/generate_text.py [--tiny]
"""

import torch
from _common import load_base, parse_args

from vblora_store.config import VBLoRAConfig
from vblora_store.engine import VBLoRAModel

args = parse_args(__doc__)
base, encode, decode = load_base(args)
config = VBLoRAConfig(r=4, num_vectors=256, vector_length=32, target_modules=["q_proj", "v_proj"])
fresh = VBLoRAModel(base, config)  # stands in for a trained adapter
fresh.save_pretrained(f"{args.out}/adapter", save_only_topk_weights=True)
base = fresh.unload()

model = VBLoRAModel.from_pretrained(base, f"{args.out}/adapter")
prompt = encode("Once upon a time")
with torch.no_grad():
    out = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
print("generated:", repr(decode(out[0, prompt.shape[1] :])))
