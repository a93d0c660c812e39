#!/usr/bin/env bash
# Runs a command on the GPU machine with the CUDA 13 runtime libraries the binaries built by
# scripts/build-cuda.sh link against (cuBLAS, cudart, cuRAND, NCCL; libcuda.so.1 is the driver's).
#
#   scripts/gpu-run.sh .bin/mhc-train-cuda train --config configs/....toml
#   scripts/gpu-run.sh .bin/test-gpu_mhc-cuda --test-threads=1
#
# When .bin/mhc-cuda-bins.tar.xz (scripts/build-cuda.sh --pack) was carried, it is unpacked into
# .bin/ first: the binaries themselves exceed what the device tool carries. A file already there
# that is newer than its copy in the archive (a binary carried loose beside an archive left from an
# earlier call) is kept.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
archive="$repo_root/.bin/mhc-cuda-bins.tar.xz"
if [[ -f "$archive" ]]; then
  if command -v xz >/dev/null; then
    tar -C "$repo_root/.bin" --keep-newer-files --warning=no-ignore-newer -xJf "$archive"
  else
    python3 -c '
import os, sys, tarfile
dest = sys.argv[2]
with tarfile.open(sys.argv[1]) as tar:
    for member in tar:
        path = os.path.join(dest, member.name)
        if not (os.path.exists(path) and os.path.getmtime(path) >= member.mtime):
            tar.extract(member, dest)
' "$archive" "$repo_root/.bin"
  fi
  echo "gpu-run: unpacked .bin/mhc-cuda-bins.tar.xz" >&2
fi

# Where the GPU machine (Ubuntu 24.04, driver 580, CUDA 13.0) keeps those libraries: the system
# CUDA 13.0 and the PyTorch venv's wheels (the only NCCL there).
torch_nvidia=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
lib_dirs=(
  /usr/local/cuda-13.0/targets/x86_64-linux/lib
  "$torch_nvidia/cu13/lib"
  "$torch_nvidia/nccl/lib"
)
for dir in "${lib_dirs[@]}"; do
  if [[ -d "$dir" ]]; then
    LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$dir"
  else
    echo "gpu-run: warning: $dir does not exist" >&2
  fi
done
export LD_LIBRARY_PATH
# NVLink multicast (NVLS) must stay off on the lent multi-GPU machines.
export NCCL_NVLS_ENABLE=0

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv

if (($# == 0)); then
  exit 0
fi
# A missing shared library otherwise shows up as a bare loader error: name it up front.
if [[ -f "$1" ]] && missing="$(ldd "$1" 2>/dev/null | grep 'not found')"; then
  echo "gpu-run: $1 has unresolved libraries:" >&2
  echo "$missing" >&2
  exit 127
fi
exec "$@"
