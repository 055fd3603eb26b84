#!/usr/bin/env bash
# A CUDA 13.0 build toolchain from PyPI wheels, for `cargo build --features cuda` on machines
# without a GPU or a system CUDA install.
#
#   eval "$(bash scripts/cuda-toolchain.sh)"
#   cargo build --release --features cuda
#
# Installs nvcc (with cicc, ptxas and the CRT headers), the CUDA runtime headers and libcudart,
# cuBLAS, cuRAND, NVRTC and CCCL into one prefix, $CANDLE_PEFT_CUDA/nvidia/cu13 (the wheels all
# unpack into that one tree), then prints the environment to export on stdout:
#
#   CUDA_HOME          the prefix; cudarc's build script links from $CUDA_HOME/lib and lib/stubs
#   PATH               $CUDA_HOME/bin first: cudarc reads the CUDA version from `nvcc --version`,
#                      candle-kernels compiles its .cu files with that nvcc
#   CUDA_COMPUTE_CAP   the local GPU's (nvidia-smi), or 90 (H100/H200) when there is none
#   LIBRARY_PATH       $CUDA_HOME/lib and lib/stubs, for the linker (candle-kernels' -lcudart);
#                      the headers need no variable, nvcc finds $CUDA_HOME/include by itself
#
# Why 13.0: the lent GPU machines run driver 580, whose CUDA is 13.0, and a driver only loads PTX
# from an nvcc no newer than itself (candle's kernels are shipped as PTX and JIT-compiled at run
# time). cudarc 0.19 knows CUDA up to 13.4, so the pin must also stay at or below that.
#
# Two things the wheels do not have are made here, both only for the linker:
#   - unversioned names (libcublas.so -> libcublas.so.13 …), which `-lcublas` looks for;
#   - lib/stubs/libcuda.so: the driver library is part of the GPU driver, not of any wheel. The
#     stub is built from cuda.h: every driver API function, each an empty body, with the driver's
#     soname libcuda.so.1, so the binary records a dependency on the real driver library. It is
#     never loaded: lib/stubs is on no library path at run time (do not add it to LD_LIBRARY_PATH).
#
# With CANDLE_PEFT_CUDA_NCCL=1 it also installs NCCL (nvidia-nccl-cu13), for candle's `nccl`
# feature.
#
# Idempotent and offline after the first run: each wheel is unpacked once (a marker records it,
# the .whl is deleted), the links and the stub are made only when missing.
# Override the location with CANDLE_PEFT_CUDA=<dir> (default ~/.cache/candle-peft/cuda-13.0);
# it needs about 1.5 GB.
set -euo pipefail

dest=${CANDLE_PEFT_CUDA:-$HOME/.cache/candle-peft/cuda-13.0}
python=${PYTHON:-python3}
prefix=$dest/nvidia/cu13
mkdir -p "$dest/.installed"

# name==version pairs of one CUDA release (13.0 update 2); cuRAND and cuBLAS number on their own.
packages=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-nvrtc==13.0.88
    nvidia-cuda-cccl==13.0.85
    nvidia-cublas==13.0.2.14
    nvidia-curand==10.4.0.35
)
if [ "${CANDLE_PEFT_CUDA_NCCL:-0}" = 1 ]; then
    packages+=(nvidia-nccl-cu13==2.30.7)
fi

install_wheel() { # name==version -> unpacked into $dest, keeping the executable bits
    local spec=$1 marker=$dest/.installed/$1
    if [ -f "$marker" ]; then return; fi
    local tmp=$dest/.download
    rm -rf "$tmp" && mkdir -p "$tmp"
    echo "cuda-toolchain: downloading $spec from PyPI" >&2
    "$python" -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" "$spec"
    "$python" - "$tmp"/*.whl "$dest" <<'EOF'
import os, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for info in z.infolist():
        path = z.extract(info, sys.argv[2])
        if (info.external_attr >> 16) & 0o111:
            os.chmod(path, os.stat(path).st_mode | 0o755)
EOF
    rm -rf "$tmp"
    touch "$marker"
}

for spec in "${packages[@]}"; do
    install_wheel "$spec"
done

# -lNAME needs libNAME.so; the wheels ship only the versioned files.
for lib in "$prefix"/lib/lib*.so.*; do
    base=$(basename "$lib")
    case $base in *.so.*.*) continue ;; esac # libnvrtc-builtins.so.13.0 and the like
    link=$prefix/lib/${base%%.so.*}.so
    [ -e "$link" ] || ln -s "$base" "$link"
done

# NCCL's wheel unpacks beside the others (nvidia/nccl/lib, not nvidia/cu13/lib): -lnccl finds it
# through a link in the one library folder the linker searches.
if [ -f "$dest/nvidia/nccl/lib/libnccl.so.2" ] && [ ! -e "$prefix/lib/libnccl.so" ]; then
    ln -s ../../nccl/lib/libnccl.so.2 "$prefix/lib/libnccl.so"
fi

# The driver library stub (see the header). Symbol names are those cuda.h declares after
# preprocessing, so the versioned names (cuMemAlloc_v2 …) are the ones exported.
stub=$prefix/lib/stubs/libcuda.so
if [ ! -f "$stub" ]; then
    echo "cuda-toolchain: building the link-time stub $stub" >&2
    mkdir -p "$(dirname "$stub")"
    src=$dest/.libcuda-stub.c
    cc -E -P -I"$prefix/include" "$prefix/include/cuda.h" \
        | grep -oE '\bCUresult +cu[A-Za-z0-9_]+ *\(' \
        | sed -E 's/CUresult +(cu[A-Za-z0-9_]+) *\(/\1/' \
        | sort -u \
        | awk 'BEGIN { print "/* Link-time stand-in for the CUDA driver library; never loaded. */" }
               { print "int " $1 "(void) { return 999; }" }' > "$src"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub.tmp" "$src"
    mv "$stub.tmp" "$stub"
fi

"$prefix/bin/nvcc" --version | tail -n 2 >&2

cap=90
if command -v nvidia-smi > /dev/null 2>&1; then
    if found=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2> /dev/null | head -n 1 | tr -d ' .'); then
        [ -n "$found" ] && cap=$found
    fi
fi

echo "export CUDA_HOME='$prefix'"
echo "export PATH='$prefix/bin':\"\$PATH\""
echo "export CUDA_COMPUTE_CAP=$cap"
# Link time only (the stub must never be on LD_LIBRARY_PATH).
echo "export LIBRARY_PATH='$prefix/lib:$prefix/lib/stubs'\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
