"""How many parameters a VB-LoRA adapter stores, beside a LoRA of the same rank.

python docs/examples/parameter_efficiency.py [--tiny]
"""

from _common import load_base, parse_args

from vblora_store.config import VBLoRAConfig
from vblora_store.engine import VBLoRAModel

args = parse_args(__doc__)
base, _, _ = load_base(args)
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
model = VBLoRAModel(base, VBLoRAConfig(r=4, num_vectors=256, vector_length=32, target_modules=targets))

model.print_trainable_parameters()  # what training updates (the bank and all logits)
full, _ = model.get_nb_savable_parameters()
model.peft_config["default"].save_only_topk_weights = True
topk, _ = model.get_nb_savable_parameters()  # float32-equivalent: int16 indices count half

layers = [model.model.get_submodule(name) for name in model.targeted_module_names]
lora = sum(4 * (layer.in_features + layer.out_features) for layer in layers)
print(f"LoRA r=4 on the same layers: {lora:,d} parameters")
print(f"VB-LoRA, full logits:        {full:,d}")
print(f"VB-LoRA, top-k form:         {topk:,d}  ({100 * topk / lora:.1f}% of LoRA)")
