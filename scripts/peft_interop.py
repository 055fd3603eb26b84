#!/usr/bin/env python3
"""Do HF PEFT and candle-peft read an adapter file the same way? Merge it in both and compare.

    python scripts/peft_interop.py --base BASE_DIR ADAPTER_DIR MERGED_DIR [ADAPTER_DIR MERGED_DIR ...]

For each pair, ADAPTER_DIR is an adapter written by candle-peft (adapter_config.json +
adapter_model.safetensors) and MERGED_DIR is `candle-peft merge --base BASE_DIR --adapter ADAPTER_DIR
--out MERGED_DIR`. Python PEFT loads the adapter onto BASE_DIR (an HF causal-LM folder), merges it with
merge_and_unload(), and every weight is compared with candle-peft's merge. Prints one JSON line per
adapter: the peft_type, how many weights the adapter changed, and the largest difference between the
two merges relative to the largest |change| (0 would be bit-identical). Exits non-zero if any relative
difference exceeds --tol (default 1e-5).

Needs torch, transformers, peft and safetensors (`pip install torch transformers peft`); not part of the
test suite.
"""

import argparse
import json
import os
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def load_dir(path):
    tensors = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(path, name)))
    return tensors


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True)
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument("pairs", nargs="+", help="ADAPTER_DIR MERGED_DIR ...")
    args = parser.parse_args()
    if len(args.pairs) % 2:
        parser.error("give adapters and merged folders in pairs")
    base_sd = load_dir(args.base)
    failed = False
    for adapter_dir, merged_dir in zip(args.pairs[::2], args.pairs[1::2]):
        with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
            peft_type = json.load(f)["peft_type"]
        model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
        merged_py = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().state_dict()
        merged_rs = load_dir(merged_dir)
        changed, worst_abs, largest_change = 0, 0.0, 0.0
        for name, base_t in base_sd.items():
            py_t = merged_py[name].float()
            rs_t = merged_rs[name].float()
            change = (py_t - base_t.float()).abs().max().item()
            if change > 0:
                changed += 1
                largest_change = max(largest_change, change)
            worst_abs = max(worst_abs, (py_t - rs_t).abs().max().item())
        rel = worst_abs / largest_change if largest_change > 0 else float("inf")
        ok = changed > 0 and rel <= args.tol
        failed |= not ok
        print(json.dumps({
            "adapter": adapter_dir, "peft_type": peft_type, "weights_changed": changed,
            "largest_change": largest_change, "max_abs_diff": worst_abs, "relative_diff": rel, "ok": ok,
        }))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
