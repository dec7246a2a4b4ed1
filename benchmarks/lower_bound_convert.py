"""The bare full -> top-k conversion: the lower bound ``vblora-store convert`` is measured against.

Read each tensor with safetensors' lazy reader, turn logits into PEFT's top-k
pair (``logits.topk(k)``, softmax, drop the last weight, indices to PEFT's index
dtype), pass anything else through, ``save_file`` the lot and write the config
with ``save_only_topk_weights`` true.  Nothing else: no validation, no atomic
rename, no fsync, no report.

Usage:
    python benchmarks/lower_bound_convert.py SRC DST
"""

import json
import os
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def index_dtype(n):
    # PEFT's rule: the smallest integer dtype whose range holds n
    for dtype, bound in ((torch.uint8, 2**8), (torch.int16, 2**15), (torch.int32, 2**31)):
        if n < bound:
            return dtype
    return torch.int64


def main(src, dst):
    with open(os.path.join(src, "adapter_config.json")) as f:
        config = json.load(f)
    k, idx_dtype = config["topk"], index_dtype(config["num_vectors"])
    out = {}
    with safe_open(os.path.join(src, "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():
            value = f.get_tensor(key)
            if key.endswith(("vblora_logits_A", "vblora_logits_B")):
                top, indices = value.topk(k)
                out[key + "_topk_indices"] = indices.to(idx_dtype)
                out[key + "_topk_weights"] = torch.softmax(top, dim=-1)[..., :-1].contiguous()
            else:
                out[key] = value
    os.makedirs(dst, exist_ok=True)
    save_file(out, os.path.join(dst, "adapter_model.safetensors"), metadata={"format": "pt"})
    config["save_only_topk_weights"] = True
    with open(os.path.join(dst, "adapter_config.json"), "w") as f:
        f.write(json.dumps(config, indent=2, sort_keys=True))


if __name__ == "__main__":
    main(*sys.argv[1:3])
