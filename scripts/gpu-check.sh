#!/usr/bin/env bash
# The prepared check of the GPU path, in two halves: build here, run on a lent GPU machine
# (CUDA 13 driver, torch, transformers, peft; no Rust toolchain, no internet).
#
#   bash scripts/gpu-check.sh build   # here: a stripped release binary with --features nccl,
#                                     # dist/candle-peft-cuda.gz (git-ignored; carry "dist")
#   bash scripts/gpu-check.sh run     # there: checks it against our CPU path and PEFT
#
# `run` puts torch's CUDA 13 libraries (the nvidia-* wheels beside torch: cuBLAS, cuRAND, NVRTC,
# the runtime) on LD_LIBRARY_PATH, shows what the binary still cannot resolve, then runs
# scripts/gpu_check.py: LoRA training, forward, backward and merge on a seeded random tiny Llama
# and BERT, cpu against cuda and against PEFT, the NCCL data-parallel path at world size 1
# against the plain cuda run, and LoRA steps in bf16 timed beside PEFT's. torch's NCCL wheel
# (nvidia-nccl-cu13) provides libnccl.so.2.
# Results: one PASS/FAIL line per check, and out/gpu-check/gpu-check.json (GPU_CHECK_WORK moves
# the folder), copied with the log to $OUT when the device tool sets it. Not yet timed on a GPU:
# expected a few minutes, most of it the speed comparison (GPU_CHECK_ARGS=--skip-speed leaves
# it out); give the device call a timeout that leaves room for a second try.
set -euo pipefail
cd "$(dirname "$0")/.."

bin=${CANDLE_PEFT_BIN:-dist/candle-peft-cuda}

case ${1:-} in
build)
    # nccl is cuda plus the data-parallel path, whose world-size-1 run the check includes.
    eval "$(CANDLE_PEFT_CUDA_NCCL=1 bash scripts/cuda-toolchain.sh)"
    cargo build --release --features nccl --bin candle-peft
    # Stripped it is ~76 MB, over what one run carries (64 MiB with the tree); gzip makes ~19 MB.
    mkdir -p "$(dirname "$bin")"
    target=${CARGO_TARGET_DIR:-target}
    strip -o "$bin" "$target/release/candle-peft"
    gzip -9 -f "$bin"
    ls -l "$bin.gz"
    ;;
run)
    # Models and runs go to a scratch folder (the speed model alone is 400 MB); only the report
    # and the logs are copied to $OUT, the folder the device tool brings back.
    out=${GPU_CHECK_WORK:-out/gpu-check}
    mkdir -p "$out"
    if [ -n "${OUT:-}" ]; then
        trap 'cp "$out"/gpu-check.json "$out"/nvidia-smi.txt "$out"/gpu-check.log "$OUT"/ 2>/dev/null || true' EXIT
    fi
    if [ ! -x "$bin" ]; then
        [ -f "$bin.gz" ] || { echo "gpu-check: no $bin.gz (run \`bash scripts/gpu-check.sh build\` first)" >&2; exit 2; }
        gunzip -c "$bin.gz" > "$out/candle-peft-cuda"
        chmod +x "$out/candle-peft-cuda"
        bin=$out/candle-peft-cuda
    fi
    nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv | tee "$out/nvidia-smi.txt"
    libs=$(python3 - <<'EOF'
import glob, os, site
dirs = set()
for sp in site.getsitepackages() + [site.getusersitepackages()]:
    for lib in glob.glob(f"{sp}/nvidia/**/lib*.so*", recursive=True):
        dirs.add(os.path.dirname(lib))
print(":".join(sorted(dirs)))
EOF
)
    export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    if ldd "$bin" | grep 'not found'; then
        echo "gpu-check: the libraries above are missing (searched $libs)" >&2
        exit 2
    fi
    "$bin" --version
    # shellcheck disable=SC2086 # GPU_CHECK_ARGS is a list of flags
    python3 scripts/gpu_check.py --bin "$bin" --out "$out" ${GPU_CHECK_ARGS:-} 2>&1 | tee "$out/gpu-check.log"
    ;;
*)
    echo "usage: bash scripts/gpu-check.sh build|run" >&2
    exit 2
    ;;
esac
