#!/usr/bin/env python3
"""HF PEFT on PyTorch running the benchmark workloads of `candle-peft bench`, for ratios taken on one machine.

    python scripts/peft_reference.py <workload> [--base DIR] [--minilm DIR]

Workloads (the same definitions as `candle-peft bench <workload>`), each printing one JSON line:
  minilm-lora-train    all-MiniLM-L6-v2, LoRA r=8 alpha=16 on query,value, batch 16 x 64, loss
                       mean(last_hidden_state^2), AdamW lr 1e-4; median ms/step of steps 3..12
  smollm2-lora-train   SmolLM2-135M f32, LoRA r=16 alpha=32 on the seven projections, batch 4 x 128,
                       causal-LM loss, AdamW lr 1e-4; median ms/step of steps 3..8, peak RSS
  gemma3-lora-train    Gemma 3 270M, the same LoRA, batch and loss as smollm2-lora-train; the weights are
                       the GGUF's, dequantised by transformers (`--gemma`, needs the `gguf` package)
  smollm2-merge        load base + that LoRA (random B), merge_and_unload, save_pretrained; wall time
                       and peak RSS of a child process doing only that
  svd-init-smollm2     torch.linalg.svd (thin) of all 210 projection matrices; wall time

`--base-dtype bf16` loads the base of the training workloads in bfloat16 (`dtype=torch.bfloat16`; PEFT
keeps the LoRA weights in float32, its default `autocast_adapter_dtype=True`), the PyTorch side of
`candle-peft bench ... --base-dtype bf16`.

`--base` is SmolLM2 as an HF folder; `candle-peft train --model models/SmolLM2-135M-Instruct.Q4_1.gguf
--task causal-lm --data data/shakespeare/valid.txt --method lora --steps 0 --merge --out DIR` writes
one to DIR/merged. Needs torch, transformers and peft (not installed by the project's scripts:
`pip install torch transformers peft`). Not part of the test suite.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

SMOLLM2_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peak_rss_mb(who=resource.RUSAGE_SELF):
    return resource.getrusage(who).ru_maxrss / 1024.0


def vm_hwm_mb():
    """This process's own peak RSS: unlike ru_maxrss, VmHWM does not count the pages a child
    shared with its parent before exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return peak_rss_mb()


def rss_mb():
    """This process's resident memory now (VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def base_dtype(args):
    return {"f32": torch.float32, "bf16": torch.bfloat16}[args.base_dtype]


def median_after(times, skip):
    return statistics.median(times[skip:])


def minilm_lora_train(args):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    torch.manual_seed(0)
    model = AutoModel.from_pretrained(args.minilm, dtype=base_dtype(args))
    model_rss_mb = rss_mb()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]))
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (16, 64))
    mask = torch.ones_like(ids)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    steps, losses = [], []
    for _ in range(12):
        t = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        loss = out.pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        steps.append((time.perf_counter() - t) * 1e3)
    return {"ms_per_step": median_after(steps, 2), "steps_ms": steps, "losses": losses,
            "model_rss_mb": model_rss_mb, "peak_rss_mb": peak_rss_mb()}


def smollm2_lora_train(args):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=base_dtype(args))
    return _decoder_lora_train(model)


def gemma3_lora_train(args):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    folder, name = os.path.split(os.path.abspath(args.gemma))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=base_dtype(args))
    return _decoder_lora_train(model)


def _decoder_lora_train(model):
    from peft import LoraConfig, get_peft_model

    model_rss_mb = rss_mb()
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, target_modules=SMOLLM2_TARGETS, task_type="CAUSAL_LM")
    )
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (4, 128))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    steps, forward, backward, losses = [], [], [], []
    for _ in range(8):
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        t_fwd = time.perf_counter()
        loss.backward()
        t_bwd = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        end = time.perf_counter()
        steps.append((end - t) * 1e3)
        forward.append((t_fwd - t) * 1e3)
        backward.append((t_bwd - t_fwd) * 1e3)
    return {
        "ms_per_step": median_after(steps, 2),
        "forward_ms": median_after(forward, 2),
        "backward_ms": median_after(backward, 2),
        "steps_ms": steps,
        "losses": losses,
        "model_rss_mb": model_rss_mb,
        "peak_rss_mb": peak_rss_mb(),
    }


def smollm2_merge(args):
    with tempfile.TemporaryDirectory() as work:
        adapter_dir = os.path.join(work, "adapter")
        out_dir = os.path.join(work, "merged")
        # Each step in a child of its own, so that only the merge's memory is measured.
        subprocess.run(
            [sys.executable, __file__, "_write-random-lora", "--base", args.base, "--out", adapter_dir],
            check=True,
        )
        t = time.perf_counter()
        merge = subprocess.run(
            [sys.executable, __file__, "_merge", "--base", args.base, "--adapter", adapter_dir, "--out", out_dir],
            check=True,
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - t
        peak = json.loads(merge.stdout.strip().splitlines()[-1])["merge_peak_rss_mb"]
        return {"seconds": seconds, "merge_peak_rss_mb": peak}


def _write_random_lora(args):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    config = LoraConfig(r=16, lora_alpha=32, target_modules=SMOLLM2_TARGETS, init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(args.out)
    return None


def _merge(args):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, args.adapter).merge_and_unload()
    model.save_pretrained(args.out)
    print(json.dumps({"merge_peak_rss_mb": vm_hwm_mb()}))
    return None


def svd_init_smollm2(args):
    from safetensors.torch import load_file

    tensors = {}
    for name in sorted(os.listdir(args.base)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(args.base, name)))
    mats = [t for k, t in sorted(tensors.items()) if any(f"{p}.weight" in k for p in SMOLLM2_TARGETS)]
    t = time.perf_counter()
    for w in mats:
        torch.linalg.svd(w, full_matrices=False)
    return {"seconds": time.perf_counter() - t, "matrices": len(mats)}


WORKLOADS = {
    "minilm-lora-train": minilm_lora_train,
    "smollm2-lora-train": smollm2_lora_train,
    "gemma3-lora-train": gemma3_lora_train,
    "smollm2-merge": smollm2_merge,
    "svd-init-smollm2": svd_init_smollm2,
    "_write-random-lora": _write_random_lora,
    "_merge": _merge,
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workload", choices=sorted(WORKLOADS))
    parser.add_argument("--base", help="SmolLM2-135M as an HF folder")
    parser.add_argument("--minilm", default="models/all-MiniLM-L6-v2")
    parser.add_argument("--gemma", default="models/gemma-3-270m-q4_k_m.gguf")
    parser.add_argument("--adapter")
    parser.add_argument("--out")
    parser.add_argument("--base-dtype", default="f32", choices=["f32", "bf16"])
    args = parser.parse_args()
    if args.workload.startswith("smollm2") or args.workload.startswith("svd") or args.workload.startswith("_"):
        if not args.base:
            parser.error(f"{args.workload} needs --base (SmolLM2 as an HF folder)")
    result = WORKLOADS[args.workload](args)
    if result is not None:
        result.update(
            {"workload": args.workload, "base_dtype": args.base_dtype, "torch": torch.__version__, "threads": torch.get_num_threads(),
             "cpu_capability": torch.backends.cpu.get_cpu_capability()}
        )
        print(json.dumps(result))


if __name__ == "__main__":
    main()
