"""The GPU check's Python side (run by scripts/gpu-check.sh on a machine with a CUDA GPU, torch,
transformers, peft and tokenizers; no downloads: the models are random and built here).

    python3 scripts/gpu_check.py --bin dist/candle-peft-cuda --out out/gpu-check

Builds with a fixed seed a tiny Llama (causal LM) and a tiny BERT (sequence classification),
each with a word-level tokenizer and a data file, then checks the `candle-peft` binary's CUDA
path against its CPU path and against PEFT on the same GPU:

  train    a few LoRA steps on cpu and on cuda (same seed): per-step losses (forward and
           backward), the trained adapter's tensors and the --merge output must agree
  forward  `eval` of the cuda-trained adapter on cpu and cuda, and PEFT (the adapter loaded
           with PeftModel.from_pretrained) on the GPU: the same loss
  merge    our merged weights against PEFT's merge_and_unload() of the same adapter
  speed    LoRA steps on a larger random Llama with a bf16 base, ours (`train --base-dtype bf16
           --device cuda`) and PEFT's (bf16 base, f32 adapters): seconds per step and the ratio

Each check prints one line and goes into OUT/gpu-check.json; the exit code is 1 when any check
failed or raised.
"""
import argparse, json, math, os, random, subprocess, sys, time, traceback

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers

TOL = 2e-3  # relative, f32 on both devices (cuBLAS and the CPU gemm sum in different orders)
VOCAB = 512
SEED = 0

results = []


def record(name, ok, **info):
    results.append({"check": name, "ok": ok, **info})
    print(f"{'PASS' if ok else 'FAIL'} {name} {json.dumps(info)}", flush=True)


def check(name):
    def wrap(f):
        def run(*a, **k):
            try:
                return f(*a, **k)
            except Exception as e:  # one broken check must not hide the others
                traceback.print_exc()
                record(name, False, error=f"{type(e).__name__}: {e}")
        return run
    return wrap


def rel(a, b):
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def max_rel_tensors(a, b):
    """Largest |a−b| over the largest |a|, per tensor, worst tensor; keys must match."""
    if set(a) != set(b):
        raise ValueError(f"tensor names differ: {sorted(set(a) ^ set(b))[:5]}")
    worst = 0.0
    for k in a:
        x, y = a[k].double(), b[k].double()
        worst = max(worst, ((x - y).abs().max() / x.abs().max().clamp_min(1e-12)).item())
    return worst


# --- fixtures ---------------------------------------------------------------------------------
def words():
    return [f"w{i}" for i in range(VOCAB - 5)]


def random_text(n_words, seed):
    r = random.Random(seed)
    ws = words()
    lines, line = [], []
    for _ in range(n_words):
        # A Zipf-ish draw, so there is something to learn.
        line.append(ws[min(int(r.paretovariate(1.2)) - 1, len(ws) - 1)])
        if len(line) == 16:
            lines.append(" ".join(line))
            line = []
    return "\n".join(lines) + "\n"


def make_llama(d, hidden, inter, layers, heads, kv_heads, max_pos, text_words):
    from transformers import LlamaConfig, LlamaForCausalLM
    os.makedirs(d, exist_ok=True)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<mask>": 4}
    vocab.update({w: i + 5 for i, w in enumerate(words())})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(f"{d}/tokenizer.json")
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, max_position_embeddings=max_pos,
                      bos_token_id=1, eos_token_id=2, pad_token_id=3, rms_norm_eps=1e-5,
                      tie_word_embeddings=False)
    torch.manual_seed(SEED)
    LlamaForCausalLM(cfg).save_pretrained(d)
    with open(f"{d}/train.txt", "w") as f:
        f.write(random_text(text_words, SEED + 1))
    return d


def make_bert(d):
    from transformers import BertConfig, BertForSequenceClassification
    from tokenizers import BertWordPieceTokenizer
    os.makedirs(d, exist_ok=True)
    with open(f"{d}/vocab.txt", "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words()) + "\n")
    BertWordPieceTokenizer(f"{d}/vocab.txt", lowercase=True).save(f"{d}/tokenizer.json")
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=256, max_position_embeddings=128,
                     num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    torch.manual_seed(SEED)
    BertForSequenceClassification(cfg).save_pretrained(d)
    r = random.Random(SEED + 2)
    ws = words()
    with open(f"{d}/train.tsv", "w") as f:
        for _ in range(64):
            line = [r.choice(ws) for _ in range(r.randint(4, 20))]
            low = sum(int(w[1:]) < len(ws) // 2 for w in line)
            f.write(f"{'pos' if 2 * low > len(line) else 'neg'}\t{' '.join(line)}\n")
    return d


# --- running the binary -----------------------------------------------------------------------
def ours(bin_, *args):
    cmd = [bin_, *args, "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def train(bin_, model, task, data, out, device, extra=()):
    return ours(bin_, "train", "--model", model, "--task", task, "--data", data,
                "--method", "lora", "--out", out, "--overwrite", "--device", device, *extra)


# --- the checks -------------------------------------------------------------------------------
def compare_training(name, cpu, gpu, cpu_dir, gpu_dir):
    worst_loss = max(rel(a, b) for a, b in zip(cpu["losses"], gpu["losses"]))
    record(f"{name}/train-losses", len(cpu["losses"]) == len(gpu["losses"]) and worst_loss < TOL,
           cpu=cpu["losses"], cuda=gpu["losses"], max_rel=worst_loss)
    a = load_file(f"{cpu_dir}/adapter/adapter_model.safetensors")
    b = load_file(f"{gpu_dir}/adapter/adapter_model.safetensors")
    worst = max_rel_tensors(a, b)
    record(f"{name}/trained-adapter", worst < 10 * TOL, tensors=len(a), max_rel=worst)
    a = load_file(f"{cpu_dir}/merged/model.safetensors")
    b = load_file(f"{gpu_dir}/merged/model.safetensors")
    worst = max_rel_tensors(a, b)
    record(f"{name}/merged-cpu-vs-cuda", worst < 10 * TOL, tensors=len(a), max_rel=worst)


def compare_merge(name, peft_model, merged_dir):
    merged = {k: v.float().cpu() for k, v in peft_model.merge_and_unload().state_dict().items()}
    ours_ = load_file(f"{merged_dir}/model.safetensors")
    common = sorted(set(merged) & set(ours_))
    worst = max_rel_tensors({k: merged[k] for k in common}, {k: ours_[k] for k in common})
    record(f"{name}/merge-vs-peft", worst < TOL and len(common) > 0, tensors=len(common),
           max_rel=worst)


@check("llama")
def llama(bin_, out, steps):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    d = make_llama(f"{out}/tiny-llama", 128, 256, 2, 4, 2, 256, 4000)
    data, seq = f"{d}/train.txt", 64
    args = ["--steps", str(steps), "--batch", "4", "--seq", str(seq), "--merge", "--lr", "1e-2"]
    cpu = train(bin_, d, "causal-lm", data, f"{out}/llama-cpu", "cpu", args)
    gpu = train(bin_, d, "causal-lm", data, f"{out}/llama-cuda", "cuda", args)
    compare_training("llama", cpu, gpu, f"{out}/llama-cpu", f"{out}/llama-cuda")

    adapter = f"{out}/llama-cuda/adapter"
    ev = ["--model", d, "--adapter", adapter, "--task", "causal-lm", "--data", data, "--seq", str(seq)]
    e_cpu = ours(bin_, "eval", *ev, "--device", "cpu")
    e_gpu = ours(bin_, "eval", *ev, "--device", "cuda")
    # PEFT on the same ids: the whole text without special tokens, cut into `seq` pieces (the
    # last one partial), next-token loss over every piece, weighted by targets.
    tok = Tokenizer.from_file(f"{d}/tokenizer.json")
    ids = tok.encode(open(data).read(), add_special_tokens=False).ids
    base = AutoModelForCausalLM.from_pretrained(d).to("cuda").float()
    model = PeftModel.from_pretrained(base, adapter).eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids), seq):
            chunk = torch.tensor([ids[i:i + seq]], device="cuda")
            if chunk.shape[1] < 2:
                continue
            logits = model(input_ids=chunk).logits[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
            n += chunk.shape[1] - 1
    peft_loss = total / n
    ok = rel(e_cpu["loss"], e_gpu["loss"]) < TOL and rel(e_gpu["loss"], peft_loss) < TOL
    record("llama/forward", ok, cpu=e_cpu["loss"], cuda=e_gpu["loss"], peft=peft_loss,
           tokens=(e_gpu["tokens"], n))
    compare_merge("llama", model, f"{out}/llama-cuda/merged")


@check("nccl")
def nccl(bin_, out, steps):
    # The data-parallel path (--world-size, NCCL all-reduce of the adapter gradients) with one
    # rank: the same losses and adapter as the plain cuda run, since a one-rank sum is exact.
    d = make_llama(f"{out}/tiny-llama-nccl", 128, 256, 2, 4, 2, 256, 4000)
    data = f"{d}/train.txt"
    args = ["--steps", str(steps), "--batch", "4", "--seq", "64", "--lr", "1e-2"]
    plain = train(bin_, d, "causal-lm", data, f"{out}/nccl-plain", "cuda", args)
    one = train(bin_, d, "causal-lm", data, f"{out}/nccl-w1", "cuda", [*args, "--world-size", "1"])
    worst_loss = max(rel(a, b) for a, b in zip(plain["losses"], one["losses"]))
    record("nccl/world-size-1-losses", len(plain["losses"]) == len(one["losses"]) and
           worst_loss < TOL, plain=plain["losses"], nccl=one["losses"], max_rel=worst_loss)
    a = load_file(f"{out}/nccl-plain/adapter/adapter_model.safetensors")
    b = load_file(f"{out}/nccl-w1/adapter/adapter_model.safetensors")
    worst = max_rel_tensors(a, b)
    record("nccl/world-size-1-adapter", worst < TOL, tensors=len(a), max_rel=worst)


@check("bert")
def bert(bin_, out, steps):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification
    d = make_bert(f"{out}/tiny-bert")
    data = f"{d}/train.tsv"
    args = ["--steps", str(steps), "--batch", "16", "--seq", "32", "--merge", "--lr", "1e-2"]
    cpu = train(bin_, d, "classify", data, f"{out}/bert-cpu", "cpu", args)
    gpu = train(bin_, d, "classify", data, f"{out}/bert-cuda", "cuda", args)
    compare_training("bert", cpu, gpu, f"{out}/bert-cpu", f"{out}/bert-cuda")

    adapter = f"{out}/bert-cuda/adapter"
    ev = ["--model", d, "--adapter", adapter, "--task", "classify", "--data", data, "--seq", "32"]
    e_cpu = ours(bin_, "eval", *ev, "--device", "cpu")
    e_gpu = ours(bin_, "eval", *ev, "--device", "cuda")
    labels = json.load(open(f"{adapter}/labels.json"))["label2id"]
    tok = Tokenizer.from_file(f"{d}/tokenizer.json")
    tok.enable_truncation(32)
    base = AutoModelForSequenceClassification.from_pretrained(d).to("cuda").float()
    model = PeftModel.from_pretrained(base, adapter).eval()
    losses = []
    with torch.no_grad():
        for line in open(data):
            label, text = line.rstrip("\n").split("\t", 1)
            ids = torch.tensor([tok.encode(text).ids], device="cuda")
            logits = model(input_ids=ids).logits.float()
            target = torch.tensor([labels[label]], device="cuda")
            losses.append(torch.nn.functional.cross_entropy(logits, target).item())
    peft_loss = sum(losses) / len(losses)
    ok = rel(e_cpu["loss"], e_gpu["loss"]) < TOL and rel(e_gpu["loss"], peft_loss) < TOL
    record("bert/forward", ok, cpu=e_cpu["loss"], cuda=e_gpu["loss"], peft=peft_loss,
           accuracy=(e_cpu["accuracy"], e_gpu["accuracy"]))
    compare_merge("bert", model, f"{out}/bert-cuda/merged")


@check("speed")
def speed(bin_, out, steps, batch, seq):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    d = make_llama(f"{out}/speed-llama", 1024, 2816, 8, 16, 8, seq, batch * seq * (steps + 2))
    data = f"{d}/train.txt"
    args = ["--steps", str(steps), "--batch", str(batch), "--seq", str(seq),
            "--base-dtype", "bf16", "--warmup", "0", "--quiet"]
    r = train(bin_, d, "causal-lm", data, f"{out}/speed-ours", "cuda", args)
    ours_s = r["seconds"] / steps  # the whole run, first step (kernel JIT) included

    tok = Tokenizer.from_file(f"{d}/tokenizer.json")
    ids = tok.encode(open(data).read(), add_special_tokens=False).ids
    base = AutoModelForCausalLM.from_pretrained(d).to("cuda", torch.bfloat16)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                            weight_decay=0.01)

    def step(i):
        off = (i * batch * seq) % (len(ids) - batch * seq)
        x = torch.tensor(ids[off:off + batch * seq], device="cuda").view(batch, seq)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    start = time.perf_counter()
    for i in range(steps):
        step(i)
    torch.cuda.synchronize()
    peft_s = (time.perf_counter() - start) / steps
    record("speed/lora-bf16", True, batch=batch, seq=seq, steps=steps,
           ours_s_per_step=ours_s, peft_s_per_step=peft_s, ours_over_peft=ours_s / peft_s,
           note="both runs include their first step; ours has AdamW, schedule and clipping too")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--speed-steps", type=int, default=20)
    ap.add_argument("--speed-batch", type=int, default=8)
    ap.add_argument("--speed-seq", type=int, default=256)
    ap.add_argument("--skip-speed", action="store_true")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}", flush=True)
    llama(a.bin, a.out, a.steps)
    nccl(a.bin, a.out, a.steps)
    bert(a.bin, a.out, a.steps)
    if not a.skip_speed:
        speed(a.bin, a.out, a.speed_steps, a.speed_batch, a.speed_seq)
    with open(f"{a.out}/gpu-check.json", "w") as f:
        json.dump(results, f, indent=1)
    failed = [r["check"] for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
