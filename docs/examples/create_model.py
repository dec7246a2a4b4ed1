"""Wrap a model with a fresh, trainable VB-LoRA adapter and run it.

python docs/examples/create_model.py [--tiny]
"""

from _common import load_base, parse_args

from vblora_store.config import VBLoRAConfig
from vblora_store.engine import VBLoRAModel

args = parse_args(__doc__)
base, encode, _ = load_base(args)

config = VBLoRAConfig(
    r=4,                    # rank of each update B @ A
    num_vectors=256,        # vectors in the bank shared by every layer
    vector_length=32,       # must divide every targeted layer's in and out features
    topk=2,                 # bank vectors mixed into each sub-vector
    target_modules=["q_proj", "v_proj"],
)  # fmt: skip
model = VBLoRAModel(base, config)

model.print_trainable_parameters()
print("adapted:", model.targeted_module_names)
logits = model(input_ids=encode("Vector banks are")).logits  # called like the model itself
print("logits:", tuple(logits.shape))
