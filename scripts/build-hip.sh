#!/usr/bin/env bash
# Builds the AMD (HIP) binary: the fused mHC kernels for gfx942 (MI300) and gfx90a (MI200),
# embedded as code objects, launched through hip-sys (no candle on the GPU).
#
#   scripts/build-hip.sh          -> .bin/mhc-train-hip   (target dir target/hip)
#
# On a ROCm machine (HIP_PATH=/opt/rocm, or set HIP_PATH): ROCm's clang and device libraries.
# On Debian 12 without ROCm: installs clang-19, libamdhip64-dev (HIP 5.2 runtime) and the device
# libraries with scripts/setup-hip.sh, then builds with HIP_PATH=/usr. Such a binary links
# libamdhip64.so.5; run it on a machine whose HIP runtime provides that soname (or rebuild there).
#
# Then, on the AMD machine:
#   .bin/mhc-train-hip selftest --device hip      fused kernels vs the f64 reference
#   .bin/mhc-train-hip bench --device hip         the layer tables
#   .bin/mhc-train-hip mhc-apply --device hip --in in.safetensors --out out.safetensors
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
  sed -n '2,16p' "${BASH_SOURCE[0]}"
  exit 0
fi

if [[ -z "${HIP_PATH:-}" ]]; then
  if [[ -f /opt/rocm/include/hip/hip_runtime_api.h ]]; then
    HIP_PATH=/opt/rocm
  else
    HIP_PATH=/usr
  fi
fi
export HIP_PATH
if [[ "$HIP_PATH" == /usr ]]; then
  scripts/setup-hip.sh
fi
[[ -f "$HIP_PATH/include/hip/hip_runtime_api.h" ]] || {
  echo "build-hip: no $HIP_PATH/include/hip/hip_runtime_api.h: install ROCm or libamdhip64-dev, or set HIP_PATH" >&2
  exit 1
}

export CARGO_TARGET_DIR="$repo_root/target/hip"
start=$SECONDS
echo "build-hip: cargo build --release --features hip (HIP_PATH=$HIP_PATH, CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
cargo build --release --features hip
mkdir -p .bin
strip -o .bin/mhc-train-hip "$CARGO_TARGET_DIR/release/mhc-train"
echo "build-hip: .bin/mhc-train-hip ($(du -h .bin/mhc-train-hip | cut -f1)) in $((SECONDS - start)) s"
