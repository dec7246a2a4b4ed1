"""Choose modules with a regular expression, and leave some out with ``exclude_modules``.

A string ``target_modules`` must match a module's whole name; a list entry
matches a name equal to it or ending in ``.<entry>``.

    python docs/examples/regex_targets.py [--tiny]
"""

from _common import load_base, parse_args

from vblora_store.config import VBLoRAConfig
from vblora_store.engine import VBLoRAModel

args = parse_args(__doc__)
base, _, _ = load_base(args)
config = VBLoRAConfig(
    r=4, num_vectors=256, vector_length=32,
    target_modules=r".*\.(self_attn|mlp)\.\w+_proj",    # every attention and MLP projection...
    exclude_modules=["o_proj", "down_proj"],            # ...but the two output projections
)  # fmt: skip
model = VBLoRAModel(base, config)
for name in model.targeted_module_names:
    print(name)
assert not any(name.endswith(("o_proj", "down_proj")) for name in model.targeted_module_names)
