"""Train a VB-LoRA adapter with transformers' Trainer, then save it.

python docs/examples/train_with_trainer.py [--tiny]
"""

import torch
from _common import load_base, parse_args
from transformers import Trainer, TrainingArguments

from vblora_store.config import VBLoRAConfig
from vblora_store.engine import VBLoRAModel

args = parse_args(__doc__)
base, encode, _ = load_base(args)
model = VBLoRAModel(
    base, VBLoRAConfig(r=4, num_vectors=256, vector_length=32, target_modules=["q_proj", "v_proj"])
)

text = "VB-LoRA shares one vector bank across all layers. " * 4
ids = encode(text)[0, :64]
dataset = [{"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}] * 16

training = TrainingArguments(
    output_dir=f"{args.out}/checkpoints", max_steps=8, per_device_train_batch_size=4, learning_rate=1e-2,
    logging_steps=4, save_strategy="no", report_to=[], disable_tqdm=True,
    use_cpu=not torch.cuda.is_available(),
)  # fmt: skip
trainer = Trainer(model=model, args=training, train_dataset=dataset)
result = trainer.train()
print(f"final training loss: {result.training_loss:.4f}")

model.save_pretrained(f"{args.out}/adapter")  # PEFT's layout; PeftModel.from_pretrained reads it too
print("saved to", f"{args.out}/adapter")
