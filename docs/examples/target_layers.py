"""Adapt only some layers: ``layers_to_transform`` with ``layers_pattern``.

python docs/examples/target_layers.py [--tiny]
"""

from _common import load_base, parse_args

from vblora_store.config import VBLoRAConfig
from vblora_store.engine import VBLoRAModel

args = parse_args(__doc__)
base, _, _ = load_base(args)
config = VBLoRAConfig(
    r=4, num_vectors=256, vector_length=32,
    target_modules=["q_proj", "v_proj"],
    layers_to_transform=[0],    # only the first decoder layer...
    layers_pattern="layers",    # ...counted in the ModuleList named "layers"
)  # fmt: skip
model = VBLoRAModel(base, config)
print("adapted:", model.targeted_module_names)
assert all(".layers.0." in name for name in model.targeted_module_names)
